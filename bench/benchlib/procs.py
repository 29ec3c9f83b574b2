"""Starting, watching, measuring and stopping the processes of a benchmark run.

Every process is started in its own session (so its own process group) and is recorded in a
``ProcessRegistry``. ``ProcessRegistry.stop_all`` ends them, and their descendants, by pid;
run.py calls it from a ``finally`` block, so it also runs on errors and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


class BenchError(RuntimeError):
    """A failure that aborts the benchmark with a readable message."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``taskset -c cpu`` (taskset execs, so the pid is kept)."""
    return ["taskset", "-c", str(cpu), *argv]


@dataclass
class Managed:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessRegistry:
    """Owns every long-running process the benchmark starts."""

    def __init__(self) -> None:
        self._procs: list[Managed] = []
        self._lock = threading.Lock()

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path) -> Managed:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        managed = Managed(name, list(argv), popen, log_path)
        with self._lock:
            self._procs.append(managed)
        return managed

    def stop(self, managed: Managed, timeout: float = 5.0) -> None:
        """SIGTERM the process and its descendants, then SIGKILL whatever is left."""
        with self._lock:
            if managed in self._procs:
                self._procs.remove(managed)
        victims = _descendants(managed.pid)
        if managed.alive():
            _signal_pid(managed.pid, signal.SIGTERM)
        for proc in victims:
            _signal_pid(proc.pid, signal.SIGTERM)
        try:
            managed.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_pid(managed.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                managed.popen.wait(timeout=timeout)
        _gone, still = psutil.wait_procs(victims, timeout=timeout)
        for proc in still:
            _signal_pid(proc.pid, signal.SIGKILL)
        psutil.wait_procs(still, timeout=timeout)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for managed in procs:
            with contextlib.suppress(Exception):
                self.stop(managed)


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


# --------------------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    managed: Managed | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it returns True; fail after ``timeout`` or if the process exits."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if managed is not None and not managed.alive():
            raise BenchError(
                f"{managed.name} exited with {managed.popen.returncode} while waiting for "
                f"{what}; log tail:\n{managed.log_tail()}"
            )
        try:
            if check():
                return
        except (OSError, urllib.error.URLError) as exc:
            last_error = exc
        time.sleep(interval)
    tail = f"; log tail:\n{managed.log_tail()}" if managed is not None else ""
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what} ({last_error}){tail}")


def answers_http(url: str) -> Callable[[], bool]:
    """A check that passes once ``url`` answers with any HTTP status."""

    def check() -> bool:
        http_get(url)
        return True

    return check


def answers_200(url: str, body_len: int | None = None) -> Callable[[], bool]:
    """A check that passes once ``url`` answers 200 (with ``body_len`` bytes, if given)."""

    def check() -> bool:
        status, body = http_get(url)
        return status == 200 and (body_len is None or len(body) == body_len)

    return check


# --------------------------------------------------------------------------------------
# Measuring a process tree
# --------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@dataclass
class CpuSnapshot:
    at: float
    seconds: float
    pids: frozenset[int]


def cpu_snapshot(pid: int) -> CpuSnapshot:
    """utime+stime summed over the process and all its descendants."""
    total = 0.0
    pids = set()
    for proc in process_tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
        pids.add(proc.pid)
    return CpuSnapshot(time.monotonic(), total, frozenset(pids))


def cpu_snapshot_all(pids: Sequence[int]) -> CpuSnapshot:
    """``cpu_snapshot`` summed over several process trees (the two proxies of a pair)."""
    snaps = [cpu_snapshot(pid) for pid in pids]
    return CpuSnapshot(
        time.monotonic(),
        sum(s.seconds for s in snaps),
        frozenset().union(*(s.pids for s in snaps)),
    )


@dataclass
class MemSample:
    rss: int
    pss: int | None


def mem_sample(pid: int) -> MemSample:
    """RSS and PSS summed over the tree (PSS splits shared pages between processes)."""
    rss = 0
    pss: int | None = 0
    for proc in process_tree(pid):
        try:
            info = proc.memory_full_info()
        except psutil.AccessDenied:
            try:
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
            pss = None
            continue
        except psutil.Error:
            continue
        rss += info.rss
        if pss is not None:
            pss += getattr(info, "pss", 0)
    return MemSample(rss, pss)


def cpu_affinities(pid: int) -> list[list[int]]:
    out = []
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            out.append(sorted(proc.cpu_affinity()))
    return out


@dataclass
class MemSampler:
    """Samples the memory of a process tree once per ``interval`` in a thread."""

    pid: int
    interval: float = 1.0
    samples: list[MemSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemSampler:
        self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(psutil.Error):
            self.samples.append(mem_sample(self.pid))

    def _loop(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.samples.append(mem_sample(self.pid))
            if self._stop.wait(self.interval):
                return

    def max_rss(self) -> int | None:
        return max((s.rss for s in self.samples), default=None)

    def max_pss(self) -> int | None:
        values = [s.pss for s in self.samples if s.pss is not None]
        return max(values, default=None)


def core_busy(before: Sequence[object], after: Sequence[object], cpu: int) -> float | None:
    """Percent of wall time that ``cpu`` was busy between two ``psutil.cpu_times(percpu)``."""
    if cpu >= len(before) or cpu >= len(after):
        return None
    b, a = before[cpu], after[cpu]
    total = sum(a) - sum(b)  # type: ignore[call-overload]
    idle = (a.idle - b.idle) + (getattr(a, "iowait", 0.0) - getattr(b, "iowait", 0.0))  # type: ignore[attr-defined]
    if total <= 0:
        return None
    return 100.0 * (total - idle) / total


def wait_for_quiet(
    cpus: Sequence[int], threshold: float, timeout: float, window: float = 1.0
) -> float:
    """Wait until every core in ``cpus`` is less than ``threshold`` % busy over ``window``.

    Called while the benchmark's own processes are idle, so what it sees is other work on
    the machine. Returns the busiest core's percentage at the last check (which is above
    ``threshold`` if ``timeout`` ran out first).
    """
    deadline = time.monotonic() + timeout
    while True:
        before = psutil.cpu_times(percpu=True)
        time.sleep(window)
        after = psutil.cpu_times(percpu=True)
        busy = max((core_busy(before, after, cpu) or 0.0) for cpu in cpus)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
