"""``ubimesh up -f mesh.yaml``: a whole mesh on this machine, from one file.

1. Validate the files (refuse with every error, exit 1, before starting anything).
2. Start ``ubimesh control`` as a child (SQLite in the data dir), apply the resources.
3. Start a ``ubimesh proxy`` for every Workload with a ``sidecar`` and every Gateway (each with
   a generated bootstrap: ADS to the control plane). When the mesh's ``mtls.mode`` is STRICT
   or PERMISSIVE, each proxy gets its identity with no manual step: ``up`` makes the CA in
   ``<data dir>/ca`` (or uses the one there), creates one join token per proxy through the API
   and writes it to ``<data dir>/tokens/<node id>.token`` (0600), which the bootstrap names
   (with the proxy's SPIFFE ID and the API URL). Then every Workload's ``command`` with
   ``PORT`` (its first application port), ``UBIMESH_OUTBOUND`` (its sidecar's outbound
   listener, if any), ``UBIMESH_WORKLOAD``/``UBIMESH_NAMESPACE``/``UBIMESH_SERVICE``/
   ``UBIMESH_SITE``, then its own ``env``. A command whose first word is ``python`` or
   ``python3`` runs with this Python; commands run in the mesh file's directory.
4. Wait (bounded) until every proxy's admin ``/ready`` is 200 and every app's port accepts,
   print where to send traffic, and run until SIGINT/SIGTERM (or ``--seconds``).
5. Stop: SIGTERM to every child's process group, SIGKILL after a bounded grace. A child that
   dies unexpectedly is reported with its log's path; a control plane that dies is started
   again on the same addresses (the proxies keep serving meanwhile), and so is a proxy (with
   its identity from its stored credential, no new token), a few times at most.

Every child logs to ``<data dir>/logs/<name>.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from ubimesh.control.api_error import ApiError
from ubimesh.control.bootstrap import build_bootstrap, parse_address
from ubimesh.control.client import Client
from ubimesh.control.compiler.tracing import service_name
from ubimesh.control.resources import Resource, ResourceErrors, load_files, validate_set
from ubimesh.control.resources.mesh import effective_mesh, spiffe_id
from ubimesh.control.server import ADDRESSES_FILE, TOKEN_FILE

STOP_GRACE_S = 5.0
POLL_S = 0.1
#: A control plane or proxy that dies is started again, at most this many times per window.
RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: How long a proxy's join token is good for: it is redeemed as the proxy starts.
JOIN_TOKEN_TTL = "1h"


class UpError(Exception):
    """``up`` cannot go on; the message says why (and where the logs are)."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    admin_port: int | None = None  # a proxy: wait for /ready
    app_port: int | None = None  # an app: wait until it accepts
    listen_ports: tuple[int, ...] = ()  # a proxy's listeners: wait until they accept
    popen: subprocess.Popen[bytes] | None = None
    reported: bool = False
    #: Started again when it dies (proxies: their identity survives in their cache dir).
    restartable: bool = False
    restarts: list[float] = field(default_factory=list)
    _log: Any = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise UpError(f"{self.name}: cannot start {self.argv[0]!r}: {exc.strerror}") from None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _python(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _ubimesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "ubimesh.cli.main", *args]


def first_app_port(workload: Resource, services: Mapping[tuple[str, str], Resource]) -> int | None:
    """The port the workload's application listens on for its service's first port."""
    service = services.get((workload.namespace, str(workload.spec.get("service"))))
    if service is None or not service.spec.get("ports"):
        return None
    port = service.spec["ports"][0]
    mapped = (workload.spec.get("ports") or {}).get(port["name"])
    return int(mapped if mapped is not None else port.get("targetPort", port["port"]))


