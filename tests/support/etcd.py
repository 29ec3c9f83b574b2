"""Start real etcd members for tests: one member, or a cluster of several, on 127.0.0.1.

Ports are picked free (never 2379/2380) and picked again if a member could not bind them; data
directories live under the caller's directory (a test's tmp_path); startup waits are bounded;
``EtcdCluster.stop`` ends every member by its process group. etcd comes from the
``etcd-server`` package (scripts/setup installs it); ``etcd_binary()`` is None without it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import LOOPBACK, ManagedProcess, ProcessStartError, free_ports

__all__ = [
    "ETCD_MISSING",
    "EtcdCluster",
    "EtcdMember",
    "etcd_binary",
    "etcd_cluster",
    "etcd_post",
    "start_etcd_cluster",
]

ETCD_MISSING = "no etcd binary on PATH (scripts/setup installs the etcd-server package)"


def etcd_binary() -> str | None:
    found = shutil.which("etcd")
    if found is None and os.access("/usr/bin/etcd", os.X_OK):
        found = "/usr/bin/etcd"
    return found


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: ManagedProcess

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def kill(self) -> None:
        """SIGKILL the member (a crash: no graceful leave) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stop(timeout=5.0)


@dataclass
class EtcdCluster:
    members: list[EtcdMember]

    @property
    def url(self) -> str:
        """The store URL naming every member, in member order."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def member_at(self, endpoint: str) -> EtcdMember:
        """The member whose client endpoint is ``endpoint`` ("http://127.0.0.1:N" or "host:N")."""
        port = int(endpoint.rsplit(":", 1)[1])
        for member in self.members:
            if member.client_port == port:
                return member
        raise LookupError(f"no member listens on {endpoint}")

    def stop(self) -> None:
        for member in self.members:
            member.proc.stop(timeout=5.0)

    def describe(self) -> str:
        return "\n".join(m.proc.describe() for m in self.members)


def etcd_post(port: int, path: str, body: dict[str, object], timeout: float = 3.0) -> object:
    """One JSON request to a member's gRPC gateway (sync; for test setup)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def _launch(workdir: Path, size: int, token: str) -> list[EtcdMember]:
    exe = etcd_binary()
    if exe is None:
        raise ProcessStartError(ETCD_MISSING)
    ports = free_ports(2 * size)
    names = [f"m{i}" for i in range(size)]
    peers = ",".join(f"{n}=http://{LOOPBACK}:{ports[2 * i + 1]}" for i, n in enumerate(names))
    members: list[EtcdMember] = []
    try:
        for i, name in enumerate(names):
            client, peer = ports[2 * i], ports[2 * i + 1]
            data_dir = workdir / f"{token}-{name}"
            argv = [
                exe,
                "--name", name,
                "--data-dir", str(data_dir),
                "--listen-client-urls", f"http://{LOOPBACK}:{client}",
                "--advertise-client-urls", f"http://{LOOPBACK}:{client}",
                "--listen-peer-urls", f"http://{LOOPBACK}:{peer}",
                "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{peer}",
                "--initial-cluster", peers,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                # Fast elections: a killed leader is replaced within about a second.
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--logger", "zap",
                "--log-level", "warn",
            ]  # fmt: skip
            proc = ManagedProcess(f"etcd-{name}", argv, workdir / f"{token}-{name}.log", workdir)
            members.append(EtcdMember(name, client, peer, data_dir, proc))
    except BaseException:
        for member in members:
            member.proc.stop()
        raise
    return members


def start_etcd_cluster(
    workdir: Path, size: int = 1, timeout: float = 20.0, attempts: int = 3
) -> EtcdCluster:
    """Start ``size`` members forming one cluster and wait until every member is healthy
    (a leader is elected). Retries on fresh ports when a member dies during startup."""
    workdir.mkdir(parents=True, exist_ok=True)
    last = ""
    for attempt in range(attempts):
        members = _launch(workdir, size, f"ubimesh-{os.getpid()}-{attempt}-{time.time_ns()}")
        cluster = EtcdCluster(members)
        deadline = time.monotonic() + timeout
        pending = list(members)
        dead = False
        while pending and time.monotonic() < deadline:
            if any(not m.proc.alive for m in members):
                dead = True
                break
            pending = [m for m in pending if not _healthy(m.client_port)]
            if pending:
                time.sleep(0.05)
        if not pending and not dead:
            return cluster
        last = cluster.describe()
        cluster.stop()
        if not dead:
            break  # alive but not healthy in time: fresh ports would not help
    raise ProcessStartError(f"etcd cluster of {size} did not become healthy\n{last}")


@contextlib.contextmanager
def etcd_cluster(workdir: Path, size: int = 1) -> Iterator[EtcdCluster]:
    cluster = start_etcd_cluster(workdir, size)
    try:
        yield cluster
    finally:
        cluster.stop()
