"""Running the load generators (wrk closed loop, h2load fixed rate) and parsing their output.

``run_tool`` calls ``on_start``/``on_end`` exactly around the measured part of a run, so the
caller can take CPU snapshots of the proxy there:

* wrk: right before it is started and right after it exits (wrk has no warm-up phase; the
  caller runs a separate, discarded wrk run first);
* h2load: when it prints that the main duration has started and that it is over, so the
  ``--warm-up-time`` phase is excluded, as it is from h2load's own counters and its log.

The load generator's own CPU time (from ``wait4``'s rusage) is returned too.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.procs import BenchError, pinned

H2LOAD_MAIN_START = "Main benchmark duration is started"
H2LOAD_MAIN_END = "Main benchmark duration is over"


@dataclass
class LoadResult:
    tool: str
    argv: list[str]
    conns: int
    requested_rps: float | None
    duration_s: float
    completed: int
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    non2xx: int
    socket_errors: int
    error_detail: str
    gen_cpu_s: float
    output: str = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ToolRun:
    output: str
    returncode: int
    cpu_s: float
    saw_start: bool
    saw_end: bool


def run_tool(
    argv: Sequence[str],
    timeout: float,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
    start_marker: str | None = None,
    end_marker: str | None = None,
) -> ToolRun:
    """Run a load generator to completion, calling the hooks around its measured phase."""
    on_start = on_start or (lambda: None)
    on_end = on_end or (lambda: None)
    if start_marker is None:
        on_start()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    timed_out = threading.Event()

    def watchdog() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    lines: list[str] = []
    saw_start = start_marker is None
    saw_end = False
    reaped = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not saw_start and start_marker is not None and start_marker in line:
                saw_start = True
                on_start()
            elif saw_start and not saw_end and end_marker is not None and end_marker in line:
                saw_end = True
                on_end()
        _pid, status, rusage = os.wait4(proc.pid, 0)
        reaped = True
        proc.returncode = os.waitstatus_to_exitcode(status)
        if not saw_end:
            if saw_start and end_marker is None:
                saw_end = True
            on_end()
    finally:
        timer.cancel()
        if not reaped:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    output = "".join(lines)
    if timed_out.is_set():
        raise BenchError(f"{argv[0]} timed out after {timeout:.0f}s: {' '.join(argv)}")
    return ToolRun(
        output=output,
        returncode=proc.returncode,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        saw_start=saw_start,
        saw_end=saw_end,
    )


# --------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def wrk_argv(cpu: int, url: str, conns: int, duration: int) -> list[str]:
    return pinned(cpu, ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", url])


def parse_wrk(output: str) -> dict[str, Any]:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    completed = int(m.group(1))
    duration_s = _to_ms(m.group(2), m.group(3)) / 1e3
    rps_m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    rps = float(rps_m.group(1)) if rps_m else completed / max(duration_s, 1e-9)
    pct = {
        int(p): _to_ms(v, u)
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    }
    non2xx_m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    socket_errors = sum(int(x) for x in sock.groups()) if sock else 0
    return {
        "completed": completed,
        "duration_s": duration_s,
        "rps": rps,
        "p50_ms": pct.get(50),
        "p90_ms": pct.get(90),
        "p99_ms": pct.get(99),
        "non2xx": int(non2xx_m.group(1)) if non2xx_m else 0,
        "socket_errors": socket_errors,
        "error_detail": sock.group(0) if sock else "",
    }


def run_wrk(
    cpu: int,
    url: str,
    conns: int,
    duration: int,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> LoadResult:
    argv = wrk_argv(cpu, url, conns, duration)
    run = run_tool(argv, timeout=duration + 30, on_start=on_start, on_end=on_end)
    if run.returncode != 0:
        raise BenchError(f"wrk exited with {run.returncode}:\n{run.output}")
    parsed = parse_wrk(run.output)
    return LoadResult(
        tool="wrk",
        argv=argv,
        conns=conns,
        requested_rps=None,
        gen_cpu_s=run.cpu_s,
        output=run.output,
        **parsed,
    )


# --------------------------------------------------------------------------------------
# h2load
# --------------------------------------------------------------------------------------


def h2load_argv(
    cpu: int, url: str, conns: int, rps: float, duration: int, warmup: int, log_file: Path
) -> list[str]:
    per_client = rps / conns
    return pinned(
        cpu,
        [
            "h2load",
            "--h1",
            "-t",
            "1",
            "-c",
            str(conns),
            "--rps",
            f"{per_client:g}",
            "-D",
            str(duration),
            "--warm-up-time",
            str(warmup),
            "--log-file",
            str(log_file),
            url,
        ],
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse_h2load(output: str, log_file: Path, duration: int) -> dict[str, Any]:
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if not req or not codes:
        raise BenchError(f"cannot parse h2load output:\n{output}")
    _total, _started, done, _ok, failed, errored, timeouts = (int(x) for x in req.groups())
    s2xx = int(codes.group(1))
    latencies: list[float] = []
    with contextlib.suppress(FileNotFoundError), open(log_file) as fh:
        for line in fh:
            parts = line.split("\t")
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1e3)
    latencies.sort()
    return {
        "completed": done,
        "duration_s": float(duration),
        "rps": done / duration,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "non2xx": done - s2xx,
        "socket_errors": errored + timeouts,
        "error_detail": (
            f"failed {failed}, errored {errored}, timeout {timeouts}"
            if failed or errored or timeouts
            else ""
        ),
    }


def run_h2load(
    cpu: int,
    url: str,
    conns: int,
    rps: float,
    duration: int,
    warmup: int,
    log_file: Path,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> LoadResult:
    argv = h2load_argv(cpu, url, conns, rps, duration, warmup, log_file)
    run = run_tool(
        argv,
        timeout=warmup + duration + 30,
        on_start=on_start,
        on_end=on_end,
        start_marker=H2LOAD_MAIN_START,
        end_marker=H2LOAD_MAIN_END,
    )
    if run.returncode != 0 or not run.saw_start:
        raise BenchError(f"h2load failed (exit {run.returncode}):\n{run.output}")
    parsed = parse_h2load(run.output, log_file, duration)
    return LoadResult(
        tool="h2load",
        argv=argv,
        conns=conns,
        requested_rps=float(rps),
        gen_cpu_s=run.cpu_s,
        output=run.output,
        **parsed,
    )