class Up:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # absolute: children run elsewhere (apps in the mesh file's directory) and the store
        # URL sqlite://<path> must not turn a relative "data" into "/data"
        self.data_dir = Path(args.data_dir).resolve() if args.data_dir else Path(
            tempfile.mkdtemp(prefix="ubimesh-up-")
        )
        self.logs = self.data_dir / "logs"
        self.children: list[Child] = []
        self.control: Child | None = None
        #: The control plane's bound API and xDS addresses: a restart binds the same ones, so
        #: the proxies (which list that xDS address) find it again.
        self.control_addresses: tuple[str, str] = ("", "")
        #: The control plane's collector URL ("": off), from its control.json.
        self.collector_url = ""
        self.control_restarts: list[float] = []
        self.stopping = False
        self.out = sys.stdout
        #: Set by ``enable_identity``: the API that issues join tokens and certificates.
        self.identity_api: Client | None = None
        self.trust_domain = ""

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- start ------------------------------------------------------------------------------

    def start_control(self, deadline: float) -> tuple[str, str, str]:
        """Start the control plane; its API URL, xDS address and admin token."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        addresses = self.data_dir / ADDRESSES_FILE
        addresses.unlink(missing_ok=True)
        parse_address(self.args.api_address, what="--api-address")
        parse_address(self.args.xds_address, what="--xds-address")
        self._spawn_control(self.args.api_address, self.args.xds_address)
        assert self.control is not None
        while not addresses.exists():
            if not self.control.alive:
                raise UpError(f"the control plane exited; see {self.control.log_path}\n"
                              + _tail(self.control.log_path))
            if time.monotonic() > deadline:
                raise UpError(f"the control plane did not start; see {self.control.log_path}")
            time.sleep(POLL_S)
        data = json.loads(addresses.read_text())
        token = (self.data_dir / TOKEN_FILE).read_text().strip()
        self.collector_url = str(data.get("collector") or "")
        api_host_port = str(data["api"]).split("://", 1)[-1]
        self.control_addresses = (api_host_port, str(data["xds"]))
        return str(data["api"]), str(data["xds"]), token

    def _spawn_control(self, api_address: str, xds_address: str) -> None:
        if self.control is not None:
            self.children.remove(self.control)
            self.control.close_log()
        from ubimesh.cli.control_cmds import collector_argv

        collector = collector_argv(self.args)
        if self.args.collector_address and self.collector_url:
            # a restart binds the collector where the proxies already send spans
            collector += ["--collector-address", self.collector_url.split("://", 1)[1]]
        self.control = Child(
            "control",
            _ubimesh("control", "--data-dir", str(self.data_dir),
                     "--api-address", api_address, "--xds-address", xds_address, *collector),
            self.logs / "control.log",
        )
        self.control.start()
        self.children.append(self.control)

    def restart_control(self) -> None:
        """Start the control plane again on the addresses it had (its store is the SQLite
        file in the data dir, so nothing is lost). Meanwhile the proxies keep serving their
        last configuration and reconnect on their own. Gives up (UpError) when it keeps
        dying: more than RESTARTS times within RESTART_WINDOW_S."""
        now = time.monotonic()
        self.control_restarts = [t for t in self.control_restarts
                                 if now - t < RESTART_WINDOW_S]
        if len(self.control_restarts) >= RESTARTS:
            raise UpError(f"the control plane died {RESTARTS + 1} times within "
                          f"{RESTART_WINDOW_S:.0f} s; stopping the mesh")
        self.control_restarts.append(now)
        self.say("ubimesh up: proxies keep serving their last configuration; "
                 "starting the control plane again")
        self._spawn_control(*self.control_addresses)

    def prepare_ca(self, trust_domain: str) -> None:
        """The CA in ``<data dir>/ca``: made now, or the one there (which must be of
        ``trust_domain``). Before the control plane starts, which signs with it."""
        from ubimesh.identity import CertificateAuthority

        ca, created = CertificateAuthority.open_or_init(self.data_dir / "ca", trust_domain)
        if ca.trust_domain != trust_domain:
            raise UpError(
                f"{self.data_dir / 'ca'}: the CA there is for trust domain {ca.trust_domain!r}, "
                f"the mesh's trustDomain is {trust_domain!r}; use another --data-dir"
            )
        self.trust_domain = trust_domain
        if created:
            self.say(f"ubimesh up: made a CA for trust domain {trust_domain} in "
                     f"{self.data_dir / 'ca'}")

    def enable_identity(self, api: str, token: str) -> None:
        """From now on every proxy started gets an identity (``prepare_ca`` ran)."""
        self.identity_api = Client(api, token)

    def join_token_file(self, node_id: str, identity: str) -> Path:
        """A one-time join token for ``identity``, from the API, in a 0600 file of its own."""
        assert self.identity_api is not None
        body = json.dumps({"identity": identity, "ttl": JOIN_TOKEN_TTL}).encode()
        try:
            answer = self.identity_api._call("POST", "/api/v1/identity/tokens", body=body)
        except ApiError as exc:
            if exc.status == 404:
                raise UpError(
                    "the control plane has no identity API (POST /api/v1/identity/tokens): "
                    "it cannot give proxies certificates; set the Mesh's mtls.mode to DISABLE"
                ) from None
            raise
        path = self.data_dir / "tokens" / f"{node_id}.token"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(answer["token"]) + "\n")
        return path

    def start_proxy(self, node_id: str, role: str, admin_port: int | None, xds: str,
                    listen_ports: Sequence[int] = (), identity: str | None = None,
                    cluster: str = "") -> Child:
        """A ``ubimesh proxy`` for ``node_id``; with ``identity`` (after ``enable_identity``)
        its bootstrap lets it get that identity's certificate. ``cluster``: its
        ``node.cluster``, the service name its spans carry (compiler/tracing.py)."""
        port = admin_port or free_port()
        api = token_file = None
        if identity is not None and self.identity_api is not None:
            api = self.identity_api.server
            token_file = str(self.join_token_file(node_id, identity))
        else:
            identity = None
        bootstrap = build_bootstrap(node_id=node_id, role=role, xds=[parse_address(xds)],
                                    admin_port=port, identity=identity, control_api=api,
                                    join_token_file=token_file, cluster=cluster)
        path = self.data_dir / "bootstraps" / f"{node_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        child = Child(
            f"proxy {node_id}",
            # A cache of its own per run: another run's cached config (other ports) must
            # never be served while this control plane is slow to answer.
            _ubimesh("proxy", "-c", str(path), "--concurrency", "1", "-l", "warning",
                     "--drain-time-s", "1", "--xds-cache-dir",
                     str(self.data_dir / "xds-cache" / node_id)),
            self.logs / f"proxy-{node_id}.log",
            admin_port=port,
            listen_ports=tuple(listen_ports),
            restartable=True,
        )
        child.start()
        self.children.append(child)
        return child

    def start_app(self, workload: Resource, services: Mapping[tuple[str, str], Resource],
                  cwd: Path) -> Child:
        spec = workload.spec
        env = dict(os.environ)
        port = first_app_port(workload, services)
        if port is not None:
            env["PORT"] = str(port)
        sidecar = spec.get("sidecar") or {}
        if sidecar.get("outboundPort"):
            env["UBIMESH_OUTBOUND"] = f"http://127.0.0.1:{sidecar['outboundPort']}"
        env.update({
            "UBIMESH_WORKLOAD": workload.name,
            "UBIMESH_NAMESPACE": workload.namespace,
            "UBIMESH_SERVICE": str(spec.get("service", "")),
            "UBIMESH_SITE": str(spec.get("site", "")),
            "PYTHONUNBUFFERED": "1",
        })
        env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
        child = Child(
            f"app {workload.name}.{workload.namespace}", _python(spec["command"]),
            self.logs / f"app-{workload.name}.{workload.namespace}.log",
            env=env, cwd=cwd, app_port=port,
        )
        child.start()
        self.children.append(child)
        return child

    def wait_ready(self, deadline: float) -> None:
        pending = [c for c in self.children if c.admin_port or c.app_port]
        while pending:
            for child in list(pending):
                if not child.alive:
                    raise UpError(f"{child.name} exited during startup; see {child.log_path}\n"
                                  + _tail(child.log_path))
                if _is_ready(child):
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{c.name} (log {c.log_path})" for c in pending)
                raise UpError(f"not ready after {self.args.ready_timeout} s: {names}")
            time.sleep(POLL_S)

    # -- run and stop -----------------------------------------------------------------------

    def check_children(self) -> None:
        for child in self.children:
            if child.alive or child.reported or child.popen is None:
                continue
            child.reported = True
            print(f"ubimesh up: {child.name} exited unexpectedly with code "
                  f"{child.popen.returncode}; log {child.log_path}", file=sys.stderr, flush=True)
            if child is self.control:
                self.restart_control()
                return
            if child.restartable:
                self.restart_child(child)

    def restart_child(self, child: Child) -> None:
        """Start a proxy that died again, with the same bootstrap: its stored credential (in
        its xDS cache directory) gives it back its identity without a new join token, and its
        ADS cache its last configuration. Left dead (and said so) when it keeps dying: more
        than RESTARTS times within RESTART_WINDOW_S."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
        if len(child.restarts) >= RESTARTS:
            print(f"ubimesh up: {child.name} died {RESTARTS + 1} times within "
                  f"{RESTART_WINDOW_S:.0f} s; leaving it stopped (log "
                  f"{child.log_path})", file=sys.stderr, flush=True)
            return
        child.restarts.append(now)
        child.close_log()
        child.reported = False
        self.say(f"ubimesh up: starting {child.name} again")
        child.start()

    def stop(self) -> None:
        """SIGTERM everyone (apps and proxies first, the control plane last), then SIGKILL."""
        groups = [[c for c in self.children if c is not self.control],
                  [c for c in self.children if c is self.control]]
        for group in groups:
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                if child.popen is None:
                    continue
                try:
                    child.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"ubimesh up: {child.name} ignored SIGTERM; killing it",
                          file=sys.stderr, flush=True)
                    child.signal(signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.popen.wait(STOP_GRACE_S)
                child.signal(signal.SIGKILL)  # anything the child left in its group
                child.close_log()


def _is_ready(child: Child) -> bool:
    if child.admin_port:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", child.admin_port, timeout=0.5)
            try:
                conn.request("GET", "/ready")
                if conn.getresponse().status != 200:
                    return False
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return False
    ports = [*child.listen_ports, *([child.app_port] if child.app_port else [])]
    return all(_accepts(port) for port in ports)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def summary(resources: Sequence[Resource], api: str, data_dir: Path,
            collector: str = "") -> str:
    """Where to send traffic, and what to try."""
    lines = ["", "ubimesh up: the mesh is ready", ""]
    curls: list[str] = []
    routes = [r for r in resources if r.kind == "HTTPRoute"]
    for gw in (r for r in resources if r.kind == "Gateway"):
        address = str(gw.spec.get("address", "0.0.0.0"))
        host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        for listener in gw.spec.get("listeners", []):
            url = f"http://{host}:{listener['port']}"
            hosts = ",".join(listener.get("hosts") or ["*"])
            lines.append(f"  gateway {gw.name:<12} {listener['name']:<8} "
                         f"{listener.get('protocol', 'HTTP'):<4} {url}  hosts {hosts}")
            if listener.get("protocol", "HTTP") != "HTTP":
                continue
            paths = []
            for route in routes:
                if not any(p.get("name") == gw.name for p in route.spec.get("parentRefs", [])):
                    continue
                for rule in route.spec.get("rules", []):
                    for match in rule.get("matches") or [{}]:
                        value = (match.get("path") or {}).get("value", "/")
                        if value not in paths:
                            paths.append(value)
            for path in paths or ["/"]:
                curls.append(f"curl -s {url}{path}")
    for wl in (r for r in resources if r.kind == "Workload"):
        sidecar = wl.spec.get("sidecar") or {}
        parts = [f"service {wl.spec.get('service')}", f"site {wl.spec.get('site', 'default')}"]
        if sidecar.get("inboundPorts"):
            parts.append("inbound " + ",".join(str(p) for p in sidecar["inboundPorts"].values()))
        if sidecar.get("outboundPort"):
            parts.append(f"outbound http://127.0.0.1:{sidecar['outboundPort']}")
        lines.append(f"  workload {wl.name:<11} " + "  ".join(parts))
    lines += ["", "try:"] + [f"  {c}" for c in curls]
    lines += [
        f"  export UBIMESH_SERVER={api} UBIMESH_TOKEN_FILE={data_dir / TOKEN_FILE}"
        + (f" UBIMESH_COLLECTOR={collector}" if collector else ""),
        "  ubimesh get workloads; ubimesh apply -f <changed file>",
        "  ubimesh top    # live requests/s, success rate, p50/p99 per service",
        *(["  ubimesh traces --service <service>.<namespace>; ubimesh trace <trace id>"]
          if collector else []),
        "",
        f"logs in {data_dir / 'logs'}; Ctrl-C stops everything",
    ]
    return "\n".join(lines)


def run_up(args: argparse.Namespace) -> int:
    try:
        resources = load_files([Path(f) for f in args.filename])
        validate_set(resources)
    except ResourceErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    up = Up(args)
    mesh = effective_mesh(resources)
    mtls = str((mesh.spec.get("mtls") or {}).get("mode", "STRICT"))
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)
        if not up.stopping:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        deadline = time.monotonic() + args.ready_timeout
        if mtls != "DISABLE":
            up.data_dir.mkdir(parents=True, exist_ok=True)
            up.prepare_ca(str(mesh.spec["trustDomain"]))
        api, xds, token = up.start_control(deadline)
        up.say(f"ubimesh up: control plane {api} (xDS {xds}), data in {up.data_dir}")
        if mtls != "DISABLE":
            up.enable_identity(api, token)
            up.say(f"ubimesh up: mTLS {mtls}: every proxy gets its certificate from the CA")
        files = [(f, Path(f).read_text()) for f in args.filename]
        answer = Client(api, token).apply(files)
        up.say(f"ubimesh up: applied {len(answer['results'])} resources")
        services = {(r.namespace, r.name): r for r in resources if r.kind == "Service"}
        cwd = Path(args.filename[0]).resolve().parent
        for r in resources:
            if r.kind == "Workload" and r.spec.get("command"):
                up.start_app(r, services, cwd)
        for r in resources:
            if r.kind == "Workload" and r.spec.get("sidecar"):
                sidecar = r.spec["sidecar"]
                ports = [*(sidecar.get("inboundPorts") or {}).values()]
                ports += [sidecar["outboundPort"]] if sidecar.get("outboundPort") else []
                ports += [u["localPort"] for u in sidecar.get("upstreams") or []]
                account = str(r.spec.get("serviceAccount") or r.spec["service"])
                up.start_proxy(f"{r.name}.{r.namespace}", "sidecar", sidecar.get("adminPort"),
                               xds, ports, spiffe_id(mesh, r.namespace, account),
                               service_name(str(r.spec["service"]), r.namespace))
            elif r.kind == "Gateway":
                ports = [listener["port"] for listener in r.spec.get("listeners", [])]
                # a gateway's identity: service account = the gateway's name
                up.start_proxy(f"{r.name}.{r.namespace}", "gateway", r.spec.get("adminPort"),
                               xds, ports, spiffe_id(mesh, r.namespace, r.name),
                               service_name(r.name, r.namespace))
        up.wait_ready(deadline)
        up.say(summary(resources, api, up.data_dir, up.collector_url))
        end = time.monotonic() + args.seconds if args.seconds is not None else None
        while end is None or time.monotonic() < end:
            up.check_children()
            time.sleep(POLL_S * 2)
    except KeyboardInterrupt:
        up.say("\nubimesh up: stopping")
    except (UpError, ApiError, ValueError) as exc:
        lines = exc.lines() if isinstance(exc, ApiError) else [str(exc)]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        code = 1
    finally:
        up.stopping = True
        up.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    up.say("ubimesh up: stopped")
    return code
