"""HCM ``tracing`` on every HTTP connection manager of a proxy (docs/telemetry.md, "Tracing in a
ubimesh mesh"; Mesh ``spec.tracing`` in docs/resources.md).

:func:`plan` reads the Mesh's ``spec.tracing`` once per compile call and decides where spans
go: ``builtin`` (the default) is the control plane's own collector, whose address the control
plane passes in ``CompileOptions.collector`` (none: no tracing); ``zipkin`` and
``opentelemetry`` name an external collector. :func:`instrument` then gives every HTTP listener
of one proxy the same ``tracing`` block and adds the collector's cluster to the proxy's own
clusters:

- provider ``envoy.tracers.zipkin`` (builtin and zipkin): Zipkin v2 JSON to
  ``collector_endpoint`` (``/api/v2/spans`` unless the address names a path), 128-bit trace
  ids (so W3C ``traceparent`` from applications joins), ``shared_span_context: false`` (each
  hop reports its own client and server spans, as Istio does: the parent links form one tree).
  The local service name is the proxy's ``node.cluster`` (Envoy's rule), which ``ubimesh up``
  sets to the one :func:`service_name` gives;
- provider ``envoy.tracers.opentelemetry``: OTLP/HTTP JSON to ``http_service`` (``/v1/traces``
  unless the address names a path), ``service_name`` from :func:`service_name`;
- ``random_sampling``: ``spec.tracing.sampling`` percent. Only a proxy that starts a trace
  decides; the others follow the incoming sampled flag;
- the cluster ``ubimesh-collector``: STATIC to an IP, STRICT_DNS to a name;
- sidecar HTTP listeners get ``traffic_direction`` (``inbound_*`` INBOUND, the others OUTBOUND), so
  their spans are SERVER and CLIENT spans; gateway listeners keep UNSPECIFIED (SERVER spans: a
  gateway receives from outside the mesh).

Nothing is added when tracing is off (``enabled: false``, or builtin without a collector).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address

from envoy.config.core.v3 import base_pb2, http_service_pb2, http_uri_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2, zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2

from ubimesh.control.compiler import envoy
from ubimesh.control.compiler.model import CompileError, CompileOptions, Message
from ubimesh.control.resources.model import Resource
from ubimesh.control.resources.spec_ubimesh import TRACING_PATHS, parse_tracing_address

#: The cluster every proxy sends its spans through.
COLLECTOR_CLUSTER = "ubimesh-collector"
ZIPKIN = "envoy.tracers.zipkin"
OPENTELEMETRY = "envoy.tracers.opentelemetry"
#: How long one export may take (OpenTelemetry ``http_uri.timeout``; required by Envoy).
EXPORT_TIMEOUT_S = 2
#: Listener name prefix of a sidecar's inbound listeners (compiler/sidecar.py).
INBOUND_PREFIX = "inbound_"


@dataclass
class TracingPlan:
    """Where one compile call's proxies send spans, and how many requests they trace."""

    provider: str  # "zipkin" | "opentelemetry" (builtin is zipkin to the control plane)
    host: str
    port: int
    path: str
    sampling: float
    #: ``ubimesh-collector``, built on first use (it needs the mesh's connect timeout).
    cluster: Message | None = None
    _blocks: dict[str, Message] = field(default_factory=dict)

    def block(self, service: str) -> Message:
        """The HCM ``tracing`` message for a proxy whose local service is ``service``
        (shared by every listener of every proxy of that service: read-only)."""
        built = self._blocks.get(service)
        if built is None:
            built = self._build(service)
            self._blocks[service] = built
        return built

    def _build(self, service: str) -> Message:
        typed = any_pb2.Any()
        if self.provider == "opentelemetry":
            config = opentelemetry_pb2.OpenTelemetryConfig(
                http_service=http_service_pb2.HttpService(
                    http_uri=http_uri_pb2.HttpUri(
                        uri=f"http://{_host_port(self.host, self.port)}{self.path}",
                        cluster=COLLECTOR_CLUSTER,
                        timeout=duration_pb2.Duration(seconds=EXPORT_TIMEOUT_S),
                    )
                ),
                service_name=service,
            )
            typed.Pack(config)
            name = OPENTELEMETRY
        else:
            zipkin = zipkin_pb2.ZipkinConfig(
                collector_cluster=COLLECTOR_CLUSTER,
                collector_endpoint=self.path,
                collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
                trace_id_128bit=True,
                collector_hostname=_host_port(self.host, self.port),
            )
            zipkin.shared_span_context.value = False
            typed.Pack(zipkin)
            name = ZIPKIN
        tracing = hcm_pb2.HttpConnectionManager.Tracing(
            provider=http_tracer_pb2.Tracing.Http(name=name, typed_config=typed)
        )
        tracing.random_sampling.value = self.sampling
        return tracing


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def plan(resources: Sequence[Resource], options: CompileOptions) -> TracingPlan | None:
    """The tracing of this compile call from the Mesh's ``spec.tracing`` (absent fields at
    their defaults: enabled, 100 %, builtin), or None when proxies trace nothing. The Mesh is
    chosen as compiler/index.py does (the one named ``default``, else the first by name).
    Raises CompileError for a value validation would have refused (hand-made resources)."""
    meshes = sorted((r for r in resources if r.kind == "Mesh"), key=lambda r: r.name)
    mesh = next((m for m in meshes if m.name == "default"), meshes[0] if meshes else None)
    spec: Mapping[str, object] = (mesh.spec.get("tracing") if mesh else None) or {}
    where = f"Mesh {mesh.name}: spec.tracing" if mesh else "spec.tracing"
    if spec.get("enabled", True) is False:
        return None
    provider = str(spec.get("provider") or "builtin")
    sampling = spec.get("sampling", 100)
    if (
        not isinstance(sampling, int | float)
        or isinstance(sampling, bool)
        or not (0 <= sampling <= 100)
    ):
        raise CompileError(f"{where}.sampling is {sampling!r}; expected a number 0..100")
    if provider == "builtin":
        if not options.collector:
            return None  # the control plane runs without its collector (--no-collector)
        address, kind = options.collector, "zipkin"
    elif provider in TRACING_PATHS:
        address, kind = str(spec.get("address") or ""), provider
    else:
        raise CompileError(
            f"{where}.provider is {provider!r}; expected one of: builtin, zipkin, opentelemetry"
        )
    try:
        host, port, path = parse_tracing_address(address)
    except ValueError as exc:
        raise CompileError(f"{where}.address {address!r} {exc}") from None
    return TracingPlan(kind, host, port, path or TRACING_PATHS[kind], float(sampling))


