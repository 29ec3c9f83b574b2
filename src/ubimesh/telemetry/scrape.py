"""What ``ubimesh top`` computes from the proxies' ``/stats/prometheus`` pages: pure functions,
no I/O (the scraping is in ``ubimesh.cli.top_cmds``).

1. :func:`parse_text` reads the Prometheus text exposition format (0.0.4) into samples. Only the
   subset proxies write is needed, but the whole line grammar is accepted: comments, labels in
   any order with ``\\\\``, ``\\"`` and ``\\n`` escapes and a trailing comma, ``NaN``/``+Inf``/
   ``-Inf``, an optional timestamp (ignored). A malformed line raises :class:`ParseError` naming
   its number, as Prometheus fails a whole scrape on one bad line.
2. :func:`mesh_metrics` keeps what ``top`` reads, Istio's standard metrics as reported by the
   *destination* proxy (``reporter="destination"``): the ``istio_requests_total`` counter and the
   ``istio_request_duration_milliseconds`` histogram's ``_bucket`` series, per full label set.
3. :func:`aggregate` turns two scrapes of each proxy into per-service rows (by
   ``destination_service``): requests per second, success rate (non-5xx / all), p50 and p99.

Increases follow Prometheus's ``increase()`` semantics, without its extrapolation: a counter
that went down was reset (the proxy restarted), so its whole current value is the increase; a
series absent from the earlier scrape of a proxy was created since (Istio creates a series at
its first request), so its whole value counts too. A histogram series is reset as a whole when
its bucket layout changed or any bucket went down. Quantiles are Prometheus's
``histogram_quantile`` (linear interpolation within the bucket holding the rank; buckets merged
by upper bound across series and proxies, made monotonic; NaN -> None without a ``+Inf``
bucket or without observations).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: Labels of one series, sorted by name: hashable, and equal whatever order the page used.
Labels = tuple[tuple[str, str], ...]

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds"
DURATION_BUCKET = DURATION + "_bucket"
#: Series of a proxy that ``top`` reads; everything else on the page is skipped unparsed.
MESH_PREFIXES = (REQUESTS, DURATION_BUCKET)
#: Istio's value for a label it cannot fill.
UNKNOWN = "unknown"


class ParseError(ValueError):
    """A line of the exposition text is not in the format; the message names the line."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of the page: metric name, labels (sorted by name) and value."""

    name: str
    labels: Labels
    value: float


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(value: str, lineno: int) -> str:
    def one(m: re.Match[str]) -> str:
        char = m.group(1)
        if char not in _ESCAPES:
            raise ParseError(f"line {lineno}: unknown escape \\{char} in a label value")
        return _ESCAPES[char]

    return _ESCAPE.sub(one, value) if "\\" in value else value


def _float(text: str, lineno: int) -> float:
    try:
        # Go's ParseFloat, which Prometheus uses, reads NaN, +Inf, -Inf (any case) as Python does.
        return float(text)
    except ValueError:
        raise ParseError(f"line {lineno}: {text!r} is not a number") from None


