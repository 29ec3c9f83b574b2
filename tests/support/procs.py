"""Start, watch and stop proxy processes (Envoy and ubimesh) for tests.

Everything here waits with a deadline, and every process is started in its own session so that
:meth:`ManagedProcess.stop` can end it, and only it, by process group id.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "ManagedProcess",
    "ProcessStartError",
    "admin_get",
    "envoy_binary",
    "free_ports",
    "launch_envoy",
    "launch_ubimesh",
    "port_accepts",
    "start_envoy",
    "start_ubimesh",
    "ubimesh_available",
    "wait_ready",
]

LOOPBACK = "127.0.0.1"
_base_ids = itertools.count(1)


class ProcessStartError(RuntimeError):
    """A process did not come up; the message carries the end of its log."""


#: The test servers' ports: below Linux's ephemeral range (32768-60999 by default). A port
#: picked there and closed again could be taken by any outgoing connection (gRPC, HTTP
#: clients) before the server meant to listen on it binds it; below the range only another
#: listener can take it.
_TEST_PORTS = (20000, 32768)


def _worker_slice(full: tuple[int, int]) -> tuple[int, int]:
    """This process's share of ``full``: all of it, or the slice of xdist worker ``gwK``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count <= 1:
        return full
    k = int(worker[2:]) % count
    size = (full[1] - full[0]) // count
    return (full[0] + k * size, full[0] + (k + 1) * size)


#: Where free_ports looks: this process's slice of ``_TEST_PORTS``. Under pytest-xdist each
#: worker has its own, so two workers never hand out the same port (the memory below is per
#: process).
FREE_PORT_RANGE = _worker_slice(_TEST_PORTS)
_RNG = random.Random()
#: Ports handed out lately by this process, oldest first. A port picked by one call and not yet
#: bound by its server looks free to the next call; without this memory two calls (say, a
#: sidecar's inbound ports and then the admin ports) could hand out the same port, and the
#: second server to bind it fails with "address in use". A quarter of the range is remembered,
#: so a port comes round again only after thousands of others.
_RECENT_LIMIT = (FREE_PORT_RANGE[1] - FREE_PORT_RANGE[0]) // 4
_recent: collections.OrderedDict[int, None] = collections.OrderedDict()


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that were free a moment ago.

    The sockets are held open until all are picked, so the ports are distinct, and no port
    handed out by an earlier call in this process (among the last ``_RECENT_LIMIT``) is handed
    out again. After the sockets close another process may take one, which is why starters
    retry with fresh ports.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(200 * count):  # bounded: a busy machine still has most of the range free
            if len(socks) == count:
                break
            port = _RNG.randrange(*FREE_PORT_RANGE)
            if port in _recent:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < count:
            raise OSError(f"no {count} free ports in {FREE_PORT_RANGE} on {host}")
        ports = [s.getsockname()[1] for s in socks]
        for port in ports:
            _recent[port] = None
        while len(_recent) > _RECENT_LIMIT:
            _recent.popitem(last=False)
        return ports
    finally:
        for s in socks:
            s.close()


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def admin_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def envoy_binary() -> str | None:
    return shutil.which("envoy")


