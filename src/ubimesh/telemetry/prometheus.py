"""Prometheus text exposition (format 0.0.4) of a ``StatsSnapshot``, as Envoy's
``/stats/prometheus`` writes it.

Names. Envoy runs its *default tag extractors* over every stat name: each one finds a variable
part (a cluster name, an HTTP stat prefix, a listener address, a response code, ...), turns it
into a tag and cuts it out of the name. What is left, with every character outside
``[a-zA-Z0-9_]`` replaced by ``_`` and ``envoy_`` in front, is the metric name; the tags become
labels named ``envoy_<tag>``::

    cluster.backend.upstream_rq_total
        -> envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"}
    listener.127.0.0.1_8080.http.ingress.downstream_rq_2xx
        -> envoy_listener_http_downstream_rq_xx{envoy_response_code_class="2",
               envoy_http_conn_manager_prefix="ingress",envoy_listener_address="127.0.0.1_8080"}

``EXTRACTORS`` below is Envoy's default table (source/common/config/well_known_names.cc) with
the same matching rules (regex extractors: first group is cut, second group is the value;
token extractors: ``*`` one token, ``**`` any tokens, ``$`` the value), the same order (which
decides label order) and the same exclusions (``listener.admin.*`` carries no address tag).
One extractor is ubimesh's own: ``envoy.rbac_policy_name`` also for the RBAC network filter's
per-policy denials (``<stat_prefix>.rbac.policy.<policy>.denied``), which Envoy does not have.
Envoy's ``stats_config`` (custom tags, ``use_all_default_tags: false``) is not supported.
Stats already named in Prometheus's form, ``metric{label="v",...}`` (Istio's mesh metrics,
``ubimesh.telemetry.mesh_metrics``), are written as they are, without tag extraction.

Output layout, as Envoy's: one ``# TYPE`` line per metric family, no ``# HELP``; all counter
families, then gauges, then histograms; families sorted by tag-extracted name; series in a
family sorted by full stat name; a series without labels is written ``name{} value``. Histograms
are ``_bucket{...,le="..."}`` (cumulative, ending with ``le="+Inf"``), ``_sum`` and ``_count``;
with ``histogram_buckets="summary"`` they are a ``summary`` family with ``quantile`` labels
(Envoy fills those from the last flush interval, ubimesh from the cumulative buckets; see
``ubimesh.telemetry.render`` for how quantiles are estimated). If two stats of different types
end up with the same metric name, the first family written wins and the other is left out, so
the page always parses. Numbers are written as Envoy writes them (integers without a fraction,
shortest round-trip decimals), except NaN and infinities, which use the exposition format's
``NaN``/``+Inf`` where Envoy writes ``nan``; Prometheus reads both.

The page is served as ``text/plain; version=0.0.4`` (Envoy sends ``text/plain`` without the
version; the versioned type is what Prometheus asks for).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from ubimesh.telemetry.render import (
    SUPPORTED_PERCENTILES,
    HistogramBuckets,
    HistogramView,
    StatsQuery,
    format_number,
    select,
)
from ubimesh.telemetry.stats import StatsSnapshot

#: Content type of the text exposition format (what Envoy sends is text/plain; charset=UTF-8,
#: which Prometheus also accepts).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Tags = tuple[tuple[str, str], ...]

# ---------------------------------------------------------------------------------------------
# Tag extraction

_SUBSTITUTIONS = {
    # An IPv4 or IPv6 address plus port as Envoy spells it in stat names: 127.0.0.1_80, [__1]_80.
    "<ADDRESS>": r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)",
    "<CIPHER>": r"[\w-]+",
    "<TLS_VERSION>": r"TLSv\d\.\d",
    "<TAG_VALUE>": r"[^\.]+",
    "<ROUTE_CONFIG_NAME>": r"[\w\-\./]+",
    "<SCOPED_ROUTE_CONFIG_NAME>": r"[\w\-\.]+",
    "<LISTENER_OR_CLUSTER_WITH_NAME>": r"(?:listener|cluster)\..*?",
    "<PROXY_PROTOCOL_VERSION>": r"\d",
}


def _expand(regex: str) -> str:
    for key, value in _SUBSTITUTIONS.items():
        regex = regex.replace(key, value)
    return regex


_PREFIX_RE = re.compile(r"\^([A-Za-z0-9_]+)(?:\\\.|\(\?=\\\.\))")


class _Extractor:
    """One default tag extractor. ``extract`` returns (value, cut start, cut end) or None."""

    __slots__ = ("name", "prefix")

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        """The first token a stat name must have for this extractor to apply ("" for any)."""

    def extract(self, name: str, tokens: list[str]) -> tuple[str, int, int] | None:
        raise NotImplementedError


class _RegexExtractor(_Extractor):
    __slots__ = ("negative", "regex")

    def __init__(self, name: str, regex: str, negative: str = "") -> None:
        expanded = _expand(regex)
        m = _PREFIX_RE.match(expanded)
        super().__init__(name, m.group(1) if m else "")
        self.regex = re.compile(expanded, re.ASCII)
        self.negative = negative

    def extract(self, name: str, tokens: list[str]) -> tuple[str, int, int] | None:
        m = self.regex.search(name)
        if m is None or not m.group(1):
            return None
        value = (m.group(2) if self.regex.groups >= 2 else None) or m.group(1)
        if self.negative and value == self.negative:
            return None
        return value, m.start(1), m.end(1)


class _TokenExtractor(_Extractor):
    __slots__ = ("literals", "match_index", "pattern")

    def __init__(self, name: str, pattern: str) -> None:
        toks = pattern.split(".")
        first = toks[0]
        super().__init__(name, "" if first in ("$", "*", "**") else first)
        self.pattern = toks
        self.match_index = toks.index("$")
        self.literals = frozenset(t for t in toks if t not in ("*", "**", "$"))
        """Tokens a name must contain for the pattern to match (a quick test before searching)."""

    def extract(self, name: str, tokens: list[str]) -> tuple[str, int, int] | None:
        if not self.literals.issubset(tokens):
            return None
        found: list[int] = [0, -1]  # offset in the name and index of the token "$" matched
        if not self._search(tokens, 0, 0, 0, found) or found[1] < 0:
            return None
        start, idx = found
        value = tokens[idx]
        end = start + len(value)
        if idx < len(tokens) - 1:
            end += 1  # "ab." at the start or "cd." in the middle
        elif start > 0:
            start -= 1  # ".ef" at the end
        return value, start, end

    def _search(self, tokens: list[str], ti: int, pi: int, ci: int, found: list[int]) -> bool:
        """Match pattern[pi:] against tokens[ti:] (``ci``: offset of tokens[ti] in the name).
        ``*`` is one token, ``**`` at the end one or more, elsewhere zero or more."""
        pat = self.pattern
        while ti < len(tokens) and pi < len(pat):
            if pi == self.match_index:
                found[0] = ci
                found[1] = ti
            elif pat[pi] == "**":
                if pi == len(pat) - 1:
                    return True
                for start in range(ti, len(tokens)):
                    if self._search(tokens, start, pi + 1, ci, found):
                        return True
                    ci += len(tokens[start]) + 1
                return False
            elif pat[pi] != "*" and pat[pi] != tokens[ti]:
                return False
            ci += len(tokens[ti]) + 1
            ti += 1
            pi += 1
        return pi == len(pat) and ti == len(tokens)


#: Envoy's default regex extractors, then its default token extractors, in Envoy's order.
EXTRACTORS: tuple[_Extractor, ...] = (
    _RegexExtractor("envoy.response_code", r"_rq(_(\d{3}))$"),
    _RegexExtractor("envoy.response_code_class", r"_rq_((\d))xx$"),
    _RegexExtractor(
        "envoy.dynamo_partition_id",
        r"^http\.<TAG_VALUE>\.dynamodb\.table\.<TAG_VALUE>\.capacity\.<TAG_VALUE>"
        r"(\.__partition_id=(\w{7}))$",
    ),
    _RegexExtractor(
        "envoy.dynamo_operation",
        r"^http\.<TAG_VALUE>\.dynamodb.(?:operation|table\.<TAG_VALUE>\.capacity)"
        r"(\.(<TAG_VALUE>))(?:\.|$)",
    ),
    _RegexExtractor(
        "envoy.dynamo_table", r"^http\.<TAG_VALUE>\.dynamodb.(?:table|error)\.((<TAG_VALUE>)\.)"
    ),
    _RegexExtractor("envoy.ssl_cipher", r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$"),
    _RegexExtractor(
        "envoy.ssl_curve", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.curves(\.(<CIPHER>))$"
    ),
    _RegexExtractor(
        "envoy.ssl_sigalg", r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.sigalgs(\.(<CIPHER>))$"
    ),
    _RegexExtractor(
        "envoy.ssl_version",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.versions(\.(<TLS_VERSION>))$",
    ),
    _RegexExtractor("cipher_suite", r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$"),
    _RegexExtractor("envoy.http_conn_manager_prefix", r"^listener\..*?\.http\.((<TAG_VALUE>)\.)"),
    _RegexExtractor(
        "envoy.worker_id",
        r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)|server|listener_manager"
        r"|thread_local_cluster_manager)\.worker_((\d+)\.)",
    ),
    _RegexExtractor(
        "envoy.listener_address", r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)", negative="admin"
    ),
    _RegexExtractor(
        "envoy.rds_route_config", r"^http\.<TAG_VALUE>\.rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$"
    ),
    _RegexExtractor(
        "envoy.scoped_rds_config",
        r"^http\.<TAG_VALUE>\.scoped_rds\.((<SCOPED_ROUTE_CONFIG_NAME>)\.)\w+?$",
    ),
    _RegexExtractor(
        "envoy.rbac_policy_name",
        r"^http\.<TAG_VALUE>\.rbac\.(?:<TAG_VALUE>\.)?policy\.((<TAG_VALUE>)\.)"
        r"(allowed|shadow_allowed|denied|shadow_denied)$",
    ),
    _RegexExtractor(
        "envoy.rbac_http_prefix", r"^http\.<TAG_VALUE>\.rbac\.((<TAG_VALUE>)\.).*?", "policy"
    ),
    # ubimesh's own: the RBAC network filter's per-policy denials
    # (<stat_prefix>.rbac.[<shadow prefix>.]policy.<policy>.<outcome>) get the same label as the
    # HTTP filter's, instead of a metric name per policy.
    _RegexExtractor(
        "envoy.rbac_policy_name",
        r"^<TAG_VALUE>\.rbac\.(?:<TAG_VALUE>\.)?policy\.((<TAG_VALUE>)\.)"
        r"(allowed|shadow_allowed|denied|shadow_denied)$",
    ),
    _RegexExtractor(
        "envoy.proxy_protocol_prefix", r"^proxy_proto\.((<TAG_VALUE>)\.).+$", "versions"
    ),
    _RegexExtractor(
        "envoy.proxy_protocol_version",
        r"^proxy_proto\.((?:<TAG_VALUE>\.)?versions\.v(<PROXY_PROTOCOL_VERSION>)\.)\w+$",
    ),
    _RegexExtractor(
        "envoy.tls_certificate",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.certificate\.((<TAG_VALUE>)\.).*$",
    ),
    _RegexExtractor("envoy.xds_resource_name", r"^sds\.((<TAG_VALUE>)\.).+"),
    _TokenExtractor("envoy.mongo_callsite", "mongo.*.collection.*.callsite.$.query.**"),
    _TokenExtractor("envoy.mongo_collection", "mongo.*.collection.$.**.query.*"),
    _TokenExtractor("envoy.mongo_cmd", "mongo.*.cmd.$.**"),
    _TokenExtractor("envoy.grpc_bridge_method", "cluster.*.grpc.*.$.**"),
    _TokenExtractor("envoy.http_user_agent", "http.*.user_agent.$.**"),
    _TokenExtractor("envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    _TokenExtractor("envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    _TokenExtractor("envoy.grpc_bridge_service", "cluster.*.grpc.$.**"),
    _TokenExtractor("envoy.tcp_prefix", "tcp.$.**"),
    _TokenExtractor("envoy.udp_prefix", "udp.$.**"),
    _TokenExtractor("envoy.clientssl_prefix", "auth.clientssl.$.**"),
    _TokenExtractor("envoy.ratelimit_prefix", "ratelimit.$.**"),
    _TokenExtractor("envoy.cluster_name", "cluster.$.**"),
    _TokenExtractor("envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    _TokenExtractor("envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    _TokenExtractor("envoy.http_conn_manager_prefix", "http.$.**"),
    _TokenExtractor("envoy.virtual_host", "vhost.$.**"),
    _TokenExtractor("envoy.mongo_prefix", "mongo.$.**"),
    _TokenExtractor("envoy.route", "vhost.*.route.$.**"),
    _TokenExtractor("envoy.thrift_prefix", "thrift.$.**"),
    _TokenExtractor("envoy.redis_prefix", "redis.$.**"),
    _TokenExtractor("envoy.local_http_ratelimit_prefix", "$.http_local_rate_limit.**"),
    _TokenExtractor("envoy.local_network_ratelimit_prefix", "local_rate_limit.$.**"),
    _TokenExtractor("envoy.local_listener_ratelimit_prefix", "listener_local_ratelimit.$.**"),
    _TokenExtractor("envoy.dns_filter_prefix", "dns_filter.$.**"),
    _TokenExtractor("envoy.connection_limit_prefix", "connection_limit.$.**"),
    _TokenExtractor("envoy.rbac_prefix", "$.rbac.**"),
    _TokenExtractor("envoy.google_grpc_client_prefix", "grpc.$.**"),
)

# Envoy runs the extractors that need no particular first token first, then the ones indexed
# by the stat name's first token, each group in table order.
_UNPREFIXED = tuple(e for e in EXTRACTORS if not e.prefix)
_BY_PREFIX: dict[str, tuple[_Extractor, ...]] = {}
for _e in EXTRACTORS:
    if _e.prefix:
        _BY_PREFIX[_e.prefix] = (*_BY_PREFIX.get(_e.prefix, ()), _e)
_SHARED_NAMES = frozenset(
    e.name for i, e in enumerate(EXTRACTORS) if any(o.name == e.name for o in EXTRACTORS[:i])
)


@functools.lru_cache(maxsize=1 << 16)
def extract_tags(name: str) -> tuple[str, Tags]:
    """Envoy's default tag extraction: (tag-extracted name, ((tag name, value), ...)).

    >>> extract_tags("cluster.backend.upstream_rq_503")
    ('cluster.upstream_rq', (('envoy.response_code', '503'), ('envoy.cluster_name', 'backend')))
    """
    tokens = name.split(".")
    tags: list[tuple[str, str]] = []
    cuts: list[tuple[int, int]] = []
    extractors = _UNPREFIXED
    if len(tokens) > 1:
        extractors = extractors + _BY_PREFIX.get(tokens[0], ())
    for ex in extractors:
        # Envoy gives a tag name one value: a second extractor for the same name is skipped.
        if ex.name in _SHARED_NAMES and any(t[0] == ex.name for t in tags):
            continue
        found = ex.extract(name, tokens)
        if found is not None:
            value, start, end = found
            tags.append((ex.name, value))
            cuts.append((start, end))
    if not cuts:
        return name, ()
    pieces: list[str] = []
    pos = 0
    for start, end in sorted(cuts):  # cuts may overlap: keep what no cut covers
        if start > pos:
            pieces.append(name[pos:start])
        pos = max(pos, end)
    pieces.append(name[pos:])
    return "".join(pieces), tuple(tags)


# ---------------------------------------------------------------------------------------------
# Formatting

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_QUANTILE_LABELS = tuple(format_number(round(p / 100.0, 12)) for p in SUPPORTED_PERCENTILES)


def sanitize_name(name: str) -> str:
    """Replace every character Prometheus does not allow in names with ``_``."""
    return _INVALID_NAME_CHARS.sub("_", name)


def metric_name(extracted_name: str) -> str:
    """The Prometheus metric name for a tag-extracted stat name (``envoy_`` + sanitised)."""
    return "envoy_" + sanitize_name(extracted_name)


def escape_label_value(value: str) -> str:
    """Escape ``\\``, ``"`` and newline, as the exposition format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@functools.lru_cache(maxsize=1 << 16)