def parse_line(line: str, lineno: int = 0) -> Sample | None:
    """One line of the text format as a :class:`Sample`; None for a blank line or a comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    m = _NAME.match(text)
    if m is None:
        raise ParseError(f"line {lineno}: no metric name at the start of {line!r}")
    name = m.group(0)
    pos = m.end()
    labels: list[tuple[str, str]] = []
    if pos < len(text) and text[pos] == "{":
        pos += 1
        while True:
            if text.startswith("}", pos):
                pos += 1
                break
            lm = _LABEL.match(text, pos)
            if lm is None:
                raise ParseError(f"line {lineno}: malformed labels in {line!r}")
            labels.append((lm.group(1), _unescape(lm.group(2), lineno)))
            pos = lm.end()
            if text.startswith(",", pos):
                pos += 1
                while text.startswith((" ", "\t"), pos):
                    pos += 1
            elif not text.startswith("}", pos):
                raise ParseError(f"line {lineno}: expected ',' or '}}' after a label in {line!r}")
    rest = text[pos:]
    if rest and rest[0] not in " \t":
        raise ParseError(f"line {lineno}: expected a space before the value in {line!r}")
    fields = rest.split()
    if not 1 <= len(fields) <= 2:
        raise ParseError(f"line {lineno}: expected a value and an optional timestamp: {line!r}")
    if len(fields) == 2:
        _float(fields[1], lineno)  # the timestamp: checked, not used
    if len({k for k, _ in labels}) != len(labels):
        raise ParseError(f"line {lineno}: a label appears twice in {line!r}")
    return Sample(name, tuple(sorted(labels)), _float(fields[0], lineno))


def parse_text(text: str, *, prefixes: Sequence[str] = ()) -> list[Sample]:
    """Every sample of an exposition page, in page order.

    ``prefixes``: only lines starting with one of them are parsed (the rest of the page, which
    may be thousands of Envoy stats, is skipped unread); empty means all. Raises ParseError.
    """
    wanted = tuple(prefixes)
    out: list[Sample] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if wanted and not line.lstrip().startswith(wanted):
            continue
        sample = parse_line(line, lineno)
        if sample is not None:
            out.append(sample)
    return out


@dataclass(slots=True)
class MeshMetrics:
    """One proxy's destination-side request metrics at one scrape.

    ``requests``: ``istio_requests_total`` per series; ``durations``: per series of
    ``istio_request_duration_milliseconds`` (labels without ``le``), cumulative bucket counts by
    upper bound (``math.inf`` for ``+Inf``). Only ``reporter="destination"`` series.
    """

    requests: dict[Labels, float] = field(default_factory=dict)
    durations: dict[Labels, dict[float, float]] = field(default_factory=dict)


def _destination(labels: Labels) -> bool:
    return ("reporter", "destination") in labels


def mesh_metrics(samples: Iterable[Sample]) -> MeshMetrics:
    """The series ``top`` reads, from a page's samples (see :class:`MeshMetrics`). A bucket
    whose ``le`` is not a number is a ParseError; NaN sample values are skipped."""
    out = MeshMetrics()
    for s in samples:
        if math.isnan(s.value) or not _destination(s.labels):
            continue
        if s.name == REQUESTS:
            out.requests[s.labels] = s.value
        elif s.name == DURATION_BUCKET:
            le_text = ""
            rest: list[tuple[str, str]] = []
            for k, v in s.labels:
                if k == "le":
                    le_text = v
                else:
                    rest.append((k, v))
            try:
                le = float(le_text)
            except ValueError:
                raise ParseError(
                    f"{DURATION_BUCKET}: le={le_text!r} is not a bucket bound (a number or +Inf)"
                ) from None
            out.durations.setdefault(tuple(rest), {})[le] = s.value
    return out


def read_mesh_metrics(text: str) -> MeshMetrics:
    """:func:`mesh_metrics` of an exposition page. Raises ParseError."""
    return mesh_metrics(parse_text(text, prefixes=MESH_PREFIXES))


# ---------------------------------------------------------------------------------------------
# Increases between two scrapes


def counter_increase(before: float | None, after: float) -> float:
    """How much a counter grew between two scrapes: ``after - before``; a counter that went down
    was reset (all of ``after`` is new); ``before`` None (a new series) counts all of
    ``after``."""
    if before is None or after < before:
        return after
    return after - before


def buckets_increase(
    before: Mapping[float, float] | None, after: Mapping[float, float]
) -> dict[float, float]:
    """How much each cumulative bucket of one histogram series grew. The whole of ``after``
    when the series is new, its bucket bounds changed or any bucket went down (a reset)."""
    if before is None or before.keys() != after.keys():
        return dict(after)
    if any(after[le] < before[le] for le in after):
        return dict(after)
    return {le: after[le] - before[le] for le in after}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile(q, ...)`` over cumulative ``buckets`` (upper bound ->
    count), with NaN as None: None without a ``+Inf`` bucket, with fewer than two buckets, or
    with no observations. Counts that decrease with the bound (series merged with different
    layouts) are made monotonic first, as Prometheus does."""
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    counts: list[float] = []
    for b in bounds:
        c = buckets[b]
        counts.append(max(c, counts[-1]) if counts else c)
    if len(bounds) < 2:
        return None
    observations = counts[-1]
    if observations <= 0:
        return None
    rank = q * observations
    # The first bucket whose count reaches the rank (never the +Inf bucket itself).
    b = next((i for i in range(len(bounds) - 1) if counts[i] >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0
    end = bounds[b]
    count = counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


# ---------------------------------------------------------------------------------------------
# Per-service rows


@dataclass(slots=True)
class ServiceRow:
    """One service over the interval. ``rps`` and ``errors_per_s`` are summed over the proxies
    reporting it (each over its own time between scrapes); ``success_rate`` (0..1), ``p50_ms``
    and ``p99_ms`` are None without requests; ``proxies`` counts the destination proxies that
    have its series."""

    service: str
    requests: float = 0.0
    errors: float = 0.0
    rps: float = 0.0
    errors_per_s: float = 0.0
    success_rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    proxies: int = 0
    buckets: dict[float, float] = field(default_factory=dict, repr=False)

    def as_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "rps": self.rps,
            "successRate": self.success_rate,
            "p50Ms": self.p50_ms,
            "p99Ms": self.p99_ms,
            "requests": self.requests,
            "errors": self.errors,
            "proxies": self.proxies,
        }


@dataclass(frozen=True, slots=True)
class ProxyInterval:
    """Two scrapes of one proxy, ``seconds`` apart (> 0)."""

    before: MeshMetrics
    after: MeshMetrics
    seconds: float


def _label(labels: Labels, name: str) -> str:
    for k, v in labels:
        if k == name:
            return v or UNKNOWN
    return UNKNOWN


def is_error(response_code: str) -> bool:
    """A 5xx answer (what the success rate counts as failed, as Istio's dashboards do)."""
    return response_code.startswith("5")


def aggregate(intervals: Iterable[ProxyInterval]) -> list[ServiceRow]:
    """Per ``destination_service`` rows, sorted by name, from each proxy's two scrapes."""
    rows: dict[str, ServiceRow] = {}

    def row(service: str) -> ServiceRow:
        r = rows.get(service)
        if r is None:
            r = rows[service] = ServiceRow(service)
        return r

    for iv in intervals:
        if iv.seconds <= 0:
            raise ValueError(f"a proxy interval must be positive, not {iv.seconds} s")
        seen: set[str] = set()
        for labels, value in iv.after.requests.items():
            service = _label(labels, "destination_service")
            seen.add(service)
            inc = counter_increase(iv.before.requests.get(labels), value)
            r = row(service)
            r.requests += inc
            r.rps += inc / iv.seconds
            if is_error(_label(labels, "response_code")):
                r.errors += inc
                r.errors_per_s += inc / iv.seconds
        for labels, buckets in iv.after.durations.items():
            service = _label(labels, "destination_service")
            seen.add(service)
            r = row(service)
            for le, inc in buckets_increase(iv.before.durations.get(labels), buckets).items():
                r.buckets[le] = r.buckets.get(le, 0.0) + inc
        for service in seen:
            rows[service].proxies += 1
    for r in rows.values():
        if r.requests > 0:
            r.success_rate = 1.0 - r.errors / r.requests
        r.p50_ms = histogram_quantile(0.5, r.buckets)
        r.p99_ms = histogram_quantile(0.99, r.buckets)
    return [rows[k] for k in sorted(rows)]


#: ``--sort`` keys: each puts the row to look at first at the top (ties by service name).
SORT_KEYS = ("rps", "p99", "errors", "name")


def sort_rows(rows: Sequence[ServiceRow], key: str) -> list[ServiceRow]:
    """``rps``: busiest first; ``p99``: slowest first (no data last); ``errors``: highest share
    of 5xx first, then most 5xx per second; ``name``: alphabetical."""
    by_name = sorted(rows, key=lambda r: r.service)
    if key == "name":
        return by_name
    if key == "rps":
        return sorted(by_name, key=lambda r: -r.rps)
    if key == "p99":
        return sorted(by_name, key=lambda r: -(r.p99_ms if r.p99_ms is not None else -math.inf))
    if key == "errors":
        return sorted(
            by_name,
            key=lambda r: (
                -(1.0 - r.success_rate) if r.success_rate is not None else 1.0,
                -r.errors_per_s,
            ),
        )
    raise ValueError(f"sort: {key!r} is not one of {', '.join(SORT_KEYS)}")


# ---------------------------------------------------------------------------------------------
# Text


def format_ms(ms: float | None) -> str:
    """``-`` for none; ``0.42ms``, ``12.5ms``, ``250ms``, ``1.25s``, ``+Inf``."""
    if ms is None or math.isnan(ms):
        return "-"
    if math.isinf(ms):
        return "+Inf" if ms > 0 else "-Inf"
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    if ms >= 100:
        return f"{ms:.0f}ms"
    if ms >= 10:
        return f"{ms:.1f}ms"
    return f"{ms:.2f}ms"


def format_rate(rps: float) -> str:
    if rps >= 100:
        return f"{rps:.0f}"
    if rps >= 10:
        return f"{rps:.1f}"
    return f"{rps:.2f}"


def format_success(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate * 100:.1f}%"


HEADER = ("SERVICE", "RPS", "SUCCESS", "P50", "P99", "PROXIES")


def render_table(rows: Sequence[ServiceRow]) -> str:
    """Rows as an aligned table (numbers right-aligned), one line each, header first."""
    cells = [list(HEADER)] + [
        [
            r.service,
            format_rate(r.rps),
            format_success(r.success_rate),
            format_ms(r.p50_ms),
            format_ms(r.p99_ms),
            str(r.proxies),
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for c in cells:
        parts = [c[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True)
        ]
        lines.append("   ".join(parts).rstrip() + "\n")
    return "".join(lines)
