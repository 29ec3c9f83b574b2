"""Render a ``StatsSnapshot`` the way Envoy's admin ``/stats`` does (plain text and JSON).

Selection (``StatsQuery``) is shared with ``ubimesh.telemetry.prometheus``:

* ``filter`` is a regular expression *searched* in the full stat name (Envoy uses RE2
  ``PartialMatch``; Python's ``re`` accepts a superset of RE2 syntax, so a filter that works with
  Envoy works here). ``invert`` keeps the names that do not match.
* ``used_only`` approximates Envoy's ``usedonly``: Envoy keeps a "written since start" flag per
  stat, which a snapshot does not carry, so a counter or gauge counts as used when it is non-zero
  and a histogram when it has at least one sample. A gauge that went up and back to zero is
  therefore hidden, where Envoy would show it.

Histograms. Envoy keeps log-linear histograms and reports an *interval* (since the last stats
flush) next to the *cumulative* value. ubimesh keeps fixed buckets and no interval, so:

* the interval is always reported as Envoy reports an empty interval: ``nan`` (text) / ``null``
  (JSON) for quantiles, ``0`` for bucket counts;
* quantiles are estimated from the buckets by linear interpolation inside the bucket that holds
  the rank (the first bucket starts at 0); a rank that falls in the overflow bucket reports the
  highest finite bound. A histogram with a single sample reports that sample exactly (its sum).

Text layout (``/stats``): counters and gauges merged, sorted by name, ``name: value``; then the
histograms sorted by name, by default as Envoy's summary
``name: P0(nan,v) P25(nan,v) ... P100(nan,v)``; with ``histogram_buckets=cumulative|disjoint`` as
``name: B0.5(0,n) B1(0,n) ...``; with ``detailed`` as Envoy's three-line block
(``totals=lower,width:count, ...`` built from the fixed buckets). A histogram without samples is
``name: No recorded values`` in every mode, as in Envoy.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ubimesh.telemetry.stats import StatsSnapshot

#: The percentiles Envoy reports for every histogram, in this order.
SUPPORTED_PERCENTILES: tuple[float, ...] = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)


class StatType(enum.Enum):
    """Values of Envoy's ``/stats?type=`` parameter."""

    ALL = "All"
    COUNTERS = "Counters"
    GAUGES = "Gauges"
    HISTOGRAMS = "Histograms"
    TEXT_READOUTS = "TextReadouts"


class HistogramBuckets(enum.Enum):
    """Values of Envoy's ``histogram_buckets=`` parameter (``prometheusnative`` is not offered)."""

    SUMMARY = "summary"
    CUMULATIVE = "cumulative"
    DISJOINT = "disjoint"
    DETAILED = "detailed"


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """Which stats to show. The default selects everything."""

    filter: re.Pattern[str] | None = None
    invert: bool = False
    used_only: bool = False
    type: StatType = StatType.ALL
    histogram_buckets: HistogramBuckets = HistogramBuckets.SUMMARY

    def keeps(self, name: str) -> bool:
        if self.filter is None:
            return True
        return (self.filter.search(name) is not None) != self.invert


def select(snap: StatsSnapshot, query: StatsQuery) -> StatsSnapshot:
    """The part of ``snap`` that ``query`` selects (the snapshot's dicts are shared, not copied)."""
    out = StatsSnapshot()
    kind = query.type
    if kind in (StatType.ALL, StatType.COUNTERS):
        out.counters = {
            k: v
            for k, v in snap.counters.items()
            if query.keeps(k) and not (query.used_only and v == 0)
        }
    if kind in (StatType.ALL, StatType.GAUGES):
        out.gauges = {
            k: v
            for k, v in snap.gauges.items()
            if query.keeps(k) and not (query.used_only and v == 0)
        }
    if kind in (StatType.ALL, StatType.HISTOGRAMS):
        out.histograms = {
            k: h
            for k, h in snap.histograms.items()
            if query.keeps(k) and not (query.used_only and int(h.get("count", 0)) == 0)
        }
    return out


