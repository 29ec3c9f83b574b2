"""Run ``ubimesh control`` replicas and control-plane proxies for tests.

- :func:`start_control`: a ``ubimesh control`` child (ports 0); its bound addresses come from
  the ``control.json`` it writes (docs/cli.md), and :class:`ControlReplica` calls its API.
- :func:`start_mesh_proxy`: a ``ubimesh proxy`` from a generated bootstrap that lists one or
  more replicas' xDS addresses (the ADS client rotates through them on reconnect).
- :class:`RequestLoop`: a background thread sending keep-alive GETs through a port, counting
  failures, bounded in count and time.
- :func:`wait_for`: poll a condition with a deadline.

Every process runs in its own session (``ManagedProcess``) and is stopped by its group id.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import LOOPBACK, ManagedProcess, ProcessStartError, free_ports, wait_ready
from ubimesh.control.bootstrap import build_bootstrap, parse_address

__all__ = [
    "ControlReplica",
    "RequestLoop",
    "start_control",
    "start_mesh_proxy",
    "wait_for",
]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0,
             interval: float = 0.05) -> float:
    """Poll ``check`` until true; AssertionError naming ``what`` after ``timeout`` seconds.

    Returns the seconds it took.
    """
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return time.monotonic() - started


@dataclass
class ControlReplica:
    """A running ``ubimesh control``: its process, addresses (from control.json) and token."""

    proc: ManagedProcess
    data_dir: Path
    api: str
    xds: str
    replica: str
    token: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def xds_address(self) -> tuple[str, int]:
        return parse_address(self.xds)

    def call(self, method: str, path: str, body: str | None = None,
             timeout: float = 10.0) -> Any:
        """One API request; the JSON answer. An HTTP error raises AssertionError with its
        body (which names the problem)."""
        request = urllib.request.Request(
            self.api + path, data=body.encode() if body is not None else None, method=method,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(
                f"{method} {path} on {self.api}: HTTP {exc.code}: {exc.read()[:2000]!r}"
            ) from None

    def apply(self, text: str) -> Any:
        return self.call("POST", "/api/v1/apply", text)

    def join_token(self, identity: str, ttl: str = "5m") -> str:
        """A one-time join token for ``identity`` (``ubimesh token create``)."""
        answer = self.call("POST", "/api/v1/identity/tokens",
                           json.dumps({"identity": identity, "ttl": ttl}))
        return str(answer["token"])

    def items(self, kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.call("GET", f"/api/v1/resources/{kind}")["items"]
        return items

    def proxies(self) -> dict[str, dict[str, Any]]:
        """The proxies connected to this replica, by node id."""
        return {p["id"]: p for p in self.call("GET", "/api/v1/proxies")["items"]}

    def kill(self) -> None:
        """SIGKILL the replica (a crash: nothing is cleaned up) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stop(timeout=5.0)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean stop), SIGKILL after ``timeout``; the exit code."""
        return self.proc.stop(timeout=timeout)

    def describe(self) -> str:
        return self.proc.describe()


@contextlib.contextmanager
def control_plane(workdir: Path, name: str = "control", **kwargs: Any) -> Iterator[ControlReplica]:
    """:func:`start_control` for the ``with`` block (a fixture's body); stopped after it."""
    replica = start_control(workdir, name, **kwargs)
    try:
        yield replica
    finally:
        replica.stop()


def start_control(
    workdir: Path,
    name: str = "control",
    *,
    store_url: str = "",
    token_file: Path | None = None,
    grace: float | None = None,
    timeout: float = 20.0,
    extra: Sequence[str] = (),
) -> ControlReplica:
    """Start ``ubimesh control`` with its data dir ``workdir/name`` on 127.0.0.1 port 0 and
    wait (bounded) for its control.json. ``store_url`` "" is SQLite in the data dir; replicas
    sharing a store should share ``token_file`` so one token works on all of them."""
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ubimesh.cli.main", "control", "--data-dir", str(data_dir),
            "--api-address", f"{LOOPBACK}:0", "--xds-address", f"{LOOPBACK}:0", "-l", "info"]
    if store_url:
        argv += ["--store", store_url]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    if grace is not None:
        argv += ["--registration-grace", str(grace)]
    argv += list(extra)
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", workdir)
    addresses = data_dir / "control.json"
    try:
        deadline = time.monotonic() + timeout
        while not addresses.exists():
            if not proc.alive:
                raise ProcessStartError(f"{name} exited during startup\n{proc.describe()}")
            if time.monotonic() > deadline:
                raise ProcessStartError(f"{name}: no {addresses} after {timeout} s\n"
                                        f"{proc.describe()}")
            time.sleep(0.05)
        info = json.loads(addresses.read_text())
        token_path = token_file if token_file is not None else data_dir / "admin-token"
        token = token_path.read_text().strip()
    except BaseException:
        proc.stop()
        raise
    return ControlReplica(proc, data_dir, str(info["api"]), str(info["xds"]),
                          str(info.get("replica", "")), token)


