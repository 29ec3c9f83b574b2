"""How steady the machine's own speed is: the same fixed piece of work, timed again and again
on one core (``probe``), summarised in one line for the report (``line``).

Why: on a shared VM the time a fixed loop takes moves by up to 2x within seconds, with no
steal time reported and nothing else running in the guest (measured 2026-11-27: 60 to 118
ms for one loop, 40 tries 0.2 s apart). A comparison of two proxies measured at different
moments carries that drift; the report shows it beside the figures so a reader can tell
how far apart two sequential measurements may be for reasons outside the proxy.

The loop runs in a child interpreter pinned to the core (``taskset``), so the bench's own
process and its threads are not what is timed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from benchlib.procs import pinned

#: One try: a pure-Python loop of this many additions (about 60 ms on the 2026 bench VM),
#: long enough that timer resolution does not matter, short enough to see sub-second drift.
STEPS = 2_000_000

_CHILD = """
import json, sys, time

def loop(steps):
    s = 0
    for i in range(steps):
        s += i
    return s

steps, tries, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out = []
for _ in range(tries):
    t = time.perf_counter()
    loop(steps)
    out.append((time.perf_counter() - t) * 1000.0)
    time.sleep(gap)
print(json.dumps(out))
"""


def probe(cpu: int, tries: int = 30, gap: float = 0.2, steps: int = STEPS) -> list[float]:
    """Milliseconds per try of the fixed loop, ``tries`` times ``gap`` seconds apart, on
    ``cpu``. Bounded: the child is killed after 10 s per try."""
    if tries < 1:
        raise ValueError(f"tries must be at least 1, got {tries}")
    argv = pinned(cpu, [sys.executable, "-c", _CHILD, str(steps), str(tries), str(gap)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10.0 * tries, check=True)
    times = json.loads(done.stdout)
    if not isinstance(times, list) or len(times) != tries:
        raise ValueError(f"the speed probe printed {done.stdout!r}, not {tries} times")
    return [float(t) for t in times]


def line(cpu: int, times: list[float]) -> str:
    """One line for the report's header: how many tries, their median and range in ms, and
    the slowest over the fastest (1.0: a steady machine); "" without tries."""
    if not times:
        return ""
    fastest, slowest = min(times), max(times)
    return (
        f"a fixed loop ({STEPS:,} additions) on cpu {cpu}, {len(times)} tries: median "
        f"{statistics.median(times):.1f} ms, {fastest:.1f}..{slowest:.1f} "
        f"(slowest/fastest {slowest / fastest:.2f})"
    )