def ubimesh_available() -> tuple[bool, str]:
    """Whether ``ubimesh proxy --help`` runs; the second item is its output on failure."""
    exe = shutil.which("ubimesh")
    if exe is None:
        return False, "no ubimesh executable on PATH"
    try:
        done = subprocess.run(
            [exe, "proxy", "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return False, "`ubimesh proxy --help` did not finish within 30 s"
    if done.returncode != 0:
        return False, (done.stdout + done.stderr).strip()[-2000:]
    return True, ""


class ManagedProcess:
    """A child process whose stdout and stderr go to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        if len(text) > max_chars:
            text = "...\n" + text[-max_chars:]
        return text

    def describe(self) -> str:
        state = "running" if self.alive else f"exited with {self.popen.returncode}"
        return (
            f"{self.name} (pid {self.pid}, {state})\n  command: {' '.join(self.argv)}\n"
            f"  log {self.log_path}:\n{_indent(self.log_tail())}"
        )

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it if it has not exited after ``timeout``."""
        try:
            if self.alive:
                self._signal(signal.SIGTERM)
                self._signal(signal.SIGCONT)  # a paused (SIGSTOPped) process must see the TERM
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.popen.wait(timeout=timeout)
            # Children of the process (none expected) share its group; make sure they go too.
            self._signal(signal.SIGKILL)
        finally:
            self._log.close()
        return self.popen.returncode

    # Faults for resilience tests: the process group gets the signal, as from a crash or a
    # hung host; stop() still ends the process afterwards.

    def kill(self, timeout: float = 5.0) -> int | None:
        """SIGKILL the process group (a crash: no clean shutdown) and wait, bounded, for it."""
        self._signal(signal.SIGKILL)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def pause(self) -> None:
        """SIGSTOP the process group: its sockets stay open (the kernel still completes
        handshakes into the listen backlog) but nothing is read or answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process group after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _listening_ports(pid: int) -> set[int] | None:
    """TCP ports the process (or its children) listens on; None if that cannot be known."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        ports: set[int] = set()
        for proc in procs:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    ports.add(conn.laddr.port)
        return ports
    except (psutil.Error, OSError):
        return None


def wait_ready(
    proc: ManagedProcess,
    admin_port: int,
    listener_ports: Iterable[int],
    timeout: float = 20.0,
) -> None:
    """Wait until admin ``/ready`` answers 200 and every listener port accepts connections.

    The process must still be alive after both checks, and (where psutil can tell) must own the
    listening sockets: a port that answers while our process has not bound it belongs to
    somebody else, which is reported as "address in use" so that callers retry on new ports.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not proc.alive:
            raise ProcessStartError(f"{proc.name} exited during startup\n{proc.describe()}")
        try:
            status, body = admin_get(admin_port, "/ready", timeout=0.5)
            last = f"/ready answered {status} {body[:80]!r}"
            if status == 200:
                break
        except (OSError, http.client.HTTPException) as exc:
            last = f"/ready: {exc!r}"
        time.sleep(0.03)
    else:
        raise ProcessStartError(
            f"{proc.name} not ready after {timeout} s ({last})\n{proc.describe()}"
        )
    listener_ports = list(listener_ports)
    for port in listener_ports:
        while not port_accepts(port):
            if not proc.alive:
                raise ProcessStartError(f"{proc.name} exited during startup\n{proc.describe()}")
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"{proc.name}: listener port {port} does not accept after {timeout} s\n"
                    f"{proc.describe()}"
                )
            time.sleep(0.03)
    if not proc.alive:
        raise ProcessStartError(f"{proc.name} exited during startup\n{proc.describe()}")
    wanted = {admin_port, *listener_ports}
    owned = _listening_ports(proc.pid)
    if owned is not None and not wanted <= owned:
        raise ProcessStartError(
            f"{proc.name}: ports {sorted(wanted - owned)} answer but are not bound by it "
            f"(address in use by another process?)\n{proc.describe()}"
        )


def launch_envoy(
    config_path: Path, workdir: Path, name: str = "envoy", log_level: str = "warn"
) -> ManagedProcess:
    """Start Envoy on ``config_path`` without waiting for it (see :func:`wait_ready`).

    ``--disable-hot-restart`` keeps Envoy off the shared memory and domain socket that hot
    restart uses, which is what lets several Envoys run side by side; the unique ``--base-id``
    is belt and braces for the same purpose.
    """
    exe = envoy_binary()
    if exe is None:
        raise ProcessStartError("no envoy binary on PATH")
    base_id = (os.getpid() % 10_000) * 100 + next(_base_ids) % 100
    argv = [
        exe,
        "-c",
        str(config_path),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--base-id",
        str(base_id),
        "-l",
        log_level,
        "--drain-time-s",
        "0",
    ]
    return ManagedProcess(name, argv, workdir / f"{name}.log", workdir)


def launch_ubimesh(
    config_path: Path, workdir: Path, name: str = "ubimesh", log_level: str = "warning"
) -> ManagedProcess:
    """Start ``ubimesh proxy`` on ``config_path`` without waiting for it."""
    exe = shutil.which("ubimesh")
    if exe is None:
        raise ProcessStartError("no ubimesh executable on PATH")
    argv = [exe, "proxy", "-c", str(config_path), "--concurrency", "1", "-l", log_level]
    return ManagedProcess(name, argv, workdir / f"{name}.log", workdir)


def _start(
    proc: ManagedProcess, admin_port: int, listener_ports: Iterable[int], timeout: float
) -> ManagedProcess:
    try:
        wait_ready(proc, admin_port, listener_ports, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_envoy(
    config_path: Path,
    admin_port: int,
    listener_ports: Iterable[int],
    workdir: Path,
    name: str = "envoy",
    log_level: str = "warn",
    timeout: float = 20.0,
) -> ManagedProcess:
    """Start Envoy on ``config_path`` and wait until it serves."""
    proc = launch_envoy(config_path, workdir, name, log_level)
    return _start(proc, admin_port, listener_ports, timeout)


def start_ubimesh(
    config_path: Path,
    admin_port: int,
    listener_ports: Iterable[int],
    workdir: Path,
    name: str = "ubimesh",
    log_level: str = "warning",
    timeout: float = 20.0,
) -> ManagedProcess:
    """Start ``ubimesh proxy`` on ``config_path`` and wait until it serves."""
    proc = launch_ubimesh(config_path, workdir, name, log_level)
    return _start(proc, admin_port, listener_ports, timeout)
