"""How many spans per second the trace collector ingests on one core (issue 6's bar).

Starts ``ubimesh collector`` (port 0, a fresh data dir) pinned to one core, and posts Zipkin
v2 JSON batches (``--batch`` Envoy-like spans per POST, with Envoy's standard tags, new trace
and span ids in every POST) from this process pinned to another core, over ``--connections``
keep-alive connections. After ``--warmup`` seconds it measures for ``--duration`` seconds, then
waits until the collector has written everything it accepted (its ``/health``), so the
writes are paid for inside the measurement.

Reported: spans accepted per wall-clock second, and spans per CPU-second of the collector
process (all its threads, from /proc via psutil) -- the bar's figure, since the machine may be
shared: ">= 20,000 spans per second on one core".

    python bench/collector_ingest.py [--duration 10] [--batch 100] [--connections 4]

Exit status 0 on PASS, 1 on FAIL, 2 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
BAR = 20_000.0


def envoy_like_batch(batch: int) -> bytes:
    """A body template: ``batch`` spans whose ids contain the placeholder ``QQQQQQQQ``,
    replaced per POST so every POST carries new traces (pairs of SERVER + CLIENT spans)."""
    now = time.time_ns() // 1000
    spans = []
    for i in range(batch):
        trace = f"QQQQQQQQ{i // 2:08x}" + "a1b2c3d4e5f60718"
        server = i % 2 == 0
        span = {
            "traceId": trace,
            "id": f"QQQQQQQQ{i:08x}",
            "name": "ledger.payments.svc.cluster.local:8080/*",
            "kind": "SERVER" if server else "CLIENT",
            "timestamp": now + i,
            "duration": 1500 + i,
            "localEndpoint": {"serviceName": "ledger" if server else "payments",
                              "ipv4": "10.1.2.3", "port": 8080},
            "remoteEndpoint": {"serviceName": "" if server else "ledger",
                               "ipv4": "10.1.9.7", "port": 51544},
            "tags": {
                "component": "proxy",
                "node_id": "ledger-7d9f8.payments",
                "zone": "",
                "guid:x-request-id": "4f1c2a9e-7b3d-4e8a-9c1f-2d3e4f5a6b7c",
                "http.url": "http://ledger.payments:8080/v1/balances?account=42",
                "http.method": "GET",
                "downstream_cluster": "-",
                "user_agent": "curl/8.5.0",
                "http.protocol": "HTTP/1.1",
                "peer.address": "10.1.9.7",
                "request_size": "0",
                "response_size": "512",
                "response_flags": "-",
                "http.status_code": "200",
                "upstream_cluster": "inbound|8080||",
                "upstream_cluster.name": "inbound|8080||",
            },
        }
        if not server:
            span["parentId"] = f"QQQQQQQQ{i - 1:08x}"
        spans.append(span)
    return json.dumps(spans, separators=(",", ":")).encode()


def start_collector(workdir: Path, core: int | None) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("ubimesh") or str(Path(sys.executable).parent / "ubimesh")
    log = open(workdir / "collector.log", "wb")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(
        [exe, "collector", "--address", "127.0.0.1:0", "--data-dir", str(workdir / "data"),
         "-l", "warning"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if core is not None:
        psutil.Process(proc.pid).cpu_affinity([core])
    info = workdir / "data" / "collector.json"
    deadline = time.monotonic() + 20
    while not info.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log_text = (workdir / "collector.log").read_text()
            raise RuntimeError(f"collector did not start: {log_text}")
        time.sleep(0.05)
    return proc, json.loads(info.read_text())["address"]


class Load:
    def __init__(self, url: str, template: bytes, batch: int) -> None:
        self.url = url + "/api/v2/spans"
        self.template = template
        self.batch = batch
        self.counter = 0
        self.accepted = 0
        self.rejected = 0
        self.stop = False

    def body(self) -> bytes:
        self.counter += 1
        return self.template.replace(b"QQQQQQQQ", b"%08x" % self.counter)

    async def worker(self, session: aiohttp.ClientSession) -> None:
        headers = {"content-type": "application/json", "b3": "0"}
        while not self.stop:
            async with session.post(self.url, data=self.body(), headers=headers) as resp:
                await resp.read()
                if resp.status == 202:
                    self.accepted += self.batch
                elif resp.status == 503:
                    self.rejected += self.batch
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"collector answered {resp.status}: {await resp.text()}")


async def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    load = Load(url, envoy_like_batch(args.batch), args.batch)
    proc = psutil.Process(pid)
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def phase(seconds: float) -> None:
            load.stop = False
            workers = [asyncio.ensure_future(load.worker(session))
                       for _ in range(args.connections)]
            await asyncio.sleep(seconds)
            load.stop = True
            await asyncio.gather(*workers)

        await phase(args.warmup)
        await _drained(session, url)  # the warm-up's writes are not measured
        cpu0 = sum(proc.cpu_times()[:2])
        accepted0, rejected0, t0 = load.accepted, load.rejected, time.monotonic()
        await phase(args.duration)
        sent = load.accepted - accepted0
        wall = time.monotonic() - t0
        await _drained(session, url)
        drained = time.monotonic() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        async with session.get(url + "/health") as resp:
            health = await resp.json()
    return {"spans": sent, "wall_s": wall, "drain_wall_s": drained, "cpu_s": cpu,
            "spans_per_s": sent / drained, "spans_per_cpu_s": sent / cpu,
            "rejected": load.rejected - rejected0, "stored": health["spans"]}


async def _drained(session: aiohttp.ClientSession, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(url + "/health") as resp:
            if (await resp.json())["queuedSpans"] == 0:
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the collector did not write its queue within {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=100, help="spans per POST")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--collector-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--bar", type=float, default=BAR, help="spans per CPU-second")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    pin = cores > 1
    if pin:
        os.sched_setaffinity(0, {args.client_core})
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as tmp:
        workdir = Path(tmp)
        try:
            proc, url = start_collector(workdir, args.collector_core if pin else None)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            result = asyncio.run(measure(url, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"collector ingest: {result['spans']:.0f} spans in {args.batch}-span POSTs over "
          f"{args.connections} connections, {result['wall_s']:.1f} s (+ drain to "
          f"{result['drain_wall_s']:.1f} s); collector pinned to core "
          f"{args.collector_core if pin else '-'}")
    print(f"  spans/s (wall, accepted and written): {result['spans_per_s']:,.0f}")
    print(f"  collector CPU: {result['cpu_s']:.2f} s -> spans per CPU-second: "
          f"{result['spans_per_cpu_s']:,.0f}")
    print(f"  503 rejections: {result['rejected']:.0f}; spans stored at the end: "
          f"{result['stored']}")
    ok = result["spans_per_cpu_s"] >= args.bar
    print(f"{'PASS' if ok else 'FAIL'}: bar >= {args.bar:,.0f} spans per CPU-second (one core)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