def instrument(
    tracing: TracingPlan | None,
    listeners: Mapping[str, Message],
    local_clusters: MutableMapping[str, Message],
    service: str,
    connect_timeout: Message,
    *,
    sidecar: bool,
) -> None:
    """Give every HTTP connection manager of ``listeners`` (one proxy's) the ``tracing`` block
    of ``service`` and add ``ubimesh-collector`` to ``local_clusters``; nothing when
    ``tracing`` is None. ``sidecar``: set each listener's ``traffic_direction`` (see the
    module docstring). The listeners must be this proxy's own (they are changed in place)."""
    if tracing is None:
        return
    block = tracing.block(service)
    hcm = hcm_pb2.HttpConnectionManager()
    found = False
    for name, listener in listeners.items():
        http = False
        for chain in listener.filter_chains:
            for flt in chain.filters:
                if flt.name != envoy.HCM_FILTER:
                    continue
                if not flt.typed_config.Unpack(hcm):
                    raise CompileError(
                        f"listener {name}: {flt.name} holds {flt.typed_config.type_url}"
                    )
                hcm.tracing.CopyFrom(block)
                flt.typed_config.Pack(hcm)
                http = True
        found = found or http
        if sidecar and http:  # a TCP listener makes no spans: left as it was
            listener.traffic_direction = (
                base_pb2.INBOUND if name.startswith(INBOUND_PREFIX) else base_pb2.OUTBOUND
            )
    if not found:
        return
    if tracing.cluster is None:
        tracing.cluster = envoy.inline_cluster(
            COLLECTOR_CLUSTER,
            dns=not _is_ip(tracing.host),
            endpoints=[(tracing.host, tracing.port)],
            connect_timeout=connect_timeout,
            policy="ROUND_ROBIN",
        )
    local_clusters[COLLECTOR_CLUSTER] = tracing.cluster


def service_name(name: str, namespace: str) -> str:
    """The service name a proxy's spans carry: ``<service>.<namespace>`` for a sidecar (its
    Workload's service), ``<gateway>.<namespace>`` for a gateway, as Istio names them."""
    return f"{name}.{namespace}"
