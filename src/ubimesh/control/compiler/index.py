"""The resources, read once into typed, sorted views (the compiler's input model).

Fields are read with the defaults of docs/control-plane.md section 1, so validated resources
and hand-written specs (tests) compile the same. Every list is sorted by (namespace, name):
nothing downstream depends on the order the resources came in. Nothing is validated here
beyond what compiling needs; a reference to something missing is skipped by the compiler.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ubimesh.control.compiler.model import CompileError
from ubimesh.control.resources.model import DEFAULT_NAMESPACE, Resource

#: ``Mesh.spec.mtls.mode`` values (compiler/mtls.py).
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")

#: ``Mesh.spec.authorization.defaultAction`` values (compiler/authz.py).
DEFAULT_ACTIONS = ("DENY", "ALLOW")

#: Annotation naming the site of a gateway.
SITE_ANNOTATION = "ubimesh.io/site"
DEFAULT_SITE = "default"


@dataclass(frozen=True)
class MeshDefaults:
    trust_domain: str = "cluster.local"
    connect_timeout: str = "1s"
    request_timeout: str = "15s"
    lb_policy: str = "ROUND_ROBIN"
    #: ``spec.mtls.mode``: STRICT, PERMISSIVE or DISABLE (compiler/mtls.py says what each
    #: compiles to). The default must equal the Mesh schema's (spec_ubimesh.py).
    mtls_mode: str = "STRICT"
    #: ``spec.authorization.defaultAction``: DENY or ALLOW (compiler/authz.py). The default
    #: must equal the Mesh schema's.
    default_action: str = "DENY"
    #: ``spec.defaults.retries`` and ``spec.defaults.outlierDetection`` as (field, value)
    #: pairs, lists as tuples (compiler/resilience.py reads them; defaults are the schema's).
    retries: Settings = ()
    outlier_detection: Settings = ()


#: A settings object as sorted (field, value) pairs, so that the dataclasses holding it stay
#: hashable; lists become tuples.
Settings = tuple[tuple[str, Any], ...]


def _settings(raw: object) -> Settings:
    if not isinstance(raw, Mapping):
        return ()
    return tuple(
        sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in raw.items())
    )


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str  # "http" | "tcp"
    target_port: int


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    lb_policy: str | None
    connect_timeout: str | None
    request_timeout: str | None
    #: The Service's own ``retries`` / ``outlierDetection`` fields (each overrides the mesh's).
    retries: Settings = ()
    outlier_detection: Settings = ()

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}"

    def port_named(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None

    def port_numbered(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None

    def find_port(self, ref: object) -> ServicePort | None:
        """The port ``ref`` names: a port name, a number (or its string), or None for the first."""
        if ref is None or ref == "":
            return self.ports[0] if self.ports else None
        if isinstance(ref, int) and not isinstance(ref, bool):
            return self.port_numbered(ref)
        text = str(ref)
        named = self.port_named(text)
        if named is None and text.isdigit():
            return self.port_numbered(int(text))
        return named


@dataclass(frozen=True)
class Upstream:
    service: str
    namespace: str
    port: object  # a port name, a number, or None (the first)
    local_port: int


@dataclass(frozen=True)
class Sidecar:
    inbound_ports: Mapping[str, int]
    outbound_port: int | None
    upstreams: tuple[Upstream, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service: str
    address: str
    ports: Mapping[str, int]
    site: str
    locality: tuple[str, str, str] | None  # region, zone, subZone
    weight: int
    sidecar: Sidecar | None
    service_account: str  # the identity's ``sa`` segment (default: the service name)

    def app_port(self, port: ServicePort) -> int:
        """Where the application listens for service port ``port``."""
        return int(self.ports.get(port.name, port.target_port))


@dataclass(frozen=True)
class ExternalService:
    name: str
    namespace: str
    host: str
    port: int
    protocol: str  # "http" | "tcp"
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class TcpBackend:
    service: str
    namespace: str
    port: object


@dataclass(frozen=True)
class GatewayListener:
    name: str
    port: int
    protocol: str  # "http" | "tcp"
    hosts: tuple[str, ...]
    backend: TcpBackend | None


@dataclass(frozen=True)
class Gateway:
    name: str
    namespace: str
    address: str
    listeners: tuple[GatewayListener, ...]
    site: str


@dataclass(frozen=True)
class SplitBackend:
    service: str
    weight: int


@dataclass(frozen=True)
class TrafficSplit:
    name: str
    namespace: str
    service: str  # the root service's name (in the split's namespace)
    backends: tuple[SplitBackend, ...]
    matches: tuple[str, ...]  # names of HTTPRouteGroups in the split's namespace


@dataclass(frozen=True)
class Subject:
    """A TrafficTarget's destination or source: ``kind`` ServiceAccount (or, for a
    destination, ExternalService), ``name``, ``namespace``."""

    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class TrafficRule:
    """One ``spec.rules[]`` item: an HTTPRouteGroup or TCPRoute of the target's namespace and,
    for a group, the match names it selects (``None``: every match)."""

    kind: str  # "HTTPRouteGroup" | "TCPRoute"
    name: str
    matches: tuple[str, ...] | None


@dataclass(frozen=True)
class TrafficTarget:
    name: str
    namespace: str
    destination: Subject
    sources: tuple[Subject, ...]
    rules: tuple[TrafficRule, ...]


@dataclass(frozen=True)
class HTTPRoute:
    """A Gateway API HTTPRoute; ``rules`` stay plain dicts (the route builder reads them)."""

    name: str
    namespace: str
    parent_refs: tuple[Mapping[str, Any], ...]
    hostnames: tuple[str, ...]
    rules: tuple[Mapping[str, Any], ...]


@dataclass
class Index:
    """Every resource the compiler reads, by kind, sorted by (namespace, name)."""

    mesh: MeshDefaults = field(default_factory=MeshDefaults)
    services: dict[tuple[str, str], Service] = field(default_factory=dict)
    workloads: list[Workload] = field(default_factory=list)
    workloads_of: dict[tuple[str, str], list[Workload]] = field(default_factory=dict)
    workload_by_key: dict[tuple[str, str], Workload] = field(default_factory=dict)
    externals: dict[tuple[str, str], ExternalService] = field(default_factory=dict)
    gateways: dict[tuple[str, str], Gateway] = field(default_factory=dict)
    splits_of: dict[tuple[str, str], TrafficSplit] = field(default_factory=dict)
    route_groups: dict[tuple[str, str], tuple[Mapping[str, Any], ...]] = field(
        default_factory=dict
    )
    http_routes: list[HTTPRoute] = field(default_factory=list)
    traffic_targets: list[TrafficTarget] = field(default_factory=list)
    #: TCPRoute ports by (namespace, name); ``()`` means every port.
    tcp_routes: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)


def _ns(r: Resource) -> str:
    return r.namespace or DEFAULT_NAMESPACE


def _str_list(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


def _service(r: Resource) -> Service:
    s = r.spec
    ports = []
    for p in s.get("ports") or ():
        port = int(p["port"])
        ports.append(
            ServicePort(
                name=str(p.get("name") or str(port)),
                port=port,
                protocol=str(p.get("protocol", "http")).lower(),
                target_port=int(p.get("targetPort") or port),
            )
        )
    return Service(
        name=r.name,
        namespace=_ns(r),
        ports=tuple(ports),
        lb_policy=s.get("lbPolicy"),
        connect_timeout=s.get("connectTimeout"),
        request_timeout=s.get("requestTimeout"),
        retries=_settings(s.get("retries")),
        outlier_detection=_settings(s.get("outlierDetection")),
    )


def _workload(r: Resource) -> Workload:
    s = r.spec
    ns = _ns(r)
    sidecar = None
    raw = s.get("sidecar")
    if isinstance(raw, Mapping):
        upstreams = tuple(
            Upstream(
                service=str(u["service"]),
                namespace=str(u.get("namespace") or ns),
                port=u.get("port"),
                local_port=int(u["localPort"]),
            )
            for u in raw.get("upstreams") or ()
        )
        outbound = raw.get("outboundPort")
        sidecar = Sidecar(
            inbound_ports={str(k): int(v) for k, v in (raw.get("inboundPorts") or {}).items()},
            outbound_port=int(outbound) if outbound is not None else None,
            upstreams=upstreams,
        )
    loc = s.get("locality")
    locality = None
    if isinstance(loc, Mapping) and any(loc.get(k) for k in ("region", "zone", "subZone")):
        locality = (
            str(loc.get("region") or ""),
            str(loc.get("zone") or ""),
            str(loc.get("subZone") or ""),
        )
    return Workload(
        name=r.name,
        namespace=ns,
        service=str(s["service"]),
        address=str(s["address"]),
        ports={str(k): int(v) for k, v in (s.get("ports") or {}).items()},
        site=str(s.get("site") or DEFAULT_SITE),
        locality=locality,
        weight=int(s.get("weight") or 1),
        sidecar=sidecar,
        service_account=str(s.get("serviceAccount") or s["service"]),
    )


def _external(r: Resource) -> ExternalService:
    s = r.spec
    return ExternalService(
        name=r.name,
        namespace=_ns(r),
        host=str(s["host"]).lower(),
        port=int(s["port"]),
        protocol=str(s.get("protocol", "http")).lower(),
        addresses=_str_list(s.get("addresses")),
    )


def _gateway(r: Resource) -> Gateway:
    s = r.spec
    ns = _ns(r)
    listeners = []
    for item in s.get("listeners") or ():
        backend = None
        b = item.get("backend")
        if isinstance(b, Mapping):
            backend = TcpBackend(
                service=str(b["service"]),
                namespace=str(b.get("namespace") or ns),
                port=b.get("port"),
            )
        listeners.append(
            GatewayListener(
                name=str(item["name"]),
                port=int(item["port"]),
                protocol=str(item.get("protocol", "HTTP")).lower(),
                hosts=tuple(h.lower() for h in _str_list(item.get("hosts"))) or ("*",),
                backend=backend,
            )
        )
    return Gateway(
        name=r.name,
        namespace=ns,
        address=str(s.get("address") or "0.0.0.0"),
        listeners=tuple(listeners),
        site=str(r.annotations.get(SITE_ANNOTATION) or DEFAULT_SITE),
    )


def _root_name(service: str, namespace: str) -> str:
    """A split's root service name; ``name.ns.svc.cluster.local`` (or a prefix) names ``name``."""
    if "." not in service:
        return service
    name, _, rest = service.partition(".")
    if rest.split(".")[0] == namespace:
        return name
    return service


