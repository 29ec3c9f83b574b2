"""Scenario S10 (docs/reliability.md): circuit breaking under a burst at 10x capacity.

Scaled to a 2-core test machine: the upstream takes 200 ms per request and the cluster allows
10 connections, 10 requests and 5 pending requests, so its capacity is 50 requests/s. The
client offers 500 requests/s (open loop: requests leave on schedule whatever the answers) for
3 s. Pass criteria, as in S10:

* every excess request gets a fast 503 (p99 < 20 ms) marked overloaded (``x-envoy-overloaded``,
  flag UO, counted as ``upstream_rq_pending_overflow`` or ``upstream_rq_active_overflow``
  as Envoy 1.40 counts them), and nothing else fails;
* no unbounded queue: RSS stays within baseline + 64 MiB, the event loop stays responsive
  (admin ``/ready`` p99 < 100 ms, timed every 20 ms from a process of its own);
* admitted requests keep p99 <= 3x the unloaded p99;
* full recovery within 2 s of the burst's end: the breakers close and a request is served at
  baseline speed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvloop
import yaml
from tests.support.bootstrap import FILE, HCM, ROUTER, address, listener, static_cluster
from tests.support.held_upstream import HeldUpstream
from tests.support.lag_probe import LagProbe
from tests.support.procs import (
    LOOPBACK,
    admin_get,
    free_ports,
    start_ubimesh,
    ubimesh_available,
)

SERVICE_TIME = 0.2
LIMITS = {"max_connections": 10, "max_requests": 10, "max_pending_requests": 5}
CAPACITY = LIMITS["max_requests"] / SERVICE_TIME  # requests/s
RATE = 10 * CAPACITY
BURST = 3.0
RSS_BUDGET = 64 * 1024 * 1024
CB = "cluster.svc.circuit_breakers.default."

# timing: its refusal and admin p99 bars (S10) are met on an otherwise quiet machine, not
# beside another test worker (refusals p99 29.5 ms once in CI under two workers).
pytestmark = [pytest.mark.slow, pytest.mark.timing]


def _bootstrap(admin: int, port: int, upstream: int, log: Path) -> dict[str, Any]:
    hcm = {
        "@type": HCM,
        "stat_prefix": "s10",
        "access_log": [
            {
                "name": "file",
                "typed_config": {
                    "@type": FILE,
                    "path": str(log),
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%RESPONSE_CODE% %RESPONSE_FLAGS%\n"
                        }
                    },
                },
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return {
        "admin": {"address": address(admin)},
        "static_resources": {
            "listeners": [listener("main", port, {"name": "hcm", "typed_config": hcm})],
            "clusters": [
                static_cluster(
                    "svc",
                    [upstream],
                    connect_timeout="2s",
                    circuit_breakers={"thresholds": [LIMITS]},
                )
            ],
        },
    }


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Client:
    """Keep-alive HTTP/1.1 connections to the proxy, opened as needed (at most ``limit``)."""

    def __init__(self, port: int, limit: int = 400) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.limit = limit

    async def get(self) -> tuple[int, bool, float]:
        """(status, overloaded header, seconds) of one GET."""
        start = time.monotonic()
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            assert self.opened < self.limit, "the client needed too many connections"
            self.opened += 1
            reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: s10.test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        await reader.readexactly(int(headers.get("content-length", "0")))
        took = time.monotonic() - start
        if headers.get("connection") == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(lines[0].split()[1]), headers.get("x-envoy-overloaded") == "true", took

    async def warm(self, n: int) -> None:
        """Open ``n`` idle connections before the burst, as a load generator does: a request
        then never waits for a handshake, so a short stall of the machine (a shared 2-core
        VM) cannot snowball into new connections opened mid-burst, each one more accept for
        the proxy's loop (seen once in CI: 150 connections, refusals p99 27 ms)."""
        for _ in range(n):
            self.opened += 1
            self.idle.append(await asyncio.open_connection(LOOPBACK, self.port))

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _sample_rss(proc: psutil.Process, stop: asyncio.Event, out: list[int]) -> None:
    while not stop.is_set():
        out.append(proc.memory_info().rss)
        await asyncio.sleep(0.1)


