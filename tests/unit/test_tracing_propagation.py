"""Trace context parsing and injection (ubimesh.proxy.tracing.context): B3 single and multi
header, W3C traceparent/tracestate, with the spec's test vectors; malformed input never
raises anything but ``Malformed`` (B3) and never yields a context (W3C)."""

from __future__ import annotations

import pytest

from ubimesh.proxy.tracing import context as tc

TID = "80f198ee56343ba864fe8b2a57d3eff7"
SID = "e457b5a2e4d86bd1"
PID = "05e3ac9a4f6e3b90"


def found(*items: tuple[str, str]) -> dict[str, list[str]]:
    got = tc.collect(list(items))
    assert got is not None
    return got


def test_collect_finds_only_trace_headers() -> None:
    assert tc.collect([("host", "a"), ("accept", "*/*")]) is None
    got = found(("b3", "1"), ("host", "a"), ("tracestate", "a=1"), ("tracestate", "b=2"))
    assert got == {"b3": ["1"], "tracestate": ["a=1", "b=2"]}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{TID}-{SID}", (TID, SID, "", tc.UNKNOWN, False)),
        (f"{TID[16:]}-{SID}-d", (TID[16:], SID, "", 1, True)),
        (f"{TID}-{SID}-1-{PID}", (TID, SID, PID, 1, False)),
        (f"{TID}-{SID}-0", (TID, SID, "", 0, False)),
        ("0", ("", "", "", 0, False)),
        ("d", ("", "", "", 1, True)),
    ],
)
def test_b3_single_header(value: str, expected: tuple[str, str, str, int, bool]) -> None:
    ctx = tc.extract_b3(found(("b3", value)))
    assert ctx is not None and ctx.single_b3
    assert (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.debug) == expected


@pytest.mark.parametrize(
    "value",
    [
        f"{TID}-{SID}-2",  # bad state
        f"{TID.upper()}-{SID}",  # upper case
        f"{TID}-{SID[:15]}",  # 15-digit span id
        f"{'0' * 32}-{SID}",  # all-zero trace id
        f"{TID}-{SID}-1-{PID}-x",  # too many parts
        "x",
        TID,
    ],
)
def test_malformed_b3_single_header(value: str) -> None:
    with pytest.raises(tc.Malformed):
        tc.extract_b3(found(("b3", value)))


def test_b3_multi_header_first_value_wins_and_single_wins_over_multi() -> None:
    ctx = tc.extract_b3(found(("x-b3-traceid", TID), ("x-b3-spanid", SID),
                              ("x-b3-parentspanid", PID), ("x-b3-sampled", "1"),
                              ("x-b3-traceid", "1" * 32)))  # fmt: skip
    assert ctx is not None and not ctx.single_b3
    assert (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled) == (TID, SID, PID, 1)
    both = tc.extract_b3(found(("x-b3-traceid", TID), ("x-b3-spanid", SID), ("b3", "0")))
    assert both is not None and both.single_b3 and both.sampled == 0 and not both.has_ids
    flags = tc.extract_b3(found(("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-flags", "1")))
    assert flags is not None and flags.debug and flags.sampled == 1
    only = tc.extract_b3(found(("x-b3-sampled", "0")))
    assert only is not None and not only.has_ids and only.sampled == 0
    assert tc.extract_b3(found(("traceparent", "x"))) is None


@pytest.mark.parametrize(
    "items",
    [
        [("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-parentspanid", "-")],
        [("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-sampled", "")],
        [("x-b3-traceid", "zz"), ("x-b3-spanid", SID)],
        [("x-b3-traceid", TID)],
        [("x-b3-parentspanid", PID)],
    ],
)
def test_malformed_b3_multi_header(items: list[tuple[str, str]]) -> None:
    with pytest.raises(tc.Malformed):
        tc.extract_b3(found(*items))


W3C_TID = "4bf92f3577b34da6a3ce929d0e0e4736"
W3C = f"00-{W3C_TID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (W3C, (W3C_TID, "00f067aa0ba902b7", 1)),
        (f" {W3C}\t", (W3C_TID, "00f067aa0ba902b7", 1)),
        (W3C[:-2] + "00", (W3C_TID, "00f067aa0ba902b7", 0)),
        (W3C[:-2] + "03", (W3C_TID, "00f067aa0ba902b7", 3)),
        ("cc" + W3C[2:] + "-what-the-future-holds", (W3C_TID, "00f067aa0ba902b7", 1)),
    ],
)
def test_valid_traceparent(value: str, expected: tuple[str, str, int]) -> None:
    assert tc.parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "ff" + W3C[2:],
        W3C + "-extra",
        W3C + ".",
        "cc" + W3C[2:] + ".what",
        W3C.upper(),
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{W3C_TID}-{'0' * 16}-01",
        W3C[:-1],
        "0x" + W3C[2:],
        "",
    ],
)
def test_invalid_traceparent(value: str) -> None:
    assert tc.parse_traceparent(value) is None


def test_w3c_context_and_tracestate_rules() -> None:
    ctx = tc.extract_w3c(found(("traceparent", W3C), ("tracestate", "a=1, ,b=2"),
                               ("tracestate", "c=3")))  # fmt: skip
    assert ctx is not None and ctx.tracestate == "a=1,b=2,c=3" and ctx.sampled == 1
    # two traceparent headers: invalid, start over
    assert tc.extract_w3c(found(("traceparent", W3C), ("traceparent", W3C))) is None
    assert tc.extract_w3c(found(("tracestate", "a=1"))) is None
    for bad in ["foo=bar=baz", "foo=,bar=3", "K=v", "a=1\x01", "x" * 257 + "=1",
                ",".join(f"k{i}=v" for i in range(33))]:
        ctx = tc.extract_w3c(found(("traceparent", W3C), ("tracestate", bad)))
        assert ctx is not None and ctx.tracestate == "", bad
    assert tc.clean_tracestate("t@vvvvvvvvvvvvvvv=1") == "t@vvvvvvvvvvvvvvv=1"


def test_injection_forms() -> None:
    assert tc.b3_headers(TID, SID, PID, True, single=False) == [
        ("x-b3-traceid", TID), ("x-b3-spanid", SID), ("x-b3-parentspanid", PID),
        ("x-b3-sampled", "1")]  # fmt: skip
    assert tc.b3_headers(TID, SID, "", False, single=False)[-1] == ("x-b3-sampled", "0")
    assert tc.b3_headers(TID, SID, PID, True, single=True) == [("b3", f"{TID}-{SID}-1-{PID}")]
    assert tc.b3_headers(TID, SID, "", False, single=True) == [("b3", f"{TID}-{SID}-0")]
    assert tc.traceparent(TID[16:], SID, True) == f"00-{'0' * 16}{TID[16:]}-{SID}-01"
    assert tc.traceparent(TID, SID, False) == f"00-{TID}-{SID}-00"
    assert tc.parse_traceparent(tc.traceparent(TID, SID, True)) == (TID, SID, 1)