def _split(r: Resource) -> TrafficSplit:
    s = r.spec
    ns = _ns(r)
    return TrafficSplit(
        name=r.name,
        namespace=ns,
        service=_root_name(str(s["service"]), ns),
        backends=tuple(
            SplitBackend(service=str(b["service"]), weight=int(b.get("weight") or 0))
            for b in s.get("backends") or ()
        ),
        matches=tuple(
            str(m["name"])
            for m in s.get("matches") or ()
            if str(m.get("kind", "HTTPRouteGroup")) == "HTTPRouteGroup"
        ),
    )


def _route_group_matches(r: Resource) -> tuple[Mapping[str, Any], ...]:
    out = []
    for m in r.spec.get("matches") or ():
        headers = m.get("headers") or {}
        if isinstance(headers, list):  # the SMI list-of-one-key-maps form
            merged: dict[str, str] = {}
            for item in headers:
                merged.update({str(k): str(v) for k, v in item.items()})
            headers = merged
        out.append({**m, "headers": dict(headers)})
    return tuple(out)


def _subject(raw: Mapping[str, Any], namespace: str) -> Subject:
    return Subject(
        kind=str(raw.get("kind") or "ServiceAccount"),
        name=str(raw["name"]),
        namespace=str(raw.get("namespace") or namespace),
    )


