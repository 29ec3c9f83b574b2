"""``ubimesh collector``: run the trace collector alone (docs/telemetry.md).

``main.py`` calls :func:`add_commands` to register it and :func:`run` to dispatch. Exit codes:
0 stopped by a signal, 1 could not start (address in use, data dir unwritable), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("collector",)


def add_commands(sub: Any) -> None:
    """Register ``collector`` on ``sub`` (argparse sub-parsers)."""
    p = sub.add_parser("collector", help="run the trace collector (Zipkin v2 + OTLP/HTTP in, "
                       "Zipkin's query API out)")
    p.add_argument("--address", default="127.0.0.1:9411", help="HOST:PORT (0: any free port)")
    p.add_argument("--data-dir", default="", help="where spans.db and collector.json live "
                   "(default ~/.local/share/ubimesh/collector)")
    p.add_argument("--retention", default="24h",
                   help="delete spans older than this (e.g. 24h, 30m, 7d; 0: keep by age)")
    p.add_argument("--max-spans", type=int, default=0,
                   help="keep at most this many spans, deleting the oldest (default 0: no limit)")
    p.add_argument("--max-queued-spans", type=int, default=200_000,
                   help="spans accepted but not yet written, at most; beyond, ingest answers "
                   "503 with Retry-After (default 200000)")
    p.add_argument("--max-request-spans", type=int, default=10_000,
                   help="spans in one POST, at most (default 10000; beyond: 413)")
    p.add_argument("--max-body", type=int, default=16 * 1024 * 1024,
                   help="bytes of one POST body after gzip decoding, at most (default 16 MiB)")
    p.add_argument("--sweep-interval", default="10s",
                   help="how often retention is enforced (default 10s)")
    p.add_argument("-l", "--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is ``collector``; None otherwise."""
    if args.command not in COMMANDS:
        return None
    from ubimesh.collector.api import CollectorOptions
    from ubimesh.collector.server import default_data_dir, parse_duration, serve
    from ubimesh.control.bootstrap import parse_address

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
    )
    try:
        host, port = parse_address(args.address, what="--address")
        retention = parse_duration(args.retention)
        sweep = parse_duration(args.sweep_interval)
        for name in ("max_spans", "max_queued_spans", "max_request_spans", "max_body"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if sweep <= 0:
            raise ValueError("--sweep-interval must be positive")
    except ValueError as exc:
        print(f"ubimesh: {exc}", file=sys.stderr)
        return 2
    options = CollectorOptions(
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        retention_s=retention,
        max_spans=args.max_spans,
        max_body=args.max_body,
        max_request_spans=args.max_request_spans,
        max_queued=args.max_queued_spans,
        sweep_interval_s=sweep,
    )
    try:
        return asyncio.run(serve(host, port, options))
    except OSError as exc:
        print(f"ubimesh collector: {exc}", file=sys.stderr)
        return 1
