"""``ubimesh traces`` and ``ubimesh trace`` as subprocesses against a real ``ubimesh collector``
holding spans with known timings: the table's rows, the waterfall's order, indentation, bar
positions and durations, and the errors (unknown trace, collector unreachable, bad id).
Also the pure pieces (bar scaling, shared-span nesting) in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from tests.support.control import wait_for
from tests.support.procs import LOOPBACK, ManagedProcess

from ubimesh.cli.trace_cmds import bar_span, build_tree, parse_micros, render_waterfall

WIDTH = 100
TRACE = "463ac35c9f6413ad48485a3953bb6124"
OTHER = "0af7651916cd43dd8448eb211c80319c"
#: The root lasts 10 ms; everything else is placed relative to it.
ROOT_US = 10_000


def span(
    trace: str,
    sid: int,
    parent: int | None,
    service: str,
    name: str,
    start: int,
    duration: int,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": trace,
        "id": f"{sid:016x}",
        "name": name,
        "timestamp": start,
        "duration": duration,
        "localEndpoint": {"serviceName": service},
        **extra,
    }
    if parent is not None:
        out["parentId"] = f"{parent:016x}"
    return out


def trace_spans(t0: int) -> list[dict[str, Any]]:
    """gateway (0-10 ms) -> web client (1-9 ms) -> web server (5-9 ms: starts at half) ->
    ledger (6-8 ms, an error); an orphan (parent ff missing) at 2-3 ms."""
    return [
        span(TRACE, 1, None, "edge.default", "get /", t0, ROOT_US, kind="SERVER"),
        span(TRACE, 2, 1, "edge.default", "web.default", t0 + 1_000, 8_000, kind="CLIENT"),
        span(TRACE, 3, 2, "web.default", "get /", t0 + 5_000, 4_000, kind="SERVER"),
        span(
            TRACE,
            4,
            3,
            "ledger.default",
            "get /ledger",
            t0 + 6_000,
            2_000,
            kind="SERVER",
            tags={"error": "503"},
        ),
        span(TRACE, 5, 255, "batch.default", "late", t0 + 2_000, 1_000),
    ]


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``ubimesh collector`` on port 0 holding TRACE (5 spans, 10 ms) and OTHER (one 3 ms
    span of web.default); its URL."""
    workdir = tmp_path_factory.mktemp("trace-cli")
    argv = [
        sys.executable,
        "-m",
        "ubimesh.cli.main",
        "collector",
        "--address",
        f"{LOOPBACK}:0",
        "--data-dir",
        str(workdir / "data"),
    ]
    proc = ManagedProcess("collector", argv, workdir / "collector.log", workdir)
    try:
        address = workdir / "data" / "collector.json"
        wait_for("collector.json", address.exists, timeout=15)
        url = str(json.loads(address.read_text())["address"])
        now = int(time.time() * 1e6)
        spans = trace_spans(now - 60_000_000)  # a minute ago
        spans.append(span(OTHER, 9, None, "web.default", "post /x", now - 30_000_000, 3_000))
        request = urllib.request.Request(
            url + "/api/v2/spans", json.dumps(spans).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202

        def stored() -> bool:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                return bool(json.loads(response.read())["spans"] == len(spans))

        wait_for("spans stored", stored, timeout=10)
        yield url
    finally:
        proc.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "UBIMESH_COLLECTOR"}
    full_env.update({"COLUMNS": str(WIDTH), "NO_COLOR": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "ubimesh.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        check=False,
    )


def bar_of(line: str) -> tuple[int, int, str]:
    """(first, last) bar columns inside the line's ``|...|`` timeline, and the bar character."""
    timeline = line[line.index("|") + 1 : line.rindex("|")]
    stripped = timeline.strip()
    first = timeline.index(stripped[0])
    return first, first + len(stripped), stripped[0]


def test_waterfall_order_indentation_bars_and_durations(collector: str) -> None:
    done = cli("trace", TRACE, "--collector", collector)
    assert done.returncode == 0, done.stderr
    header, *lines, orphan = done.stdout.splitlines()
    assert header.startswith(f"trace {TRACE}  5 spans  4 services  10ms")
    assert "1 with errors" in header
    assert all(len(line.split("|")[0]) == len(lines[0].split("|")[0]) for line in lines)
    labels = [line.split("|")[0].rstrip() for line in lines]
    # depth-first, children by start time; the orphan is a root, after the real root
    assert labels == [
        "edge.default get /",
        "  edge.default web.default",
        "    web.default get /",
        "      ledger.default get /ledger",
        "batch.default late (orphan)",
    ]
    width = len(lines[0][lines[0].index("|") + 1 : lines[0].rindex("|")])
    assert width >= 40  # the terminal's 100 columns minus labels and durations
    bars = [bar_of(line) for line in lines]
    assert bars[0][:2] == (0, width)  # the root spans the whole timeline
    # the web server span starts at half the root's duration: at half the width
    assert bars[2][0] == round(width / 2)
    assert bars[2][1] == round(width * 9 / 10)
    assert bars[1][0] == round(width / 10)
    assert bars[3][:2] == (round(width * 6 / 10), round(width * 8 / 10))
    assert bars[4][0] == round(width * 2 / 10)
    assert [b[2] for b in bars] == ["#", "#", "#", "!", "#"]  # the error span is marked
    durations = [line.split("|")[-1].split()[0] for line in lines]
    assert durations == ["10ms", "8ms", "4ms", "2ms", "1ms"]
    assert lines[3].endswith("ERROR 503")
    assert orphan == (
        f"orphan: batch.default late (span {5:016x}): parent {255:016x} is not in this trace"
    )
    assert all(len(line) <= WIDTH for line in lines)


def test_traces_table_filters_and_json(collector: str) -> None:
    done = cli("traces", "--collector", collector, "--service", "web.default")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["TRACE", "ID", "ROOT", "START", "DURATION", "SPANS", "ERRORS"]
    # newest first: OTHER (30 s ago), then TRACE (a minute ago)
    assert [r.split()[0] for r in rows] == [OTHER, TRACE]
    other, trace = (r.split() for r in rows)
    assert other[1:3] == ["web.default:", "post"] and other[-3:] == ["3ms", "1", "-"]
    assert trace[1:3] == ["edge.default:", "get"] and trace[-3:] == ["10ms", "5", "1"]
    # minDuration applies to the service's spans: web.default's server span lasts 4 ms
    done = cli(
        "traces",
        "--collector",
        collector,
        "--service",
        "web.default",
        "--min-duration",
        "3500us",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {
            "traceId": TRACE,
            "rootService": "edge.default",
            "rootName": "get /",
            "timestamp": json.loads(done.stdout)[0]["timestamp"],
            "duration": ROOT_US,
            "spans": 5,
            "errors": 1,
        }
    ]
    done = cli("traces", "--collector", collector, "--service", "nobody", "--lookback", "2m")
    assert done.returncode == 0 and done.stdout == ""
    assert "no traces of service nobody in the last 2m" in done.stderr


def test_errors_name_the_trace_and_the_collector(collector: str) -> None:
    unknown = "1" * 32
    done = cli("trace", unknown, "--collector", collector)
    assert done.returncode == 1
    assert done.stderr.strip() == f"ubimesh trace: no trace {unknown} in {collector}"
    # the collector URL from the environment; nothing listens on port 1
    done = cli("traces", env={"UBIMESH_COLLECTOR": "http://127.0.0.1:1"})
    assert done.returncode == 1
    assert "cannot reach the trace collector at http://127.0.0.1:1" in done.stderr
    assert "--collector URL" in done.stderr
    done = cli("trace", "not-hex", "--collector", collector)
    assert done.returncode == 2 and "is not a trace id" in done.stderr


def test_bar_scaling() -> None:
    assert bar_span(0, 10, 0, 10, 50) == (0, 50)
    assert bar_span(5, 5, 0, 10, 50) == (25, 50)
    assert bar_span(9_999, 0, 0, 10_000, 50) == (49, 50)  # never empty, never past the end
    assert bar_span(0, 0, 0, 0, 20) == (0, 20)  # a zero-length trace fills the line


def test_shared_span_nests_server_under_client() -> None:
    """Envoy's Zipkin default (shared_span_context): the SERVER span reuses the CLIENT span's
    id; it nests under the client, and the id's children under the server."""
    spans = [
        span(TRACE, 1, None, "edge", "root", 0, 100, kind="SERVER"),
        span(TRACE, 2, 1, "edge", "call", 10, 80, kind="CLIENT"),
        span(TRACE, 2, 1, "web", "serve", 20, 60, kind="SERVER"),
        span(TRACE, 3, 2, "web", "db", 30, 10, kind="CLIENT"),
    ]
    text = render_waterfall(spans, 80)
    labels = [line.split("|")[0].rstrip() for line in text.splitlines()[1:]]
    assert labels == ["edge root", "  edge call", "    web serve", "      web db"]
    assert len(build_tree(spans)) == 1


def test_parse_micros() -> None:
    assert parse_micros("250us") == 250
    assert parse_micros("1.5ms") == 1_500
    assert parse_micros("2s") == 2_000_000
    assert parse_micros("1d") == 86_400_000_000
    assert parse_micros("42") == 42
    with pytest.raises(ValueError, match="not a duration"):
        parse_micros("fast")