# ---------------------------------------------------------------------------------------------
# Numbers


def format_number(v: float) -> str:
    """Shortest text for a number, integers without a fraction (``3``, ``0.5``, ``1.05``).

    This is what Envoy prints for quantiles, sums and bucket bounds in ``/stats`` (fmt ``{}``)
    and ``/stats/prometheus``. Non-finite values use Prometheus's spelling (``NaN``, ``+Inf``).
    """
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e17:
        return str(int(v))
    return repr(v)


def _json_number(v: float) -> float | int | None:
    if isinstance(v, int):
        return v
    if not math.isfinite(v):
        return None
    if v.is_integer() and abs(v) < 1e17:
        return int(v)
    return v


# ---------------------------------------------------------------------------------------------
# Histogram helpers


@dataclass(frozen=True, slots=True)
class HistogramView:
    """A validated view of one snapshot histogram (``{"bounds", "counts", "sum", "count"}``)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    """Per-bucket (disjoint) counts; ``len(bounds) + 1`` slots, the last one is overflow."""
    sum: float
    count: int

    @classmethod
    def of(cls, h: Mapping[str, Any]) -> HistogramView:
        bounds = tuple(float(b) for b in h.get("bounds", ()))
        counts = [int(c) for c in h.get("counts", ())]
        # Tolerate a short or long counts list rather than failing the whole page.
        if len(counts) < len(bounds) + 1:
            counts.extend([0] * (len(bounds) + 1 - len(counts)))
        elif len(counts) > len(bounds) + 1:
            counts[len(bounds)] = sum(counts[len(bounds) :])
            del counts[len(bounds) + 1 :]
        count = int(h.get("count", sum(counts)))
        return cls(bounds, tuple(counts), float(h.get("sum", 0.0)), count)

    def cumulative(self) -> list[int]:
        """Cumulative counts for each finite bound (without the +Inf slot)."""
        out: list[int] = []
        running = 0
        for c in self.counts[: len(self.bounds)]:
            running += c
            out.append(running)
        return out

    def quantile(self, q: float) -> float:
        """Estimate the ``q`` quantile (0..1); NaN when there are no samples."""
        total = sum(self.counts)
        if total == 0:
            return math.nan
        if total == 1 and self.count == 1:
            return self.sum
        rank = q * total
        before = 0
        for i, c in enumerate(self.counts):
            if c == 0:
                continue
            if before + c >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1] if self.bounds else self.sum / total
                lower = self.bounds[i - 1] if i > 0 else 0.0
                upper = self.bounds[i]
                return lower + (upper - lower) * max(0.0, rank - before) / c
            before += c
        return self.bounds[-1] if self.bounds else self.sum / total

    def quantiles(self, percentiles: Sequence[float] = SUPPORTED_PERCENTILES) -> list[float]:
        return [self.quantile(p / 100.0) for p in percentiles]


def _percentile_label(p: float) -> str:
    return f"{p:g}"


# ---------------------------------------------------------------------------------------------
# Text


def render_text(snap: StatsSnapshot, query: StatsQuery = StatsQuery()) -> str:
    """Envoy's ``/stats`` plain-text page for the stats ``query`` selects."""
    sel = select(snap, query)
    lines: list[str] = []
    scalars: list[tuple[str, int]] = [*sel.counters.items(), *sel.gauges.items()]
    scalars.sort(key=lambda kv: kv[0])
    lines.extend(f"{name}: {value}" for name, value in scalars)
    mode = query.histogram_buckets
    for name in sorted(sel.histograms):
        h = HistogramView.of(sel.histograms[name])
        if sum(h.counts) == 0:
            lines.append(f"{name}: No recorded values")
        elif mode is HistogramBuckets.SUMMARY:
            lines.append(f"{name}: {_text_summary(h)}")
        elif mode is HistogramBuckets.DETAILED:
            lines.append(f"{name}:")
            lines.append(f"  totals={_text_totals(h)}")
            lines.append("  intervals=")
            lines.append(f"  summary={_text_summary(h)}")
        else:
            counts = h.cumulative() if mode is HistogramBuckets.CUMULATIVE else h.counts
            lines.append(
                f"{name}: "
                + " ".join(f"B{b:g}(0,{c})" for b, c in zip(h.bounds, counts, strict=False))
            )
    return "".join(line + "\n" for line in lines)


