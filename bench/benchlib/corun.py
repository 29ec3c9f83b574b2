"""Co-running proxies: several proxies pinned to one core, each driven at the same time by its
own closed-loop wrk on the load core (``together``).

The scheduler gives the proxies equal shares of the same seconds, so a machine whose speed
drifts by tens of percent between the moments that separate runs are measured at slows them
all alike, and the ratio of their request rates in one round is the ratio of their costs per
request. Used by ``run.py`` (the telemetry scenario's cross-check) and by
``telemetry_cpu.py --corun``, so that both measure the same way.
"""

from __future__ import annotations

import subprocess

from benchlib.loads import parse_wrk, wrk_argv
from benchlib.procs import cpu_snapshot


def together(
    proxies: dict[str, tuple[int | None, str]], load_cpu: int, conns: int, duration: int
) -> dict[str, dict[str, float]]:
    """Load every proxy (name: (pid, url)) at once for ``duration`` seconds, one wrk each with
    ``conns`` connections pinned to ``load_cpu``. Returns per name ``rps`` (wrk's) and
    ``cpu_share``: the proxy's CPU seconds (its process tree) per second of the round."""
    before = {n: cpu_snapshot(pid) for n, (pid, _url) in proxies.items() if pid}
    loads = {
        n: subprocess.Popen(
            wrk_argv(load_cpu, url, conns, duration),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for n, (_pid, url) in proxies.items()
    }  # fmt: skip
    texts = {n: p.communicate(timeout=duration + 60)[0] for n, p in loads.items()}
    got: dict[str, dict[str, float]] = {}
    for n, (pid, _url) in proxies.items():
        start = before.get(n)
        share = 0.0
        if pid and start is not None:
            after = cpu_snapshot(pid)
            if after.at > start.at:
                share = (after.seconds - start.seconds) / (after.at - start.at)
        got[n] = {"rps": float(parse_wrk(texts[n])["rps"]), "cpu_share": share}
    return got
