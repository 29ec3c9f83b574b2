"""%START_TIME% split into a per-second part and a per-line fraction renders exactly what the
general time formatter renders, for Envoy's default format and custom ones."""

from __future__ import annotations

import random

import pytest

from ubimesh.proxy.access_log.format import LogEntry, _whole_second_format, compile_text
from ubimesh.proxy.routing.formatter import compile_time_format

PARTS = ["", "Z", "%Y-%m-%dT%H:%M:%S.", "[%d/%b/%Y:%H:%M:%S +0000] ", "%s.", "%Es", "%a %j"]


@pytest.mark.parametrize("fmt", PARTS)
def test_whole_second_parts_match_the_general_renderer(fmt: str) -> None:
    fast, general = _whole_second_format(fmt), compile_time_format(fmt)
    rng = random.Random(fmt)
    for _ in range(100):
        t = float(rng.randrange(0, 4_000_000_000))
        assert fast(t) == general(t)


@pytest.mark.parametrize(
    "fmt", ["", "%Y-%m-%dT%H:%M:%S.%3fZ", "%s.%6f", "%d/%b/%Y %H:%M:%S.%9f x", "%Es.%1f"]
)
def test_start_time_lines_match_the_general_renderer(fmt: str) -> None:
    render = compile_text(f"[%START_TIME({fmt})%]" if fmt else "[%START_TIME%]")
    general = compile_time_format(fmt or "%Y-%m-%dT%H:%M:%S.%3fZ")
    rng = random.Random(fmt)
    for _ in range(200):
        # Whole seconds and the next ones, so the per-second cache is hit and renewed.
        t = rng.randrange(0, 2_000_000_000) + rng.random()
        for u in (t, t + 0.25, t + 1.0):
            line = render(LogEntry(True, u))
            assert line == f"[{general(u)}]", (fmt, u)