def _traffic_target(r: Resource) -> TrafficTarget:
    s = r.spec
    ns = _ns(r)
    rules = []
    for rule in s.get("rules") or ():
        matches = rule.get("matches")
        rules.append(
            TrafficRule(
                kind=str(rule["kind"]),
                name=str(rule["name"]),
                matches=_str_list(matches) if matches is not None else None,
            )
        )
    return TrafficTarget(
        name=r.name,
        namespace=ns,
        destination=_subject(s["destination"], ns),
        sources=tuple(_subject(x, ns) for x in s.get("sources") or ()),
        rules=tuple(rules),
    )


def _tcp_route_ports(r: Resource) -> tuple[int, ...]:
    matches = r.spec.get("matches") or {}
    return tuple(sorted({int(p) for p in matches.get("ports") or ()}))


def _http_route(r: Resource) -> HTTPRoute:
    s = r.spec
    return HTTPRoute(
        name=r.name,
        namespace=_ns(r),
        parent_refs=tuple(s.get("parentRefs") or ()),
        hostnames=tuple(h.lower() for h in _str_list(s.get("hostnames"))),
        rules=tuple(s.get("rules") or ()),
    )


def _mesh(resources: Iterable[Resource]) -> MeshDefaults:
    meshes = sorted((r for r in resources if r.kind == "Mesh"), key=lambda r: r.name)
    if not meshes:
        return MeshDefaults()
    # One mesh is expected; with several, the one named "default" (else the first) wins.
    mesh = next((m for m in meshes if m.name == "default"), meshes[0])
    d = mesh.spec.get("defaults") or {}
    mtls = mesh.spec.get("mtls") or {}
    authorization = mesh.spec.get("authorization") or {}
    base = MeshDefaults()
    mode = str(mtls.get("mode") or base.mtls_mode).upper()
    if mode not in MTLS_MODES:
        raise CompileError(
            f"Mesh {mesh.name}: spec.mtls.mode is {mode!r}; expected one of: "
            + ", ".join(MTLS_MODES)
        )
    return MeshDefaults(
        trust_domain=str(mesh.spec.get("trustDomain") or base.trust_domain),
        connect_timeout=str(d.get("connectTimeout") or base.connect_timeout),
        request_timeout=str(d.get("requestTimeout") or base.request_timeout),
        lb_policy=str(d.get("lbPolicy") or base.lb_policy),
        mtls_mode=mode,
        default_action=_default_action(mesh, authorization, base),
        retries=_settings(d.get("retries")),
        outlier_detection=_settings(d.get("outlierDetection")),
    )


