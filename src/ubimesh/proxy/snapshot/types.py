"""Runtime configuration: frozen dataclasses compiled from Envoy v3 resources.

This module is the contract between the translator (``ubimesh.proxy.xds``, the only code that
touches protobuf) and the request path (listeners, the HTTP connection manager, the router, the
upstream side). Everything here is immutable; a new configuration is a new ``Snapshot`` that the
proxy swaps in by reference, so a request in flight keeps the snapshot it started with.

Durations are float seconds; ``None`` means "disabled" (Envoy's 0 duration) unless the field's
docstring says otherwise. Names follow Envoy's (docs/glossary.md).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers
from ubimesh.proxy.snapshot.health_check import HealthCheck
from ubimesh.proxy.snapshot.outlier import OutlierDetection
from ubimesh.proxy.snapshot.retry import RetryPolicy

if TYPE_CHECKING:
    from ubimesh.policy.rbac import RbacConfig


@dataclass(frozen=True, slots=True)
class TelemetryMeta:
    """ubimesh's mesh telemetry metadata (``filter_metadata["ubimesh.telemetry"]``, which
    Envoy ignores), docs/telemetry.md "Metrics". On a listener it turns Istio's mesh metrics on
    (``reporter`` is "source" or "destination") and describes this proxy's workload (and, on
    inbound listeners, the service); on a cluster it describes the destination (``reporter``
    is ""). ``peers`` maps a caller's SPIFFE ID to its workload name (inbound listeners).
    Empty strings are unknown."""

    reporter: str = ""
    workload: str = ""
    namespace: str = ""
    principal: str = ""
    app: str = ""
    version: str = ""
    cluster: str = ""
    service: str = ""
    service_name: str = ""
    service_namespace: str = ""
    peers: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------------------------------------
# Addresses and nodes


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """An IP (or DNS name, for DNS clusters) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who this proxy is (bootstrap ``node``; overridable by --service-node/--service-cluster)."""

    id: str = ""
    cluster: str = ""


# ---------------------------------------------------------------------------------------------
# String and header matching


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """envoy.type.matcher.v3.StringMatcher. ``regex`` is compiled for REGEX (full match)."""

    kind: StringMatchKind
    value: str
    ignore_case: bool = False
    regex: re.Pattern[str] | None = None


class HeaderMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"
    PRESENT = "present"
    #: No specifier at all: Envoy treats this as "header is present".
    ANY = "any"


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """envoy.config.route.v3.HeaderMatcher.

    ``name`` is lower-case. Envoy joins repeated headers with "," before matching. For PRESENT,
    ``present`` is the required presence (present_match: false means "absent"). ``invert`` is
    invert_match; ``treat_missing_as_empty`` is Envoy's field of the same name.
    """

    name: str
    kind: HeaderMatchKind
    value: str = ""
    regex: re.Pattern[str] | None = None
    ignore_case: bool = False
    present: bool = True
    invert: bool = False
    treat_missing_as_empty: bool = False


@dataclass(frozen=True, slots=True)
class QueryParameterMatcher:
    """envoy.config.route.v3.QueryParameterMatcher: ``matcher`` None means present_match."""

    name: str
    matcher: StringMatcher | None = None
    present: bool = True


# ---------------------------------------------------------------------------------------------
# Header mutation


class AppendAction(enum.Enum):
    """envoy.config.core.v3.HeaderValueOption.HeaderAppendAction."""

    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    """One header to add. ``key`` is lower-case; ``value`` may hold %COMMAND% operators
    (%DOWNSTREAM_REMOTE_ADDRESS%, %REQ(x)%, ...) that are expanded per request when
    ``has_format`` is true. ``keep_empty_value`` is Envoy's field of the same name."""

    key: str
    value: str
    append_action: AppendAction = AppendAction.APPEND_IF_EXISTS_OR_ADD
    has_format: bool = False
    keep_empty_value: bool = False


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """Headers to add and remove at one level (route, virtual host, route configuration,
    weighted cluster). Removal happens before addition, as in Envoy."""

    request_add: tuple[HeaderValueOption, ...] = ()
    request_remove: tuple[str, ...] = ()
    response_add: tuple[HeaderValueOption, ...] = ()
    response_remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.request_add or self.request_remove or self.response_add or self.response_remove
        )


