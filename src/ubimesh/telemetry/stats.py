"""Envoy-style stats: counters, gauges and histograms kept by name in one store per process.

The request path fetches its ``Counter``/``Gauge``/``Histogram`` objects once (when a listener,
filter chain or cluster is built) and then bumps plain attributes, which costs about as much as
an integer add. That holds because this module is compiled with the request path
(``ubimesh.native``): from compiled code, ``counter.value += 1`` and ``Histogram.record`` are
struct field accesses and a C call, where an interpreted class would cost Python's generic
attribute protocol (type and MRO lookups, a boxed int or float) for every access.

Names follow Envoy's (``http.<stat_prefix>.downstream_rq_total``,
``cluster.<name>.upstream_rq_total``, ...), so dashboards built for Envoy read them unchanged.

``Store.snapshot()`` turns the store into plain data that crosses process boundaries; the main
process merges the workers' snapshots with ``merge_snapshots`` for /stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

_T = TypeVar("_T")
#: A Final float is a C constant when compiled; ``math.inf`` is a module attribute lookup.
_INF: Final = math.inf

#: Envoy's default histogram bucket bounds, in milliseconds. Floats, not ints: ``record``
#: compares a float sample with them several times per request; compiled, a float bound unboxes
#: directly (an int one would be converted each time), and interpreted, a float-to-float
#: comparison is about twice as fast as a float-to-int one.
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
)  # fmt: skip


def _python_class(cls: type[_T]) -> type[_T]:
    """Keep ``cls`` an ordinary Python class when mypyc compiles this module (mypyc turns a class
    with a decorator it does not know into one). For classes off the request path that need
    what a native class lacks: ``Store`` is a ``weakref.WeakKeyDictionary`` key (tcp_proxy,
    circuit_breaker) and native instances cannot be weakly referenced; ``StatsSnapshot`` is
    pickled between processes, which then need not agree on whether the build is in use."""
    return cls


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    """``bisect.bisect_left(bounds, value)`` for sorted ``bounds``: the index of the first bound
    not below ``value`` (``len(bounds)`` when none is; 0 for NaN, as bisect gives).

    Compiled, a linear scan costs a few instructions a bound (an unboxed double compare), less
    than ``bisect`` (which boxes ``value`` and compares float objects) or a binary search (tagged
    integer arithmetic): most samples land in the first few buckets (durations of a few
    milliseconds, bodies of a few kB), and one past the last bound scans them all (19 at most)."""
    i = 0
    for bound in bounds:
        if bound < value:
            i += 1
        else:
            return i
    return i


class Counter:
    """A monotonically increasing count. Bump ``value`` directly on the hot path."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class Gauge:
    """A value that goes up and down (connections open, requests active)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v


class Histogram:
    """Cumulative-bucket histogram of millisecond values (Envoy's and Prometheus's shape).

    ``counts[i]`` counts samples <= ``bounds[i]``, non-cumulatively; the last slot is +Inf.
    """

    __slots__ = ("bounds", "count", "counts", "last_high", "last_index", "last_low", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS_MS) -> None:
        # As floats whatever the caller passed (see DEFAULT_BUCKETS_MS: faster comparisons).
        self.bounds: tuple[float, ...] = tuple([float(b) for b in bounds])
        self.counts: list[int] = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0
        # The bucket of the last sample, as the range (last_low, last_high] it covers:
        # consecutive samples mostly fall in the same bucket (similar durations, the same
        # body sizes), and two float compares cost less than the scan. Empty at first.
        self.last_index = 0
        self.last_low = _INF
        self.last_high = -_INF

    def record(self, value_ms: float) -> None:
        """Count one sample (a sample equal to a bound goes in that bound's bucket, as
        Prometheus's ``le``). From compiled code this is a direct C call."""
        counts = self.counts
        if self.last_low < value_ms <= self.last_high:
            i = self.last_index
        else:
            bounds = self.bounds
            i = bucket_index(bounds, value_ms)
            self.last_index = i
            self.last_low = bounds[i - 1] if i > 0 else -_INF
            self.last_high = bounds[i] if i < len(bounds) else _INF
        counts[i] = counts[i] + 1  # not ``+=``: mypyc compiles that to a generic number add
        self.sum += value_ms
        self.count += 1


@_python_class
@dataclass
class StatsSnapshot:
    """Plain-data copy of a store: safe to pickle, send to another process and merge."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)


@_python_class
class Store:
    """All stats of one process, by name. Asking twice for a name returns the same object.
    An ordinary Python class even when compiled (weakly referenced: see ``_python_class``)."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}
        self.gauges: dict[str, Gauge] = {}
        self.histograms: dict[str, Histogram] = {}

    def counter(self, name: str) -> Counter:
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = Counter()
        return c

    def gauge(self, name: str) -> Gauge:
        g = self.gauges.get(name)
        if g is None:
            g = self.gauges[name] = Gauge()
        return g

    def histogram(self, name: str, bounds: tuple[float, ...] = DEFAULT_BUCKETS_MS) -> Histogram:
        """The histogram ``name``; ``bounds`` apply when it is made (a name keeps its bounds)."""
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram(bounds)
        return h

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            counters={k: c.value for k, c in self.counters.items()},
            gauges={k: g.value for k, g in self.gauges.items()},
            histograms={
                k: {
                    "bounds": list(h.bounds),
                    "counts": list(h.counts),
                    "sum": h.sum,
                    "count": h.count,
                }
                for k, h in self.histograms.items()
            },
        )


def merge_snapshots(snaps: list[StatsSnapshot]) -> StatsSnapshot:
    """Sum counters, gauges and histogram buckets across processes (Envoy sums across workers)."""
    out = StatsSnapshot()
    for s in snaps:
        for k, v in s.counters.items():
            out.counters[k] = out.counters.get(k, 0) + v
        for k, v in s.gauges.items():
            out.gauges[k] = out.gauges.get(k, 0) + v
        for k, h in s.histograms.items():
            cur = out.histograms.get(k)
            if cur is None:
                out.histograms[k] = {
                    "bounds": list(h["bounds"]),
                    "counts": list(h["counts"]),
                    "sum": h["sum"],
                    "count": h["count"],
                }
            else:
                cur["counts"] = [a + b for a, b in zip(cur["counts"], h["counts"], strict=True)]
                cur["sum"] += h["sum"]
                cur["count"] += h["count"]
    return out