def start_mesh_proxy(
    workdir: Path,
    node: str,
    role: str,
    xds: Sequence[str],
    *,
    workload: Mapping[str, Any] | None = None,
    listen_ports: Sequence[int] = (),
    wait: bool = True,
    log_level: str = "info",
    timeout: float = 20.0,
) -> tuple[ManagedProcess, int]:
    """Start ``ubimesh proxy`` for ``node`` on a bootstrap listing the control plane ``xds``
    addresses ("HOST:PORT", in the order the proxy tries them); its ADS cache lives in
    ``workdir`` (never another run's). With ``wait``, returns once admin ``/ready`` is 200 and
    every ``listen_ports`` accepts. Returns the process and its admin port."""
    (admin,) = free_ports(1)
    bootstrap = build_bootstrap(node_id=node, role=role, admin_port=admin, workload=workload,
                                xds=[parse_address(a, what="xds") for a in xds])
    path = workdir / f"{node}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    proc = ManagedProcess(
        node,
        [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(path), "-l", log_level,
         "--drain-time-s", "0", "--xds-cache-dir", str(workdir / f"{node}.xds-cache")],
        workdir / f"{node}.log", workdir,
    )
    if wait:
        try:
            wait_ready(proc, admin, listen_ports, timeout)
        except BaseException:
            proc.stop()
            raise
    return proc, admin


@dataclass
class Outcome:
    """One request of a :class:`RequestLoop`."""

    at: float  # time.monotonic() when it finished
    status: int  # 0: no response
    headers: dict[str, str]  # lower-cased names
    body: bytes
    error: str = ""


@dataclass
class RequestLoop:
    """GET ``path`` through ``127.0.0.1:port`` over one keep-alive connection, again and again,
    in a thread, until :meth:`stop`, ``max_requests`` or ``max_seconds``.

    Any answer other than ``ok_status``, a timeout (``request_timeout``) or a connection error
    is a failure; after an error the connection is opened again. ``outcomes`` keeps the last
    ``keep`` outcomes; ``failures`` every failure (bounded by ``max_requests``).
    """

    port: int
    path: str = "/"
    host: str = "ha.test"
    ok_status: int = 200
    request_timeout: float = 2.0
    pause: float = 0.01
    max_requests: int = 20_000
    max_seconds: float = 60.0
    keep: int = 2_000
    sent: int = 0
    failures: list[Outcome] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> RequestLoop:
        self._thread = threading.Thread(target=self._run, name="request-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.request_timeout + 5.0)
            assert not self._thread.is_alive(), "the request loop did not stop"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def since(self, started: float) -> list[Outcome]:
        """The kept outcomes that finished after ``started`` (a time.monotonic())."""
        with self._lock:
            return [o for o in self.outcomes if o.at > started]

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.sent += 1
            self.outcomes.append(outcome)
            if len(self.outcomes) > self.keep:
                del self.outcomes[: len(self.outcomes) - self.keep]
            if outcome.error or outcome.status != self.ok_status:
                self.failures.append(outcome)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn: http.client.HTTPConnection | None = None
        try:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                if conn is None:
                    conn = http.client.HTTPConnection(LOOPBACK, self.port,
                                                      timeout=self.request_timeout)
                current = conn
                try:
                    current.request("GET", self.path, headers={"Host": self.host})
                    response = current.getresponse()
                    body = response.read()
                    headers = {k.lower(): v for k, v in response.getheaders()}
                    self._record(Outcome(time.monotonic(), response.status, headers, body))
                    if response.will_close:
                        current.close()
                        conn = None
                except (OSError, http.client.HTTPException) as exc:
                    self._record(Outcome(time.monotonic(), 0, {}, b"",
                                         f"{type(exc).__name__}: {exc}"))
                    current.close()
                    conn = None
                self._stop.wait(self.pause)
        finally:
            if conn is not None:
                conn.close()