NO_HEADER_MUTATION = HeaderMutation()


# ---------------------------------------------------------------------------------------------
# Routes


class PathMatchKind(enum.Enum):
    PREFIX = "prefix"
    PATH = "path"
    REGEX = "safe_regex"
    PATH_SEPARATED_PREFIX = "path_separated_prefix"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """envoy.config.route.v3.RouteMatch. The path match applies to the path without the query
    string. ``value`` is lower-cased when ``case_sensitive`` is false. ``grpc`` restricts the
    match to gRPC requests (content-type application/grpc*)."""

    kind: PathMatchKind
    value: str = ""
    regex: re.Pattern[str] | None = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()
    grpc: bool = False


@dataclass(frozen=True, slots=True)
class WeightedClusterEntry:
    name: str
    weight: int
    headers: HeaderMutation = NO_HEADER_MUTATION


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """request_mirror_policies entry: send a shadow copy to ``cluster`` for a fraction
    ``numerator/denominator`` of requests (runtime_fraction default_value)."""

    cluster: str
    numerator: int = 100
    denominator: int = 100
    disable_shadow_host_suffix_append: bool = False


class HashPolicyKind(enum.Enum):
    HEADER = "header"
    COOKIE = "cookie"
    SOURCE_IP = "connection_properties"
    QUERY_PARAMETER = "query_parameter"


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """route.RouteAction.HashPolicy. ``name`` is the header (lower-case), cookie or query
    parameter name. ``terminal`` stops evaluating later policies once this one produced a hash.
    Cookie ``ttl`` (seconds) makes Envoy generate the cookie; ubimesh refuses ttl for now."""

    kind: HashPolicyKind
    name: str = ""
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    pattern: re.Pattern[str]
    substitution: str


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Forward to a cluster. Exactly one of ``cluster``, ``weighted_clusters`` or
    ``cluster_header`` is set. ``timeout`` None disables the route timeout (Envoy default 15 s
    is filled in by the translator)."""

    cluster: str = ""
    weighted_clusters: tuple[WeightedClusterEntry, ...] = ()
    total_weight: int = 0
    cluster_header: str = ""
    prefix_rewrite: str | None = None
    regex_rewrite: RegexRewrite | None = None
    host_rewrite_literal: str = ""
    auto_host_rewrite: bool = False
    timeout: float | None = 15.0
    idle_timeout: float | None = None
    """Per-route stream idle timeout. None: not set, the HCM's stream_idle_timeout applies;
    0.0: disabled for this route (Envoy's explicit 0), even if the HCM sets one."""
    mirror_policies: tuple[MirrorPolicy, ...] = ()
    hash_policies: tuple[HashPolicy, ...] = ()
    host_rewrite_header: str = ""
    """Take the upstream Host from this request header when it is present and not empty."""
    cluster_not_found_response_code: int = 503
    upgrade_websocket: bool | None = None
    """Per-route override of the HCM's websocket upgrade (None: follow the HCM)."""
    retry_policy: RetryPolicy | None = None
    """The route's retry policy (or its virtual host's); None: no retries."""
    hot: tuple[float | None, bool, RetryPolicy | None, bool, bool] = field(
        init=False, repr=False, compare=False
    )
    """(``timeout``, any ``hash_policies``, ``retry_policy``, any ``mirror_policies``, any
    path or authority rewrite): what the router reads on every request, in one attribute (see
    ``RetryPolicy.hot``: each read of this interpreted class from compiled code is a generic
    lookup)."""

    def __post_init__(self) -> None:
        hashing, mirroring = bool(self.hash_policies), bool(self.mirror_policies)
        rewrites = (
            self.prefix_rewrite is not None
            or self.regex_rewrite is not None
            or bool(self.host_rewrite_literal)
            or self.auto_host_rewrite
            or bool(self.host_rewrite_header)
        )
        object.__setattr__(
            self, "hot", (self.timeout, hashing, self.retry_policy, mirroring, rewrites)
        )


class RedirectResponseCode(enum.IntEnum):
    MOVED_PERMANENTLY = 301
    FOUND = 302
    SEE_OTHER = 303
    TEMPORARY_REDIRECT = 307
    PERMANENT_REDIRECT = 308


@dataclass(frozen=True, slots=True)
class RedirectAction:
    """envoy.config.route.v3.RedirectAction. Empty strings mean "keep the request's"."""

    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    prefix_rewrite: str | None = None
    regex_rewrite: RegexRewrite | None = None
    response_code: int = 301
    strip_query: bool = False
    https_redirect: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponseAction:
    status: int
    body: bytes | None = None


RouteActionKind = RouteAction | RedirectAction | DirectResponseAction


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    action: RouteActionKind
    headers: HeaderMutation = NO_HEADER_MUTATION
    typed_per_filter_config: tuple[tuple[str, Any], ...] = ()
    """Per-route filter overrides: (filter name, compiled config) pairs."""
    decorator: str = ""
    """Route ``decorator.operation``: the span name of requests on this route ("" = none)."""
    decorator_propagate: bool = True
    """``decorator.propagate``: an egress HCM sends the operation as
    x-envoy-decorator-operation."""
    tracing: RouteTracing | None = None
    """Route ``tracing``: sampling that replaces the HCM's, extra custom tags."""


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """``domains`` are lower-case, as written in the config (matching is in routing.table)."""

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    headers: HeaderMutation = NO_HEADER_MUTATION
    typed_per_filter_config: tuple[tuple[str, Any], ...] = ()
    """Per-virtual-host filter overrides: (filter name, compiled config) pairs; a route's own
    entry for the same filter wins."""


@dataclass(frozen=True, slots=True)
class RouteConfiguration:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    headers: HeaderMutation = NO_HEADER_MUTATION
    response_headers_to_remove: tuple[str, ...] = ()
    most_specific_header_mutations_wins: bool = False
    ignore_port_in_host_matching: bool = False


# ---------------------------------------------------------------------------------------------
# Access logs (envoy.config.accesslog.v3)


@dataclass(frozen=True, slots=True)
class AccessLogFilter:
    """envoy.config.accesslog.v3.AccessLogFilter (the supported kinds). ``kind`` is the oneof
    field's name: "status_code_filter" and "duration_filter" compare with ``op`` ("EQ", "GE",
    "LE", "NE") against ``value`` (the runtime default_value: ubimesh has no runtime);
    "and_filter" / "or_filter" combine ``filters``; "not_health_check_filter" is always true
    (ubimesh has no health checks); "response_flag_filter" matches an entry with one of
    ``flags`` (any flag when empty)."""

    kind: str
    op: str = ""
    value: int = 0
    filters: tuple[AccessLogFilter, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """One access log: where it writes (``path``: a file, or /dev/stdout, /dev/stderr for the
    stream loggers) and the line format. ``text_format`` is a format string with %COMMAND%
    operators; ``json_format`` the JSON text of a json_format Struct (keys sorted); with
    neither, Envoy's default format. The format is checked by the translator and compiled by
    the proxy (``ubimesh.proxy.access_log``), so the snapshot stays plain data."""

    name: str
    path: str
    text_format: str | None = None
    json_format: str = ""
    omit_empty_values: bool = False
    filter: AccessLogFilter | None = None


# ---------------------------------------------------------------------------------------------
# HTTP connection manager


class HeadersWithUnderscoresAction(enum.Enum):
    ALLOW = 0
    REJECT_REQUEST = 1
    DROP_HEADER = 2


class PathWithEscapedSlashesAction(enum.Enum):
    KEEP_UNCHANGED = 1
    REJECT_REQUEST = 2
    UNESCAPE_AND_REDIRECT = 3
    UNESCAPE_AND_FORWARD = 4


class ForwardClientCertDetails(enum.Enum):
    SANITIZE = 0
    FORWARD_ONLY = 1
    APPEND_FORWARD = 2
    SANITIZE_SET = 3
    ALWAYS_FORWARD_ONLY = 4


class ClientCertDetail(enum.Enum):
    """One item of set_current_client_cert_details, in Envoy's order of emission."""

    SUBJECT = "Subject"
    URI = "URI"
    DNS = "DNS"


@dataclass(frozen=True, slots=True)
class HttpFilterConfig:
    """One entry of http_filters: its name and compiled config. ``type_name`` is the short
    proto name (e.g. "envoy.extensions.filters.http.router.v3.Router"), which decides the
    implementation; ``config`` is the filter's own frozen config object."""

    name: str
    type_name: str
    config: Any = None


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """envoy.extensions.filters.http.fault.v3.HTTPFault (``envoy.filters.http.fault``).

    A percentage is (numerator, denominator) with the numerator capped at the denominator.
    ``delay`` is the fixed delay in seconds (None: no fixed delay); ``header_delay`` takes the
    delay from ``x-envoy-fault-delay-request`` (milliseconds) instead. ``abort_status`` is the
    fixed status (None: none); ``header_abort`` takes it from ``x-envoy-fault-abort-request``.
    ``max_active_faults`` None means unlimited."""

    stat_prefix: str = ""
    has_delay: bool = False
    delay: float | None = None
    header_delay: bool = False
    delay_percent: tuple[int, int] = (0, 100)
    has_abort: bool = False
    abort_status: int | None = None
    header_abort: bool = False
    abort_percent: tuple[int, int] = (0, 100)
    upstream_cluster: str = ""
    headers: tuple[HeaderMatcher, ...] = ()
    max_active_faults: int | None = None


@dataclass(frozen=True, slots=True)
class TokenBucketConfig:
    """envoy.type.v3.TokenBucket: ``fill_interval`` in seconds (Envoy requires >= 50 ms)."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


class RateLimitActionKind(enum.Enum):
    """The route RateLimit.Action kinds ubimesh implements for local rate limits."""

    REQUEST_HEADERS = "request_headers"
    REMOTE_ADDRESS = "remote_address"
    GENERIC_KEY = "generic_key"
    HEADER_VALUE_MATCH = "header_value_match"


@dataclass(frozen=True, slots=True)
class RateLimitAction:
    """One RateLimit.Action: it yields the descriptor entry (``key``, value) for a request.

    REQUEST_HEADERS: the value of header ``header_name`` (absent: the descriptor is dropped,
    or with ``skip_if_absent`` this entry only). REMOTE_ADDRESS: the downstream address.
    GENERIC_KEY: ``value``. HEADER_VALUE_MATCH: ``value`` when ``headers`` all match (or, with
    ``expect_match`` false, when they do not)."""

    kind: RateLimitActionKind
    key: str
    value: str = ""
    header_name: str = ""
    skip_if_absent: bool = False
    headers: tuple[HeaderMatcher, ...] = ()
    expect_match: bool = True


@dataclass(frozen=True, slots=True)
class LocalRateLimitDescriptor:
    """A configured descriptor (its entries, in order) and its own token bucket."""

    entries: tuple[tuple[str, str], ...]
    token_bucket: TokenBucketConfig


@dataclass(frozen=True, slots=True)
class LocalRateLimitConfig:
    """envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, as a filter's config
    or as a route's / virtual host's typed_per_filter_config. ``token_bucket`` None: the
    default bucket never limits. Enabled / enforced fractions are the RuntimeFractionalPercent
    default values (ubimesh has no runtime); absent means 0 % (Envoy)."""

    stat_prefix: str
    token_bucket: TokenBucketConfig | None = None
    enabled: tuple[int, int] = (0, 100)
    enforced: tuple[int, int] = (0, 100)
    status: int = 429
    response_headers_to_add: tuple[HeaderValueOption, ...] = ()
    request_headers_to_add_when_not_enforced: tuple[HeaderValueOption, ...] = ()
    per_downstream_connection: bool = False
    x_ratelimit_headers: bool = False
    descriptors: tuple[LocalRateLimitDescriptor, ...] = ()
    rate_limits: tuple[tuple[RateLimitAction, ...], ...] = ()
    """The filter's own ``rate_limits``: each entry's actions build one request descriptor."""
    always_consume_default_token_bucket: bool = True


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """envoy.extensions.filters.http.router.v3.Router: the ``config`` of the router's
    HttpFilterConfig. ``dynamic_stats`` defaults to true as in Envoy."""

    dynamic_stats: bool = True
    suppress_envoy_headers: bool = False


class TracingProviderKind(enum.Enum):
    ZIPKIN = "envoy.tracers.zipkin"
    OPENTELEMETRY = "envoy.tracers.opentelemetry"


@dataclass(frozen=True, slots=True)
class TracingProvider:
    """Where and how a tracer exports spans (ZipkinConfig or OpenTelemetryConfig with
    http_service). Equal providers share one exporter per process."""

    kind: TracingProviderKind
    cluster: str
    """The cluster the exporter sends to (collector_cluster or http_uri.cluster)."""
    path: str
    """The request path: collector_endpoint (Zipkin) or the http_uri's path (OTLP)."""
    host: str
    """The Host header: collector_hostname (default the cluster name) or the http_uri's
    authority."""
    timeout: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    """request_headers_to_add of an HttpService."""
    shared_span_context: bool = True
    """Zipkin: an ingress span reuses the incoming B3 span id (Envoy's default)."""
    trace_id_128bit: bool = False
    w3c: bool = False
    """Zipkin trace_context_option USE_B3_WITH_W3C_PROPAGATION: also extract (after B3) and
    inject W3C traceparent."""
    service_name: str = ""
    """OpenTelemetry service_name ("" = Envoy's default, unknown_service:envoy)."""


class CustomTagKind(enum.Enum):
    LITERAL = "literal"
    REQUEST_HEADER = "request_header"
    ENVIRONMENT = "environment"


@dataclass(frozen=True, slots=True)
class CustomTag:
    """type.tracing.v3.CustomTag: a tag from a literal, a request header or an environment
    variable (resolved at translation time, as Envoy resolves it at config load)."""

    tag: str
    kind: CustomTagKind
    value: str
    """The literal (or the environment value), or the request header's name."""
    default: str = ""


@dataclass(frozen=True, slots=True)
class RouteTracing:
    """envoy.config.route.v3.Tracing: when a route has it, its three percentages (each 100
    when unset) replace the HCM's, and its custom tags are added to the HCM's (Envoy)."""

    client_sampling: float = 100.0
    random_sampling: float = 100.0
    overall_sampling: float = 100.0
    custom_tags: tuple[CustomTag, ...] = ()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """HttpConnectionManager.Tracing. Sampling percentages are 0-100 (Envoy's defaults 100)."""

    provider: TracingProvider
    client_sampling: float = 100.0
    random_sampling: float = 100.0
    overall_sampling: float = 100.0
    custom_tags: tuple[CustomTag, ...] = ()
    max_path_tag_length: int = 256
    verbose: bool = False
    egress: bool = False
    """The listener's traffic_direction is OUTBOUND: CLIENT spans (Envoy's egress operation);
    otherwise SERVER spans (ingress)."""


@dataclass(frozen=True, slots=True)
class HttpConnectionManagerConfig:
    """envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.

    Defaults are Envoy's. Limits: ``max_request_headers_kb`` (60 KiB) bounds the request line and
    headers together; ``max_headers_count`` (100) bounds their number.
    """

    stat_prefix: str
    route_config: RouteConfiguration
    http_filters: tuple[HttpFilterConfig, ...] = ()
    generate_request_id: bool = True
    preserve_external_request_id: bool = False
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    skip_xff_append: bool = False
    server_name: str = "envoy"
    server_header_transformation: str = "OVERWRITE"
    idle_timeout: float | None = 3600.0
    max_headers_count: int = 100
    headers_with_underscores_action: HeadersWithUnderscoresAction = (
        HeadersWithUnderscoresAction.ALLOW
    )
    max_request_headers_kb: int = 60
    request_timeout: float | None = None
    request_headers_timeout: float | None = None
    stream_idle_timeout: float | None = 300.0
    drain_timeout: float = 5.0
    upgrade_types: frozenset[str] = frozenset()
    """Lower-case upgrade protocols enabled by upgrade_configs (only "websocket" for now)."""
    normalize_path: bool = False
    merge_slashes: bool = False
    path_with_escaped_slashes_action: PathWithEscapedSlashesAction = (
        PathWithEscapedSlashesAction.KEEP_UNCHANGED
    )
    forward_client_cert_details: ForwardClientCertDetails = ForwardClientCertDetails.SANITIZE
    set_current_client_cert_details: tuple[ClientCertDetail, ...] = ()
    """What APPEND_FORWARD and SANITIZE_SET add after ``By`` and ``Hash``, in Envoy's order."""
    strip_any_host_port: bool = False
    """Remove any port from the Host before routing and forwarding (strip_any_host_port)."""
    accept_http_10: bool = False
    """http_protocol_options.accept_http_10: without it an HTTP/1.0 request gets 426."""
    default_host_for_http_10: str = ""
    internal_address_config_unix_sockets: bool = False
    codec_type: str = "AUTO"
    """Envoy's codec_type name: "AUTO" (HTTP/1.1, or HTTP/2 when the client opens with the
    HTTP/2 connection preface) or "HTTP1" (HTTP/1.1 only). HTTP2 and HTTP3 are refused for now."""
    access_log: tuple[AccessLogConfig, ...] = ()
    """Access logs written once per request, when the stream ends."""
    tracing: TracingConfig | None = None
    """HttpConnectionManager.tracing: None when the HCM does not trace (the default)."""
    mesh_telemetry: TelemetryMeta | None = None
    """The listener's ``ubimesh.telemetry`` metadata, copied here by the translator so that
    the runtime of this filter chain has it (None: no mesh metrics)."""


# ---------------------------------------------------------------------------------------------
# TCP proxy


@dataclass(frozen=True, slots=True)
class TcpProxyConfig:
    """envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy. ``idle_timeout`` defaults to
    one hour as in Envoy; None disables it."""

    stat_prefix: str
    cluster: str = ""
    weighted_clusters: tuple[WeightedClusterEntry, ...] = ()
    total_weight: int = 0
    idle_timeout: float | None = 3600.0
    max_connect_attempts: int = 1
    access_log: tuple[AccessLogConfig, ...] = ()
    """Access logs written once per downstream connection, when it closes."""
    mesh_telemetry: TelemetryMeta | None = None
    """The listener's ``ubimesh.telemetry`` metadata (see HttpConnectionManagerConfig)."""


# ---------------------------------------------------------------------------------------------
# RBAC network filter


@dataclass(frozen=True, slots=True)
class NetworkRbacConfig:
    """envoy.extensions.filters.network.rbac.v3.RBAC: a non-terminal network filter that
    decides, when a connection is accepted, whether the rest of the chain gets it. ``rbac`` is
    the engine's configuration (``rules_stat_prefix`` is always empty: the network filter has
    none); its stats are ``<stat_prefix>.rbac.*``."""

    stat_prefix: str
    rbac: RbacConfig


NetworkFilterConfig = HttpConnectionManagerConfig | TcpProxyConfig | NetworkRbacConfig


# ---------------------------------------------------------------------------------------------
# TLS (envoy.extensions.transport_sockets.tls.v3)


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """A certificate chain (leaf first) and its private key, PEM, read when the config was
    loaded. ``source`` says where they came from (file names or "inline"), for messages."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    source: str = ""


class SanType(enum.Enum):
    """envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher.SanType (the supported
    ones)."""

    DNS = 2
    URI = 3


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """A peer certificate is accepted when one of its SANs of ``san_type`` matches."""

    san_type: SanType
    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class CertificateValidation:
    """CertificateValidationContext: the roots (PEM; empty = no verification) and the SAN
    matchers (empty = any SAN). A combined validation context is the merge of its default part
    and its SDS secret (see ``merged``)."""

    trusted_ca: bytes = b""
    san_matchers: tuple[SanMatcher, ...] = ()

    def merged(self, dynamic: CertificateValidation) -> CertificateValidation:
        """Envoy's combined_validation_context: the SDS secret is merged into the default
        context (protobuf MergeFrom): its trusted_ca wins when set, SAN matchers add up."""
        return CertificateValidation(
            trusted_ca=dynamic.trusted_ca or self.trusted_ca,
            san_matchers=self.san_matchers + dynamic.san_matchers,
        )


Secret = TlsCertificate | CertificateValidation
"""An SDS secret's content (static_resources.secrets, or delivered over ADS)."""


class TlsVersion(enum.IntEnum):
    """TlsParameters.TlsProtocol (the versions ubimesh speaks)."""

    TLSv1_2 = 3
    TLSv1_3 = 4


@dataclass(frozen=True, slots=True)
class TlsContext:
    """A DownstreamTlsContext (``server``) or an UpstreamTlsContext.

    Certificates and the validation context are given inline (``certificates``,
    ``validation``) or by SDS secret name (``certificate_secrets``, ``validation_secret``),
    resolved at run time against ``Snapshot.secrets``, so that a secret can change (rotation)
    without changing the listener or cluster that names it. With both ``validation`` and
    ``validation_secret`` set (combined_validation_context), ``validation`` is the default
    part the secret is merged into. ``sni`` is the upstream's SNI ("" sends none).
    """

    server: bool
    certificates: tuple[TlsCertificate, ...] = ()
    certificate_secrets: tuple[str, ...] = ()
    validation: CertificateValidation | None = None
    validation_secret: str = ""
    alpn_protocols: tuple[str, ...] = ()
    min_version: TlsVersion = TlsVersion.TLSv1_2
    max_version: TlsVersion = TlsVersion.TLSv1_3
    require_client_certificate: bool = False
    sni: str = ""

    @property
    def secret_names(self) -> tuple[str, ...]:
        """Every SDS secret this context needs."""
        extra = (self.validation_secret,) if self.validation_secret else ()
        return self.certificate_secrets + extra


# ---------------------------------------------------------------------------------------------
# Listeners


@dataclass(frozen=True, slots=True)
class FilterChainMatch:
    """envoy.config.listener.v3.FilterChainMatch (the supported part). Empty means "any".
    ``server_names`` are lower-case and may start with "*." (wildcard)."""

    destination_port: int | None = None
    server_names: tuple[str, ...] = ()
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FilterChain:
    name: str
    match: FilterChainMatch
    filters: tuple[NetworkFilterConfig, ...]
    """Network filters in order; the last one is terminal (HCM or tcp_proxy), the others are
    RBAC filters (NetworkRbacConfig)."""
    transport_socket: TlsContext | None = None
    """The DownstreamTlsContext (``server`` true); None is plaintext."""
    transport_socket_connect_timeout: float = 10.0
    """How long the TLS handshake may take before the connection is closed."""


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: SocketAddress
    filter_chains: tuple[FilterChain, ...]
    default_filter_chain: FilterChain | None = None
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    needs_tls_inspector: bool = False
    """True when some filter chain matches on server_names (SNI must be read first)."""
    rbac_denial_header: str = "internal"
    """Who gets ``x-ubimesh-denied-by`` on an RBAC denial: "internal" (callers with a verified
    client certificate), "always" or "never" (listener metadata
    ``filter_metadata["ubimesh.rbac"]["denial_header"]``)."""
    access_log: tuple[AccessLogConfig, ...] = ()
    """Listener access logs: connections that no filter chain matched, and connections an RBAC
    network filter denied."""


# ---------------------------------------------------------------------------------------------
# Clusters


class DiscoveryType(enum.Enum):
    STATIC = 0
    STRICT_DNS = 1
    LOGICAL_DNS = 2
    EDS = 3


class LbPolicy(enum.Enum):
    ROUND_ROBIN = 0
    LEAST_REQUEST = 1
    RING_HASH = 2
    RANDOM = 3
    MAGLEV = 5


class DnsLookupFamily(enum.Enum):
    AUTO = 0
    V4_ONLY = 1
    V6_ONLY = 2
    V4_PREFERRED = 3
    ALL = 4


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An upstream host. ``weight`` is load_balancing_weight (default 1)."""

    address: SocketAddress
    weight: int = 1
    hostname: str = ""
    health_status: int = 0
    """envoy.config.core.v3.HealthStatus as configured (0 UNKNOWN counts as healthy)."""


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    sub_zone: str = ""


@dataclass(frozen=True, slots=True)
class LocalityEndpoints:
    """envoy.config.endpoint.v3.LocalityLbEndpoints."""

    locality: Locality
    endpoints: tuple[Endpoint, ...]
    priority: int = 0
    load_balancing_weight: int | None = None


@dataclass(frozen=True, slots=True)
class RingHashConfig:
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LeastRequestConfig:
    choice_count: int = 2


@dataclass(frozen=True, slots=True)
class Cluster:
    """envoy.config.cluster.v3.Cluster (the supported part).

    ``endpoints`` come from load_assignment; for DNS clusters their addresses hold DNS names that
    the upstream side resolves (STRICT_DNS: every address, refreshed every
    ``dns_refresh_rate``; LOGICAL_DNS: one name, first address). ``idle_timeout`` is the
    upstream connection idle timeout (common_http_protocol_options, Envoy default 1 h).
    ``max_requests_per_connection`` None means unlimited.
    """

    name: str
    type: DiscoveryType
    connect_timeout: float = 5.0
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    endpoints: tuple[LocalityEndpoints, ...] = ()
    overprovisioning_factor: int = 140
    max_requests_per_connection: int | None = None
    idle_timeout: float | None = 3600.0
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    dns_refresh_rate: float = 5.0
    dns_lookup_family: DnsLookupFamily = DnsLookupFamily.AUTO
    ring_hash: RingHashConfig = field(default_factory=RingHashConfig)
    least_request: LeastRequestConfig = field(default_factory=LeastRequestConfig)
    transport_socket: TlsContext | None = None
    """The UpstreamTlsContext (``server`` false); None is plaintext."""
    telemetry: TelemetryMeta | None = None
    """``metadata.filter_metadata["ubimesh.telemetry"]``: the destination's labels in mesh
    metrics."""
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    outlier_detection: OutlierDetection | None = None
    """None: outlier detection off (Envoy's default when the field is absent)."""
    health_checks: tuple[HealthCheck, ...] = ()
    healthy_panic_threshold: float = 50.0
    """common_lb_config.healthy_panic_threshold in percent; 0 disables panic mode."""


# ---------------------------------------------------------------------------------------------
# Admin and the whole snapshot


@dataclass(frozen=True, slots=True)
class Admin:
    address: SocketAddress
    access_log_path: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A whole proxy configuration. ``version`` identifies it in /config_dump and logs;
    ``source`` is the raw bootstrap as a plain dict (what /config_dump shows)."""

    version: str
    node: NodeInfo
    listeners: tuple[Listener, ...]
    clusters: dict[str, Cluster]
    admin: Admin | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)
    secrets: dict[str, Secret] = field(default_factory=dict)
    """SDS secrets by name (static_resources.secrets and those delivered over ADS), what the
    TLS contexts' ``certificate_secrets`` and ``validation_secret`` name."""
