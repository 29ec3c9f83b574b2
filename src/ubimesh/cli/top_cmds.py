"""``ubimesh top``: live per-service requests per second, success rate, p50 and p99, from the
Istio standard metrics each proxy's admin serves at ``/stats/prometheus`` (docs/telemetry.md,
``## ubimesh top``).

``main.py`` calls :func:`add_commands` to register it and :func:`run` to dispatch. Every
``ubimesh`` command loads this module, the proxy's included, so it holds only the flags: the
loop is in ``ubimesh.cli.top_live`` and the arithmetic in ``ubimesh.telemetry.scrape``, both
imported when ``top`` runs.

Exit codes: 0 done or interrupted (Ctrl-C); 1 the control plane cannot be reached at start, or
``--once`` measured no proxy; 2 usage (a flag's value; the message names it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

COMMANDS = ("top",)
#: Sort keys, as ubimesh.telemetry.scrape.SORT_KEYS (not imported here: see above).
SORT_KEYS = ("rps", "p99", "errors", "name")


def add_commands(sub: Any) -> None:
    """Register ``top`` on ``sub`` (argparse sub-parsers)."""
    from ubimesh.control.client import DEFAULT_SERVER

    p = sub.add_parser(
        "top",
        help="live per-service requests/s, success rate, p50 and p99 from the proxies' metrics",
        description="Per-service requests per second, success rate (non-5xx share) and p50/p99 "
        "latency, from Istio's istio_requests_total and istio_request_duration_milliseconds "
        "(reporter=destination) at each proxy's admin /stats/prometheus, refreshed in place.",
    )
    p.add_argument(
        "--server",
        "--control",
        dest="server",
        default=os.environ.get("UBIMESH_SERVER", DEFAULT_SERVER),
        help=f"control plane API URL listing the proxies (default $UBIMESH_SERVER or "
        f"{DEFAULT_SERVER}); not used with --proxy",
    )
    p.add_argument("--token", help="admin token (default $UBIMESH_TOKEN)")
    p.add_argument(
        "--token-file",
        help="file holding the admin token (default "
        "$UBIMESH_TOKEN_FILE, then the default data dir's admin-token)",
    )
    p.add_argument(
        "--proxy",
        action="append",
        default=None,
        metavar="ADMIN_URL",
        help="scrape this proxy admin (http://HOST:PORT, or a full metrics URL) "
        "instead of asking the control plane; repeatable",
    )
    p.add_argument(
        "--interval", default="2s", help="time between scrapes, e.g. 2s, 500ms (default 2s)"
    )
    p.add_argument(
        "--timeout",
        default="2s",
        help="each scrape's time limit, at most the interval (default 2s)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="scrape twice one interval apart, print one table and exit",
    )
    p.add_argument("--json", action="store_true", help="one JSON document per refresh, a line")
    p.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default="rps",
        help="rps: busiest first (default); p99: slowest first; errors: highest "
        "5xx share first; name",
    )


def run(args: argparse.Namespace) -> int | None:
    """Run ``top`` if it is the command; None otherwise."""
    if args.command not in COMMANDS:
        return None
    from ubimesh.cli.top_live import Target, Top, admin_url
    from ubimesh.collector.server import parse_duration

    try:
        interval = parse_duration(args.interval)
        if interval <= 0:
            raise ValueError(f"{args.interval!r} must be more than 0")
    except ValueError as exc:
        return _usage(f"--interval: {exc}")
    try:
        timeout = min(parse_duration(args.timeout), interval)
        if timeout <= 0:
            raise ValueError(f"{args.timeout!r} must be more than 0")
    except ValueError as exc:
        return _usage(f"--timeout: {exc}")
    explicit: list[Target] = []
    for text in args.proxy or ():
        try:
            explicit.append(Target(text, admin_url(text)))
        except ValueError as exc:
            return _usage(f"--proxy: {exc}")
    top = Top(args, interval, timeout, explicit, sys.stdout)
    try:
        return top.run()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `ubimesh top | head`: the reader left; nothing more to say, and nowhere to say it.
        # Point stdout at /dev/null so the interpreter's flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        top.close()


def _usage(message: str) -> int:
    print(f"ubimesh top: {message}", file=sys.stderr)
    return 2
