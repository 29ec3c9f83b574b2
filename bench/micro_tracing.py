"""Micro-benchmark of HCM tracing's per-request work (ubimesh.proxy.tracing.span).

Times, per request, ``HcmTracer.start`` + ``finish`` on a realistic stream (the headers a wrk
request has when tracing starts: host, user-agent-less, x-forwarded-proto and x-request-id
added by the HCM), with the Zipkin provider:

* ``unsampled``: random_sampling 1 % and a request id whose draw is above it (99 % of
  requests at 1 % sampling);
* ``sampled``: random_sampling 100 %, including the span's share of the batched export (the
  Zipkin JSON body of a batch of 256 spans is encoded; nothing is sent).

The cost of resetting the stream's headers between requests is measured and subtracted.
Run with ``UBIMESH_NATIVE=0`` for the pure-Python modules (the default when no build is
enabled: this script does not enable the compiled ones unless ``--native`` is given).

    python bench/micro_tracing.py [--native] [-n 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

UP_ITEMS = [
    ("host", "127.0.0.1:18000"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "7f3ab2c1-9d0e-4c4b-8a1f-2b3c4d5e6f70"),
]


def _make(random_sampling: float) -> tuple[Any, Any]:
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.snapshot.types import TracingConfig, TracingProvider, TracingProviderKind
    from ubimesh.proxy.tracing.span import HcmTracer
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager
    from ubimesh.telemetry.stats import Store

    stats = Store()
    clusters = ClusterManager({}, stats)
    provider = TracingProvider(TracingProviderKind.ZIPKIN, "span_sink", "/api/v2/spans", "z")
    config = TracingConfig(provider, random_sampling=random_sampling)
    tracer = HcmTracer(config, stats, "ingress_http", clusters)
    exporter = tracer.exporter
    # One open batch for the whole run (never sent: no network); ``one`` makes its body at
    # the end, so writing the spans is measured however the encoder splits the work.
    exporter.batch_spans = exporter.max_queued = 1 << 40
    conn = SimpleNamespace(hcm=None, remote=("127.0.0.1", 40000), tls=None)
    stream = ActiveStream(conn)  # type: ignore[arg-type]
    stream.method, stream.path, stream.target = "GET", "/1k", "/1k"
    stream.host_header = "127.0.0.1:18000"
    stream.start_time = time.monotonic()
    stream.status, stream.bytes_sent = 200, 1250
    stream.upstream = SimpleNamespace(  # type: ignore[assignment]
        cluster=SimpleNamespace(name="upstream"), host=SimpleNamespace(address="127.0.0.1:18080")
    )
    return tracer, stream


def _time(fn: Any, n: int, repeat: int) -> float:
    """Median CPU µs per call over ``repeat`` runs of ``n`` calls (CPU time: the machine may
    be shared)."""
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn(n)
        runs.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--native", action="store_true", help="use the compiled hot path")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.native:
        from ubimesh import native

        native.enable()

    async def run() -> None:
        results = {}
        for label, rate in (("unsampled (1 %)", 1.0), ("sampled (100 %)", 100.0)):
            tracer, stream = _make(rate)
            headers = stream.headers
            start, finish = tracer.start, tracer.finish
            up = UP_ITEMS

            def reset_only(n: int, headers: Any = headers, up: Any = up) -> None:
                for _ in range(n):
                    headers.items = list(up)

            def one(
                n: int,
                headers: Any = headers,
                up: Any = up,
                stream: Any = stream,
                start: Any = start,
                finish: Any = finish,
                exporter: Any = tracer.exporter,
            ) -> None:
                for _ in range(n):
                    headers.items = list(up)
                    span = start(stream, None)
                    if span is not None:
                        finish(stream, span, time.monotonic())
                batch = exporter.open
                if batch is not None:
                    batch.body()
                    exporter.open, exporter.queued = None, 0

            base = _time(reset_only, args.n, args.repeat)
            total = _time(one, args.n, args.repeat)
            results[label] = total - base
            if tracer.exporter.timer is not None:
                tracer.exporter.timer.cancel()
        for label, us in results.items():
            print(f"{label:18s} {us:6.2f} µs/request")

    asyncio.run(run())


if __name__ == "__main__":
    main()
