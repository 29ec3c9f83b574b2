"""``ubimesh policy can`` agrees with the running proxies (issue 5, Deliver 6).

A generated mesh of 50 services and 200 TrafficTarget rules (``bench/policy_blast_radius.py``,
a fixed seed) is applied to a control plane (STRICT mTLS, default deny). The sidecars of 10
destination services (two of them with a TCP port besides HTTP) run as ``ubimesh proxy``
processes on 127.0.0.1, each getting its certificate from the control plane; the other
services' workloads live elsewhere and do not run. Clients holding certificates of 12
identities, minted through the control plane's identity API, send to every sidecar's inbound
listener one HTTP request per route match of the mesh's route group, one no route matches and
one whose path only matches after normalization, and open a TCP connection to each TCP port.

For every request, the proxy's decision (200 from the application, or 403 and its
``x-ubimesh-denied-by`` policy; for TCP, the echo or a closed connection) equals the answer of
``ubimesh.policy.questions`` (what ``ubimesh policy can`` prints) on the control plane's
resources, fetched as the CLI fetches them. A sample is also asked through the real command
(a subprocess: its exit code, 0 or 3, and its JSON).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.control import ControlReplica, start_control, wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, ManagedProcess, free_ports, wait_ready

from ubimesh.cli.policy_cmds import fetch_resources
from ubimesh.control.bootstrap import build_bootstrap
from ubimesh.control.client import Client
from ubimesh.identity.workload import WorkloadIdentity
from ubimesh.policy.questions import MeshPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import policy_blast_radius as generator

SEED = 5
SERVICES, RULES = 50, 200
RUNNING = range(10)  # svc0..svc9, one per namespace; svc4 and svc9 also have a TCP port
CLIENTS = 12
TD = "cluster.local"


def identity(ns: str, account: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{account}"


@dataclass(frozen=True)
class Attempt:
    """One request (or TCP connection) and what the proxy did with it."""

    client: str
    service: int
    port: str  # "http" | "tcp"
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    allowed: bool
    denied_by: str | None  # the proxy's x-ubimesh-denied-by ("" when absent)


class TcpEcho:
    """Echoes every byte back, on its own port, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    replica = start_control(tmp_path)
    try:
        yield replica
    finally:
        replica.stop()


def _requests() -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    out = []
    for match in generator.ROUTE_MATCHES:
        method = (match.get("methods") or ["GET"])[0]
        path = str(match["pathRegex"]).replace(".*", "x")
        headers = tuple((k, v.split("|")[0]) for k, v in (match.get("headers") or {}).items())
        out.append((method, path, headers))
    out.append(("DELETE", "/other", ()))
    out.append(("GET", "/x/..//api/v1/y", ()))  # /api/v1/y once normalized
    return out


def _clients(docs: list[dict[str, Any]]) -> list[str]:
    """Sources of the running destinations' TrafficTargets first, then other identities."""
    running = {generator.service_key(i) for i in RUNNING}
    listed: set[str] = set()
    for doc in docs:
        if doc["kind"] != "TrafficTarget":
            continue
        dest = doc["spec"]["destination"]
        if (dest["namespace"], dest["name"]) in running:
            listed.update(identity(s["namespace"], s["name"]) for s in doc["spec"]["sources"])
    others = sorted({identity(*generator.service_key(i)) for i in range(SERVICES)} - listed)
    chosen = sorted(listed)[: CLIENTS - 3] + others[:3]
    return chosen


def _context(tmp_path: Path, name: str, chain: bytes, key: bytes, bundle: bytes) -> ssl.SSLContext:
    files = {}
    for part, data in (("crt", chain), ("key", key), ("ca", bundle)):
        files[part] = tmp_path / f"{name}.{part}.pem"
        files[part].write_bytes(data)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(files["ca"]))
    context.load_cert_chain(str(files["crt"]), str(files["key"]))
    return context


def _http(context: ssl.SSLContext, port: int, host: str,
          requests: list[tuple[str, str, tuple[tuple[str, str], ...]]]
          ) -> list[tuple[int, str, str]]:
    """(status, x-ubimesh-denied-by, x-echo-upstream) of each request, over one keep-alive
    connection (opened again if the proxy closed it)."""
    out = []
    conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=10, context=context)
    for method, path, headers in requests:
        for attempt in range(2):
            try:
                conn.request(method, path, headers={"Host": host, **dict(headers)})
                response = conn.getresponse()
                response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, ssl.SSLError):
                conn.close()
                conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=10,
                                                   context=context)
                if attempt:
                    raise
        out.append((response.status, response.getheader("x-ubimesh-denied-by") or "",
                    response.getheader("x-echo-upstream") or ""))
    conn.close()
    return out