async def _scenario(port: int, pid: int, probe: LagProbe) -> dict[str, Any]:
    client = Client(port)
    await client.warm(40)
    baseline = [(await client.get())[2] for _ in range(5)]
    proc = psutil.Process(pid)
    rss_before = proc.memory_info().rss
    stop = asyncio.Event()
    rss: list[int] = []
    side = [asyncio.create_task(_sample_rss(proc, stop, rss))]
    tasks = []
    count = int(RATE * BURST)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        delay = start + i / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.get()))
    async with asyncio.timeout(10):
        results = await asyncio.gather(*tasks)
    burst_end = time.monotonic()
    # Recovery: the breakers close and a request is served at baseline speed.
    recovered = None
    while time.monotonic() - burst_end < 5:
        status, _, took = await client.get()
        if status == 200 and took <= 3 * max(baseline):
            recovered = time.monotonic() - burst_end
            break
    stop.set()
    await asyncio.gather(*side)
    client.close()
    return {
        "baseline": baseline,
        "results": results,
        "lags": probe.stop(),
        "rss_before": rss_before,
        "rss": rss,
        "recovered": recovered,
        "connections": client.opened,
    }


def test_burst_at_ten_times_capacity(tmp_path: Path) -> None:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    log = tmp_path / "access.log"
    with HeldUpstream(delay=SERVICE_TIME) as up:
        admin, port = free_ports(2)
        config = tmp_path / "s10.yaml"
        config.write_text(yaml.safe_dump(_bootstrap(admin, port, up.port, log), sort_keys=False))
        proc = start_ubimesh(config, admin, [port], tmp_path, name="s10")
        try:
            # The loop's lag is timed from a process of its own: timed from this one, it
            # would include the lag of the client loop below, busier than the proxy's.
            with LagProbe(admin) as probe:
                got = uvloop.run(_scenario(port, proc.pid, probe))
            status, body = admin_get(admin, "/stats", timeout=5)
            assert status == 200
            stats = dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)
        finally:
            proc.stop()

    results: list[tuple[int, bool, float]] = got["results"]
    admitted = [t for s, _, t in results if s == 200]
    refused = [(over, t) for s, over, t in results if s == 503]
    print(  # shown with -s, and on failure
        f"S10: {len(results)} requests, {len(admitted)} admitted (p99 "
        f"{p99(admitted or [0.0]) * 1000:.0f} ms, baseline {p99(got['baseline']) * 1000:.0f} ms), "
        f"{len(refused)} refused (p99 {p99([t for _, t in refused] or [0.0]) * 1000:.1f} ms), "
        f"admin p99 {p99(got['lags'] or [0.0]) * 1000:.1f} ms over {len(got['lags'])} probes, RSS +"
        f"{(max(got['rss'] or [0]) - got['rss_before']) / 2**20:.1f} MiB, recovered after "
        f"{got['recovered']} s, {got['connections']} client connections"
    )
    assert len(admitted) + len(refused) == len(results), {s for s, _, _ in results}
    # 10x capacity: most requests are refused, and capacity is still used.
    assert len(refused) > len(results) / 2
    assert len(admitted) >= CAPACITY * BURST / 2
    assert all(over for over, _ in refused), "a 503 without x-envoy-overloaded"
    refused_p99 = p99([t for _, t in refused])
    assert refused_p99 < 0.020, f"refusals p99 {refused_p99 * 1000:.1f} ms"
    baseline_p99 = p99(got["baseline"])
    assert p99(admitted) <= 3 * baseline_p99, (p99(admitted), baseline_p99)
    # Bounded: the pool's queue (max_pending_requests) and the loop's lag.
    assert max(got["rss"]) - got["rss_before"] <= RSS_BUDGET
    assert p99(got["lags"]) < 0.100, f"admin p99 {p99(got['lags']) * 1000:.1f} ms"
    overflows = int(stats["cluster.svc.upstream_rq_pending_overflow"]) + int(
        stats["cluster.svc.upstream_rq_active_overflow"]
    )
    assert overflows == len(refused)
    assert got["recovered"] is not None and got["recovered"] < 2.0, got["recovered"]
    assert int(stats[CB + "rq_pending_open"]) == 0
    assert int(stats["cluster.svc.upstream_rq_pending_active"]) == 0
    assert up.open_connections <= LIMITS["max_connections"]
    # Every refusal is in the access log with flag UO (the writer flushes every second).
    deadline = time.monotonic() + 3
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= len(results) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines.count("503 UO") == len(refused)