def _series(stat_name: str) -> tuple[str, str, str]:
    """(tag-extracted name, metric name, label text without braces) of one stat; cached, since
    every scrape asks again for the same names. A stat already named in Prometheus's form,
    ``metric{labels}`` (Istio's mesh metrics, ``ubimesh.telemetry.mesh_metrics``), is written
    as it is: Envoy's stat names never contain ``{``."""
    brace = stat_name.find("{")
    if brace > 0 and stat_name[-1] == "}":
        metric = stat_name[:brace]
        return metric, metric, stat_name[brace + 1 : -1]
    extracted, tags = extract_tags(stat_name)
    labels = ",".join(f'{sanitize_name(k)}="{escape_label_value(v)}"' for k, v in tags)
    return extracted, metric_name(extracted), labels


def _with(labels: str, name: str, value: str) -> str:
    """``{labels,name="value"}``."""
    return "{" + labels + ("," if labels else "") + f'{name}="{value}"' + "}"


def _families(names: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Group stat names by tag-extracted name, families sorted by that name and series by stat
    name: [(metric name, [(stat name, label text), ...]), ...]."""
    groups: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for stat_name in sorted(names):
        extracted, name, labels = _series(stat_name)
        group = groups.get(extracted)
        if group is None:
            group = groups[extracted] = (name, [])
        group[1].append((stat_name, labels))
    return [groups[k] for k in sorted(groups)]


def render(
    snap: StatsSnapshot,
    *,
    query: StatsQuery | None = None,
    histogram_buckets: HistogramBuckets = HistogramBuckets.CUMULATIVE,
) -> str:
    """Envoy's ``/stats/prometheus`` page for ``snap``.

    ``query`` selects stats as for ``/stats`` (filter on the full stat name, ``usedonly``, type);
    its ``histogram_buckets`` is ignored in favour of the argument, which may be CUMULATIVE
    (Prometheus histograms, Envoy's default) or SUMMARY.
    """
    if histogram_buckets not in (HistogramBuckets.CUMULATIVE, HistogramBuckets.SUMMARY):
        raise ValueError(f"histogram_buckets must be cumulative or summary: {histogram_buckets}")
    sel = select(snap, query) if query is not None else snap
    out: list[str] = []
    written: set[str] = set()

    def scalar_families(values: dict[str, int], type_name: str) -> None:
        for name, series in _families(list(values)):
            if name in written:
                continue
            written.add(name)
            out.append(f"# TYPE {name} {type_name}\n")
            out.extend(f"{name}{{{labels}}} {values[stat]}\n" for stat, labels in series)

    scalar_families(sel.counters, "counter")
    scalar_families(sel.gauges, "gauge")

    write_histogram: Callable[[str, str, HistogramView], None]
    if histogram_buckets is HistogramBuckets.SUMMARY:
        type_name = "summary"

        def write_histogram(name: str, labels: str, h: HistogramView) -> None:
            for q, v in zip(_QUANTILE_LABELS, h.quantiles(), strict=True):
                out.append(f"{name}{_with(labels, 'quantile', q)} {format_number(v)}\n")
            out.append(f"{name}_sum{{{labels}}} {format_number(h.sum)}\n")
            out.append(f"{name}_count{{{labels}}} {h.count}\n")

    else:
        type_name = "histogram"

        def write_histogram(name: str, labels: str, h: HistogramView) -> None:
            for bound, c in zip(h.bounds, h.cumulative(), strict=True):
                out.append(f"{name}_bucket{_with(labels, 'le', format_number(bound))} {c}\n")
            out.append(f"{name}_bucket{_with(labels, 'le', '+Inf')} {h.count}\n")
            out.append(f"{name}_sum{{{labels}}} {format_number(h.sum)}\n")
            out.append(f"{name}_count{{{labels}}} {h.count}\n")

    for name, series in _families(list(sel.histograms)):
        if name in written:
            continue
        written.add(name)
        out.append(f"# TYPE {name} {type_name}\n")
        for stat, labels in series:
            write_histogram(name, labels, HistogramView.of(sel.histograms[stat]))
    return "".join(out)