def _tcp(context: ssl.SSLContext, port: int) -> bool:
    """Whether a TLS connection to ``port`` carries bytes to the echo and back."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"ping\n")
                got = b""
                while len(got) < 5:
                    chunk = tls.recv(5 - len(got))
                    if not chunk:
                        break
                    got += chunk
                return got == b"ping\n"
        except (ConnectionError, ssl.SSLError, TimeoutError):
            return False


def test_the_evaluator_and_the_cli_agree_with_the_proxies(
    tmp_path: Path, control: ControlReplica
) -> None:
    pool = EchoServerPool()
    echoes = {i: TcpEcho() for i in RUNNING if generator.has_tcp(i)}
    procs: list[ManagedProcess] = []
    try:
        app = {i: pool.port(f"svc{i}") for i in RUNNING}
        inbound = {i: free_ports(2) for i in RUNNING}

        def address(i: int, j: int) -> str:
            return LOOPBACK if i in RUNNING else f"10.{i // 250}.{i % 250}.{j + 1}"

        def inbound_port(i: int, j: int, port: str) -> int:
            if i not in RUNNING:
                return generator.HTTP_PORT if port == "http" else generator.TCP_PORT
            return inbound[i][0 if port == "http" else 1]

        def app_port(i: int, j: int, port: str) -> int:
            if i not in RUNNING:  # another machine: the service port
                return generator.HTTP_PORT if port == "http" else generator.TCP_PORT
            return app[i] if port == "http" else echoes[i].port

        docs = generator.generate_documents(SERVICES, RULES, SEED, address=address,
                                            inbound=inbound_port, app=app_port)
        control.apply(yaml.safe_dump_all(docs, sort_keys=False))

        # The sidecars, each with its identity from the control plane.
        admins = free_ports(len(RUNNING))
        for n, i in enumerate(RUNNING):
            ns, name = generator.service_key(i)
            ident = identity(ns, name)
            token_file = tmp_path / f"{name}.token"
            token_file.write_text(_token(control, ident))
            bootstrap = build_bootstrap(
                node_id=f"{name}-0.{ns}", xds=[control.xds_address], admin_port=admins[n],
                identity=ident, control_api=control.api, join_token_file=str(token_file),
            )
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
            procs.append(ManagedProcess(
                name, [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(path),
                       "--drain-time-s", "0", "--xds-cache-dir", str(tmp_path / f"{name}.xds")],
                tmp_path / f"{name}.log", tmp_path))
        for n, i in enumerate(RUNNING):
            ports = inbound[i][: 2 if generator.has_tcp(i) else 1]
            wait_ready(procs[n], admins[n], ports, 60.0)

        # The clients' certificates, from the identity API.
        clients = _clients(docs)
        minted = asyncio.run(_mint(control, clients))
        contexts = {c: _context(tmp_path, f"client{k}", *minted[k])
                    for k, c in enumerate(clients)}

        # What the proxies do.
        attempts: list[Attempt] = []
        requests = _requests()
        for client in clients:
            for i in RUNNING:
                ns, name = generator.service_key(i)
                answers = _http(contexts[client], inbound[i][0], f"{name}.{ns}", requests)
                for (method, path, headers), (status, denied_by, upstream) in zip(
                        requests, answers, strict=True):
                    assert status in (200, 403), (client, i, method, path, status)
                    # 200 comes from the application, never from the proxy.
                    assert (status == 200) == (upstream == name), (status, upstream)
                    attempts.append(Attempt(client, i, "http", method, path, headers,
                                            status == 200, denied_by))
                if generator.has_tcp(i):
                    attempts.append(Attempt(client, i, "tcp", "", "", (),
                                            _tcp(contexts[client], inbound[i][1]), None))

        # What the evaluator says, on the resources the CLI would fetch.
        mesh = MeshPolicy(fetch_resources(Client(control.api, control.token)))
        for a in attempts:
            ns, name = generator.service_key(a.service)
            service = mesh.index.services[(ns, name)]
            port = generator.HTTP_PORT if a.port == "http" else generator.TCP_PORT
            (row,) = [r for r in mesh.can([a.client], service, port=port, method=a.method,
                                          path=a.path, headers=a.headers).rows
                      if r.workload == f"{name}-0"]
            assert row.allowed == a.allowed, (a, row)
            if a.port == "http":
                assert a.denied_by == ("" if row.allowed else (row.policy or "none")), (a, row)
        http_allowed = sum(a.allowed for a in attempts if a.port == "http")
        tcp_allowed = sum(a.allowed for a in attempts if a.port == "tcp")
        tcp_total = sum(a.port == "tcp" for a in attempts)
        # The mesh and the clients exercise both answers on both protocols.
        assert 20 <= http_allowed <= len(attempts) - tcp_total - 20, http_allowed
        assert 1 <= tcp_allowed < tcp_total, (tcp_allowed, tcp_total)

        # The command itself, on a sample: exit 0 / 3 and the same policy.
        env = {k: v for k, v in os.environ.items() if not k.startswith("UBIMESH_")}
        env.update(UBIMESH_SERVER=control.api,
                   UBIMESH_TOKEN_FILE=str(control.data_dir / "admin-token"))
        http_attempts = [a for a in attempts if a.port == "http"]
        sample = ([a for a in http_attempts if a.allowed][:2]
                  + [a for a in http_attempts if not a.allowed][:2])
        for a in sample:
            ns, name = generator.service_key(a.service)
            argv = [sys.executable, "-m", "ubimesh.cli.main", "policy", "can", "--from",
                    a.client, "--to", f"{name}.{ns}", "--port", "http", "--method", a.method,
                    "--path", a.path, "-o", "json"]
            for header in a.headers:
                argv += ["-H", f"{header[0]}: {header[1]}"]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                                  check=False)
            assert done.returncode == (0 if a.allowed else 3), (argv, done.stderr)
            (answer,) = json.loads(done.stdout)["answers"]
            assert answer["allowed"] == a.allowed
            if not a.allowed:
                assert answer["policy"] == a.denied_by

        # Before applying a change: `policy diff --fail-on new-allow` sees the new allow (exit
        # 3); after applying it, the proxy does what the diff said.
        read = _requests()[0]
        denied = next(a for a in http_attempts if not a.allowed
                      and (a.method, a.path, a.headers) == read)
        ns, name = generator.service_key(denied.service)
        source_ns, source = denied.client.split("/ns/")[1].split("/sa/")
        grant = tmp_path / "grant.yaml"
        grant.write_text(yaml.safe_dump({
            "apiVersion": generator.ACCESS_API, "kind": "TrafficTarget",
            "metadata": {"name": "grant-test", "namespace": ns},
            "spec": {"destination": {"kind": "ServiceAccount", "name": name, "namespace": ns},
                     "sources": [{"kind": "ServiceAccount", "name": source,
                                  "namespace": source_ns}],
                     "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes",
                                "matches": ["read"]}]},
        }))
        done = subprocess.run(
            [sys.executable, "-m", "ubimesh.cli.main", "policy", "diff", "-f", str(grant),
             "--fail-on", "new-allow", "-o", "json"],
            capture_output=True, text=True, env=env, timeout=60, check=False)
        assert done.returncode == 3, done.stderr
        flips = json.loads(done.stdout)["flips"]
        assert {(f["change"], f["source"], f["service"], f["route"]["name"],
                 f["after"]["policy"]) for f in flips} == {
            ("new-allow", denied.client, name, "api-routes/read", f"{ns}/grant-test/0")}
        control.apply(grant.read_text())
        wait_for("the proxy to apply the new TrafficTarget", lambda: _http(
            contexts[denied.client], inbound[denied.service][0], f"{name}.{ns}", [read]
        )[0][0] == 200, timeout=20, interval=0.2)
    finally:
        for proc in procs:
            proc.stop()
        pool.close()
        for echo in echoes.values():
            echo.close()


def _token(control: ControlReplica, ident: str) -> str:
    answer = control.call("POST", "/api/v1/identity/tokens",
                          json.dumps({"identity": ident, "ttl": "5m"}))
    return str(answer["token"])


async def _mint(control: ControlReplica, clients: list[str]) -> list[tuple[bytes, bytes, bytes]]:
    async def one(ident: str) -> tuple[bytes, bytes, bytes]:
        got = await WorkloadIdentity(control.api, ident, _token(control, ident)).obtain()
        return got.chain_pem, got.key_pem, got.bundle_pem

    return list(await asyncio.gather(*(one(c) for c in clients)))