def _default_action(mesh: Resource, authorization: Mapping[str, Any], base: MeshDefaults) -> str:
    action = str(authorization.get("defaultAction") or base.default_action).upper()
    if action not in DEFAULT_ACTIONS:
        raise CompileError(
            f"Mesh {mesh.name}: spec.authorization.defaultAction is {action!r}; expected one "
            "of: " + ", ".join(DEFAULT_ACTIONS)
        )
    return action


def build_index(resources: Sequence[Resource]) -> Index:
    """Read ``resources`` into an ``Index``; the result does not depend on their order."""
    ordered = sorted(resources, key=lambda r: (r.kind, _ns(r), r.name))
    index = Index(mesh=_mesh(ordered))
    workloads_of: dict[tuple[str, str], list[Workload]] = defaultdict(list)
    for r in ordered:
        key = (_ns(r), r.name)
        if r.kind == "Service":
            index.services[key] = _service(r)
        elif r.kind == "Workload":
            w = _workload(r)
            index.workloads.append(w)
            index.workload_by_key[key] = w
            workloads_of[(w.namespace, w.service)].append(w)
        elif r.kind == "ExternalService":
            index.externals[key] = _external(r)
        elif r.kind == "Gateway":
            index.gateways[key] = _gateway(r)
        elif r.kind == "TrafficSplit":
            split = _split(r)
            # One split per root service is expected; with several, the first by name wins.
            index.splits_of.setdefault((split.namespace, split.service), split)
        elif r.kind == "HTTPRouteGroup":
            index.route_groups[key] = _route_group_matches(r)
        elif r.kind == "HTTPRoute":
            index.http_routes.append(_http_route(r))
        elif r.kind == "TrafficTarget":
            index.traffic_targets.append(_traffic_target(r))
        elif r.kind == "TCPRoute":
            index.tcp_routes[key] = _tcp_route_ports(r)
    index.workloads_of = dict(workloads_of)
    return index