def _text_summary(h: HistogramView) -> str:
    return " ".join(
        f"P{_percentile_label(p)}(nan,{format_number(v)})"
        for p, v in zip(SUPPORTED_PERCENTILES, h.quantiles(), strict=True)
    )


def _buckets_detail(h: HistogramView) -> Iterable[tuple[float, float, int]]:
    """(lower bound, width, count) for each non-empty bucket; the overflow bucket has width 0."""
    for i, c in enumerate(h.counts):
        if c == 0:
            continue
        lower = h.bounds[i - 1] if i > 0 else 0.0
        width = h.bounds[i] - lower if i < len(h.bounds) else 0.0
        yield lower, width, c


def _text_totals(h: HistogramView) -> str:
    return ", ".join(
        f"{format_number(lo)},{format_number(w)}:{c}" for lo, w, c in _buckets_detail(h)
    )


# ---------------------------------------------------------------------------------------------
# JSON


def render_json(snap: StatsSnapshot, query: StatsQuery = StatsQuery()) -> str:
    """Envoy's ``/stats?format=json`` document (compact, like Envoy's)."""
    return json.dumps(stats_json(snap, query), separators=(",", ":"), allow_nan=False)


def stats_json(snap: StatsSnapshot, query: StatsQuery = StatsQuery()) -> dict[str, Any]:
    """The ``/stats?format=json`` document as Python data."""
    sel = select(snap, query)
    stats: list[dict[str, Any]] = [
        {"name": name, "value": value}
        for name, value in sorted(
            [*sel.counters.items(), *sel.gauges.items()], key=lambda kv: kv[0]
        )
    ]
    if sel.histograms:
        names = sorted(sel.histograms)
        views = [HistogramView.of(sel.histograms[n]) for n in names]
        mode = query.histogram_buckets
        supported = [_json_number(p) for p in SUPPORTED_PERCENTILES]
        if mode is HistogramBuckets.SUMMARY:
            stats.append(
                {
                    "histograms": {
                        "supported_quantiles": supported,
                        "computed_quantiles": [
                            {"name": n, "values": _json_quantiles(h)}
                            for n, h in zip(names, views, strict=True)
                        ],
                    }
                }
            )
        elif mode is HistogramBuckets.DETAILED:
            stats.append(
                {
                    "histograms": {
                        "supported_percentiles": supported,
                        "details": [
                            {
                                "name": n,
                                "totals": [
                                    {
                                        "lower_bound": _json_number(lo),
                                        "width": _json_number(w),
                                        "count": c,
                                    }
                                    for lo, w, c in _buckets_detail(h)
                                ],
                                "intervals": [],
                                "percentiles": _json_quantiles(h),
                            }
                            for n, h in zip(names, views, strict=True)
                        ],
                    }
                }
            )
        else:
            stats.append(
                {
                    "histograms": [
                        {
                            "name": n,
                            "buckets": [
                                {"upper_bound": _json_number(b), "interval": 0, "cumulative": c}
                                for b, c in zip(
                                    h.bounds,
                                    h.cumulative()
                                    if mode is HistogramBuckets.CUMULATIVE
                                    else h.counts,
                                    strict=False,
                                )
                            ],
                        }
                        for n, h in zip(names, views, strict=True)
                    ]
                }
            )
    return {"stats": stats}


def _json_quantiles(h: HistogramView) -> list[dict[str, Any]]:
    return [{"cumulative": _json_number(v), "interval": None} for v in h.quantiles()]
