"""``ubimesh traces`` (find traces) and ``ubimesh trace ID`` (one trace as a waterfall), over
a collector's Zipkin v2 query API (docs/telemetry.md, "CLI: traces and trace").

The collector is the first of: ``--collector URL``, ``$UBIMESH_COLLECTOR``, the ``collector``
of ``control.json`` in the default data dir (a ``ubimesh control`` running with it), and
``http://127.0.0.1:9411`` (``ubimesh collector``, or Zipkin). The admin token (which the
control plane's collector wants for queries) is found as the other commands find it
(``--token``, ``--token-file``, ``$UBIMESH_TOKEN``, ``$UBIMESH_TOKEN_FILE``, the default data
dir's ``admin-token``) and sent when there is one.

``main.py`` calls :func:`add_commands` to register them and :func:`run` to dispatch. Exit
codes: 0 ok, 1 no such trace / collector unreachable or refusing, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

COMMANDS = ("traces", "trace")
DEFAULT_COLLECTOR = "http://127.0.0.1:9411"
TIMEOUT_S = 10.0
_TRACE_ID = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|µs|ms|s|m|h|d)?")
_MICROS = {
    "us": 1,
    "µs": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
}
#: ubimesh.control.server's names, not imported from there: importing the control plane
#: (aiohttp, the compiler, protobufs) would add half a second to every run of the command.
ADDRESSES_FILE = "control.json"
TOKEN_FILE = "admin-token"
#: Narrowest timeline drawn, whatever the terminal says.
MIN_BAR = 10
DURATION_WIDTH = 9

Span = Mapping[str, Any]


class TraceError(Exception):
    """Exit 1 with this message."""


def add_commands(sub: Any) -> None:
    """Register ``traces`` and ``trace`` on ``sub`` (argparse sub-parsers)."""
    traces = sub.add_parser("traces", help="list recent traces from the trace collector")
    traces.add_argument(
        "--service",
        default="",
        help="traces with a span of this service, e.g. web.default (default: any)",
    )
    traces.add_argument(
        "--min-duration",
        default="",
        metavar="D",
        help="only traces with a span of the service at least this long (e.g. 100ms, 1.5s, 250us)",
    )
    traces.add_argument("--limit", type=int, default=10, help="at most N traces (default 10)")
    traces.add_argument(
        "--lookback",
        default="1h",
        help="how far back from now to look (e.g. 15m, 1h, 7d; default 1h)",
    )
    _common_flags(traces)
    trace = sub.add_parser("trace", help="show one trace as a waterfall")
    trace.add_argument("trace_id", metavar="ID", help="the trace id (16 or 32 hex digits)")
    _common_flags(trace)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collector",
        default="",
        metavar="URL",
        help="the collector's base URL (default $UBIMESH_COLLECTOR, then the "
        f"running control plane's, then {DEFAULT_COLLECTOR})",
    )
    parser.add_argument("--token", help="admin token (default $UBIMESH_TOKEN)")
    parser.add_argument("--token-file", help="file holding the admin token")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is ``traces`` or ``trace``; None otherwise."""
    if args.command not in COMMANDS:
        return None
    try:
        if args.command == "traces":
            query = _traces_query(args)
        elif not _TRACE_ID.fullmatch(args.trace_id):
            raise ValueError(f"{args.trace_id!r} is not a trace id (16 or 32 hex digits)")
    except ValueError as exc:
        print(f"ubimesh {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        collector = collector_url(args.collector)
        token = _token(args)
        if args.command == "traces":
            traces = _get(collector, "/api/v2/traces", query, token)
            rows = [summarize(t) for t in traces if t]
            if args.json:
                print(json.dumps([r.as_json() for r in rows], indent=2))
            elif not rows:
                where = f" of service {args.service}" if args.service else ""
                print(
                    f"no traces{where} in the last {args.lookback} at {collector}", file=sys.stderr
                )
            else:
                sys.stdout.write(render_table(rows))
            return 0
        trace_id = args.trace_id.lower()
        spans = _get(collector, f"/api/v2/trace/{trace_id}", {}, token, missing=trace_id)
        if args.json:
            print(json.dumps(spans, indent=2))
        else:
            width = shutil.get_terminal_size((100, 24)).columns
            sys.stdout.write(render_waterfall(spans, width, fancy=_fancy(sys.stdout)))
        return 0
    except TraceError as exc:
        print(f"ubimesh {args.command}: {exc}", file=sys.stderr)
        return 1


# -- where and how to ask ---------------------------------------------------------------------


def collector_url(flag: str) -> str:
    """The collector's base URL (see the module docstring for the order)."""
    if flag:
        return flag.rstrip("/")
    if os.environ.get("UBIMESH_COLLECTOR"):
        return os.environ["UBIMESH_COLLECTOR"].rstrip("/")
    try:
        data = json.loads((_default_data_dir() / ADDRESSES_FILE).read_text())
    except (OSError, ValueError):
        return DEFAULT_COLLECTOR
    url = data.get("collector") if isinstance(data, dict) else None
    return str(url).rstrip("/") if url else DEFAULT_COLLECTOR


def _default_data_dir() -> Path:
    """``ubimesh control``'s default data dir (ubimesh.control.server.default_data_dir)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ubimesh"


def _token(args: argparse.Namespace) -> str:
    from ubimesh.control.api_error import ApiError
    from ubimesh.control.client import resolve_token

    try:
        return resolve_token(args.token, args.token_file, _default_data_dir() / TOKEN_FILE)
    except ApiError as exc:
        raise TraceError(exc.error) from None


def _get(base: str, path: str, query: Mapping[str, str], token: str, missing: str = "") -> Any:
    """GET ``base + path`` as JSON. TraceError naming the URL for anything but a 200;
    ``missing`` (a trace id): a 404 says there is no such trace."""
    from urllib import error as url_error
    from urllib import parse as url_parse
    from urllib import request as url_request

    url = base + path + ("?" + url_parse.urlencode(query) if query else "")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with url_request.urlopen(
            url_request.Request(url, headers=headers), timeout=TIMEOUT_S
        ) as response:
            return json.loads(response.read() or b"null")
    except url_error.HTTPError as exc:
        body = exc.read()[:300].decode(errors="replace").strip()
        if exc.code == 404 and missing:
            raise TraceError(f"no trace {missing} in {base}") from None
        if exc.code == 401:
            raise TraceError(
                f"the collector at {base} wants the admin token for queries: pass "
                "--token or --token-file, or set $UBIMESH_TOKEN_FILE"
            ) from None
        raise TraceError(f"{url}: HTTP {exc.code}: {body}") from None
    except (url_error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TraceError(
            f"cannot reach the trace collector at {base}: {reason} (start one "
            "with `ubimesh control` or `ubimesh collector`, or point elsewhere "
            "with --collector URL or $UBIMESH_COLLECTOR)"
        ) from None


def parse_micros(text: str) -> int:
    """Microseconds in ``100ms``, ``1.5s``, ``250us``, ``2m``, ``1h``, ``7d`` (a bare number is
    µs, Zipkin's unit). ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 250us, 100ms, 1.5s, 15m, 1h, 7d)")
    return round(float(match.group(1)) * _MICROS[match.group(2) or "us"])


def _traces_query(args: argparse.Namespace) -> dict[str, str]:
    if not 0 < args.limit <= 10_000:
        raise ValueError(f"--limit {args.limit}: expected 1..10000")
    try:
        lookback_us = parse_micros(args.lookback)
    except ValueError as exc:
        raise ValueError(f"--lookback: {exc}") from None
    if lookback_us < 1000:
        raise ValueError("--lookback must be at least 1ms")
    query = {
        "limit": str(args.limit),
        "lookback": str(lookback_us // 1000),
        "endTs": str(int(time.time() * 1000)),
    }
    if args.service:
        query["serviceName"] = args.service.lower()
    if args.min_duration:
        try:
            query["minDuration"] = str(parse_micros(args.min_duration))
        except ValueError as exc:
            raise ValueError(f"--min-duration: {exc}") from None
    return query


# -- the traces table ----------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRow:
    """One trace, summarized: its root (the earliest span without a parent in the trace)."""

    trace_id: str
    root_service: str
    root_name: str
    start_us: int
    duration_us: int
    spans: int
    errors: int

    def as_json(self) -> dict[str, Any]:
        return {
            "traceId": self.trace_id,
            "rootService": self.root_service,
            "rootName": self.root_name,
            "timestamp": self.start_us,
            "duration": self.duration_us,
            "spans": self.spans,
            "errors": self.errors,
        }


def _service(span: Span) -> str:
    return str((span.get("localEndpoint") or {}).get("serviceName") or "?")


def _is_error(span: Span) -> bool:
    return "error" in (span.get("tags") or {})


def _bounds(spans: Sequence[Span]) -> tuple[int, int]:
    """(start, end) in µs over the spans that have a timestamp."""
    timed = [s for s in spans if isinstance(s.get("timestamp"), int)]
    if not timed:
        return 0, 0
    start = min(int(s["timestamp"]) for s in timed)
    end = max(int(s["timestamp"]) + int(s.get("duration") or 0) for s in timed)
    return start, end


def summarize(spans: Sequence[Span]) -> TraceRow:
    ids = {s.get("id") for s in spans}
    roots = [s for s in spans if not s.get("parentId") or s.get("parentId") not in ids]
    root = min(roots or spans, key=lambda s: (s.get("timestamp") or 0, str(s.get("id"))))
    start, end = _bounds(spans)
    return TraceRow(
        str(root.get("traceId", "")),
        _service(root),
        str(root.get("name") or "?"),
        start,
        end - start,
        len(spans),
        sum(1 for s in spans if _is_error(s)),
    )


def format_duration(us: int) -> str:
    """``850us``, ``12.3ms``, ``1.24s``, ``2m05s``: three significant digits, ASCII."""
    if us < 1_000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us / 1_000:.3g}ms"
    if us < 60_000_000:
        return f"{us / 1_000_000:.3g}s"
    minutes, seconds = divmod(us // 1_000_000, 60)
    return f"{minutes}m{seconds:02d}s"


def _local_time(us: int) -> str:
    # time, not datetime: this module is imported by every `ubimesh` command, the proxy's
    # included, which must not load datetime (tests/unit/test_native_scope.py)
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) + f".{micros // 1000:03d}"


def render_table(rows: Sequence[TraceRow]) -> str:
    """The ``traces`` table, newest first: TRACE ID, ROOT, START, DURATION, SPANS, ERRORS."""
    header = ("TRACE ID", "ROOT", "START", "DURATION", "SPANS", "ERRORS")
    cells = [header] + [
        (
            r.trace_id,
            f"{r.root_service}: {r.root_name}",
            _local_time(r.start_us),
            format_duration(r.duration_us),
            str(r.spans),
            str(r.errors) if r.errors else "-",
        )
        for r in sorted(rows, key=lambda r: -r.start_us)
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in cells
    )


# -- the waterfall ---------------------------------------------------------------------------


@dataclass
class _Node:
    span: Span
    children: list[_Node] = field(default_factory=list)
    orphan_of: str = ""  # the missing parent's id


def build_tree(spans: Sequence[Span]) -> list[_Node]:
    """The spans as a forest, children by start time. A span whose parent is not in the trace
    is a root with ``orphan_of`` set. Zipkin shared spans (a SERVER span reusing its CLIENT
    caller's id) nest under the CLIENT one, and the id's children under the SERVER one."""
    nodes = [_Node(s) for s in spans]
    owner: dict[str, _Node] = {}  # span id -> the node its children hang under
    client_of: dict[str, _Node] = {}
    for node in nodes:
        sid = str(node.span.get("id"))
        if sid in owner and node.span.get("kind") == "SERVER":
            client_of[sid] = owner[sid]
            owner[sid] = node
        elif sid in owner and owner[sid].span.get("kind") == "SERVER":
            client_of[sid] = node
        else:
            owner.setdefault(sid, node)
    roots: list[_Node] = []
    for node in nodes:
        sid = str(node.span.get("id"))
        parent_id = str(node.span.get("parentId") or "")
        if client_of.get(sid) is not None and owner.get(sid) is node:
            parent: _Node | None = client_of[sid]
        elif parent_id:
            parent = owner.get(parent_id)
            if parent is None:
                node.orphan_of = parent_id
        else:
            parent = None
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent.children.append(node)

    def key(n: _Node) -> tuple[int, str]:
        return (int(n.span.get("timestamp") or 0), str(n.span.get("name") or ""))

    for node in nodes:
        node.children.sort(key=key)
    roots.sort(key=key)
    return roots


def _walk(roots: Sequence[_Node]) -> list[tuple[int, _Node]]:
    """(depth, node) in display order; each node once, even if the links loop."""
    out: list[tuple[int, _Node]] = []
    seen: set[int] = set()
    stack = [(0, n) for n in reversed(roots)]
    while stack:
        depth, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append((depth, node))
        stack.extend((depth + 1, c) for c in reversed(node.children))
    return out


def bar_span(start: int, duration: int, t0: int, total: int, width: int) -> tuple[int, int]:
    """The columns ``[first, last)`` of a span's bar in a timeline ``width`` wide for a trace
    starting at ``t0`` lasting ``total`` µs: the start offset scaled, at least one column."""
    if total <= 0:
        return 0, width
    first = min(width - 1, max(0, round((start - t0) * width / total)))
    last = min(width, max(first + 1, round((start + duration - t0) * width / total)))
    return first, last


def _error_note(span: Span) -> str:
    """`` ERROR`` and the error tag's value when it says more than "true" (at most 20 chars)."""
    if not _is_error(span):
        return ""
    value = str(span["tags"]["error"])
    if value in ("", "true"):
        return "  ERROR"
    return f"  ERROR {value if len(value) <= 20 else value[:19] + '~'}"


def render_waterfall(spans: Sequence[Span], width: int, *, fancy: bool = False) -> str:
    """One trace as text at most ``width`` columns wide (the timeline never narrower than
    ``MIN_BAR``): a header line, then one line per span in depth-first order, children by start
    time: ``<indent><service> <name>`` (two spaces per depth; `` (orphan)`` when its parent is
    not in the trace, shown at the root), ``|`` timeline ``|`` (the span's bar at its start
    offset, scaled to the trace's duration; ``#``, or ``!`` for an error span), the duration,
    and ``ERROR <error tag>``; then one line per orphan naming its missing parent. ``fancy``:
    block characters and red errors (a terminal that wants them)."""
    roots = build_tree(spans)
    order = _walk(roots)
    t0, end = _bounds(spans)
    total = end - t0
    trace_id = str(spans[0].get("traceId", "")) if spans else ""
    services = sorted({_service(s) for s in spans})
    errors = sum(1 for s in spans if _is_error(s))
    lines = [
        f"trace {trace_id}  {len(spans)} spans  {len(services)} services  "
        f"{format_duration(total)}  started {_local_time(t0)}"
        + (f"  {errors} with errors" if errors else "")
    ]
    labels = [
        "  " * depth
        + f"{_service(n.span)} {n.span.get('name') or '?'}"
        + (" (orphan)" if n.orphan_of else "")
        for depth, n in order
    ]
    notes = [_error_note(n.span) for _, n in order]
    label_width = min(max((len(lb) for lb in labels), default=10), max(20, width * 2 // 5))
    notes_width = max((len(n) for n in notes), default=0)
    bar_width = max(MIN_BAR, width - label_width - DURATION_WIDTH - 5 - notes_width)
    full, err_char = ("█", "█") if fancy else ("#", "!")
    red, reset = ("\033[31m", "\033[0m") if fancy else ("", "")
    for label, note, (_, node) in zip(labels, notes, order, strict=True):
        span = node.span
        start = int(span.get("timestamp") or t0)
        duration = int(span.get("duration") or 0)
        first, last = bar_span(start, duration, t0, total, bar_width)
        error = bool(note)
        bar = (" " * first + (err_char if error else full) * (last - first)).ljust(bar_width)
        if error and fancy:
            bar = red + bar + reset
        if len(label) > label_width:
            label = label[: label_width - 1] + "~"
        lines.append(
            f"{label.ljust(label_width)}  |{bar}| "
            f"{format_duration(duration).rjust(DURATION_WIDTH)}{note}"
        )
    for _, node in order:
        if node.orphan_of:
            lines.append(
                f"orphan: {_service(node.span)} {node.span.get('name') or '?'} "
                f"(span {node.span.get('id')}): parent {node.orphan_of} is not in this trace"
            )
    return "\n".join(lines) + "\n"


def _fancy(stream: TextIO) -> bool:
    """Color and block characters only on a terminal, and never with $NO_COLOR set."""
    return (
        stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"
    )
