"""Upstreams to break, for resilience tests: a TCP echo server and upstream processes.

* :class:`TcpEchoServer`: an in-process TCP server (one thread per connection) that sends back
  every byte it receives; the simplest upstream to measure a fault proxy against.
* :func:`start_echo_process`: the HTTP echo upstream (:mod:`tests.support.echo_upstream`) as a
  child process, returned as a :class:`~tests.support.procs.ManagedProcess` with its port, so a
  test can :meth:`~tests.support.procs.ManagedProcess.kill`, ``pause`` (SIGSTOP) and ``resume``
  (SIGCONT) it.  ``prefix`` runs it under another command, e.g. ``ip netns exec NS``.
* :func:`start_faultproxy_process`: ``python -m ubimesh.testing.faultproxy`` as a child process,
  with a :class:`~ubimesh.testing.faultproxy.FaultProxyClient` on its control port.

Every socket operation has a timeout and every wait a deadline.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.procs import LOOPBACK, ManagedProcess, ProcessStartError
from ubimesh.testing.faultproxy import FaultProxyClient

__all__ = [
    "TcpEchoServer",
    "start_echo_process",
    "start_faultproxy_process",
    "wait_log_line",
]

REPO = Path(__file__).resolve().parents[2]
IO_TIMEOUT_S = 30.0


class TcpEchoServer:
    """Echoes every byte back on each connection; counts connections.  ``with`` stops it."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.2)  # so that the accept loop sees stop() in bounded time
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="tcp-echo", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT_S)
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
                thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() at once (Linux)
        self._sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._acceptor.join(5)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> TcpEchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_log_line(proc: ManagedProcess, timeout: float = 15.0) -> str:
    """The first complete line the process wrote to its log (waits, bounded, for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = proc.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        if "\n" in text:
            return text.split("\n", 1)[0]
        if not proc.alive:
            raise ProcessStartError(f"{proc.name} exited before printing\n{proc.describe()}")
        time.sleep(0.02)
    raise ProcessStartError(f"{proc.name} printed nothing in {timeout} s\n{proc.describe()}")


def start_echo_process(
    workdir: Path,
    name: str = "echo",
    host: str = LOOPBACK,
    prefix: Sequence[str] = (),
    port: int = 0,
    extra: Sequence[str] = (),
    log_name: str = "",
) -> tuple[ManagedProcess, int]:
    """Start the HTTP echo upstream as a process (under ``prefix``); returns it and its port.

    ``port`` 0 picks a free one (give the old port to restart a killed upstream in place);
    ``extra`` are more echo_upstream options (``--status 503``, ``--log-requests``); the log
    goes to ``workdir/<log_name or name>.log``.
    """
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "tests.support.echo_upstream",
        "--host",
        host,
        "--port",
        str(port),
        "--name",
        name,
        *extra,
    ]
    proc = ManagedProcess(name, argv, workdir / f"{log_name or name}.log", REPO)
    try:
        line = wait_log_line(proc)
        return proc, int(line.strip())
    except BaseException:
        proc.stop()
        raise


def start_faultproxy_process(
    upstream: tuple[str, int], workdir: Path, name: str = "faultproxy"
) -> tuple[ManagedProcess, int, FaultProxyClient]:
    """Start the fault proxy CLI; returns the process, its listen port and a control client."""
    argv = [
        sys.executable,
        "-m",
        "ubimesh.testing.faultproxy",
        "--listen",
        f"{LOOPBACK}:0",
        "--upstream",
        f"{upstream[0]}:{upstream[1]}",
        "--control",
        f"{LOOPBACK}:0",
        "--name",
        name,
    ]
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", REPO)
    try:
        ports = json.loads(wait_log_line(proc))
        return proc, int(ports["listen"]), FaultProxyClient(LOOPBACK, int(ports["control"]))
    except BaseException:
        proc.stop()
        raise
