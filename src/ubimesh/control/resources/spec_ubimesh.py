"""Spec schemas of the ``ubimesh.io/v1alpha1`` kinds: Mesh, Service, Workload, Gateway and
ExternalService (docs/control-plane.md section 1; every field in docs/resources.md)."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from ubimesh.control.resources.errors import MISSING
from ubimesh.control.resources.scalars import (
    duration_problem,
    host_problem,
    hostname_problem,
    ip_problem,
)
from ubimesh.control.resources.schema import (
    DURATION_EXPECTED,
    FILL,
    NAME,
    PORT,
    AnyStr,
    Bool,
    Ctx,
    Enum,
    Int,
    ListOf,
    MapOf,
    Node,
    Obj,
    PortRef,
    Refused,
    Str,
    child,
    opt,
    req,
)

DURATION: Final = Str(DURATION_EXPECTED, duration_problem)
IP: Final = Str("an IP address", ip_problem)
HOST: Final = Str("a DNS name or an IP address", host_problem)
LB_POLICY: Final = Enum("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
_TD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
#: SPIFFE trust domain characters (SPIFFE-ID.md: lower case letters, digits, ".", "-", "_").
TRUST_DOMAIN: Final = Str(
    "a trust domain (lower case letters, digits, '.', '-', '_')",
    lambda v: None if all(c in _TD_CHARS for c in v) else "is not a SPIFFE trust domain",
)

TRACING_PROVIDERS: Final = ("builtin", "zipkin", "opentelemetry")
#: Where each provider's spans go when ``address`` has no path (Zipkin v2 JSON; OTLP/HTTP).
TRACING_PATHS: Final = {"zipkin": "/api/v2/spans", "opentelemetry": "/v1/traces"}
TRACING_ADDRESS_EXPECTED: Final = (
    "HOST:PORT or http://HOST:PORT[/PATH] of a Zipkin, Jaeger (Zipkin port 9411) or "
    "OpenTelemetry collector (OTLP/HTTP port 4318)"
)


def parse_tracing_address(text: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of ``spec.tracing.address`` (``path`` "" when not given; IPv6
    hosts in brackets). ValueError naming what is wrong: proxies send spans in plain HTTP, so
    ``https://`` is refused, and a port is required (collectors use several well-known ones)."""
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme != "http":
        raise ValueError(f"uses {url.scheme}://, which is not supported (spans are sent in "
                         "plain HTTP; run a local collector that forwards over TLS)")
    if url.query or url.fragment or url.username or url.password:
        raise ValueError("has a query, fragment or user; give only HOST:PORT and a path")
    try:
        port = url.port
    except ValueError:
        raise ValueError("has a port that is not a number 1..65535") from None
    host = url.hostname or ""
    if not host:
        raise ValueError("has no host")
    if port is None or not 0 < port <= 65535:
        raise ValueError("has no port (e.g. :9411 for Zipkin or Jaeger, :4318 for OTLP/HTTP)")
    problem = host_problem(host)
    if problem is not None:
        raise ValueError(f"has a host, {host!r}, that {problem}")
    return host, port, url.path if url.path not in ("", "/") else ""


def _tracing_address_problem(value: str) -> str | None:
    try:
        parse_tracing_address(value)
    except ValueError as exc:
        return str(exc)
    return None


class Percent(Node):
    """A number 0..100 (integer or decimal: 0.5 is one request in 200)."""

    expected = "a percentage, a number 0..100"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool):
            ctx.fail(path, value, self.expected, "is not a number")
        elif not 0 <= value <= 100:
            ctx.fail(path, value, self.expected, "is out of range")
        return value


def _tracing_rules(tracing: dict[str, Any], path: str, ctx: Ctx) -> None:
    provider = tracing["provider"]
    if provider == "builtin" and "address" in tracing:
        ctx.fail(child(path, "address"), tracing["address"],
                 "no address with provider builtin (spans go to the control plane's "
                 "collector); set provider: zipkin or opentelemetry to send them elsewhere",
                 "is not used by the builtin provider")
    elif provider != "builtin" and "address" not in tracing:
        ctx.fail(child(path, "address"), MISSING,
                 f"{TRACING_ADDRESS_EXPECTED}: provider {provider} sends spans there",
                 "required field is missing")


#: ``spec.tracing`` (docs/resources.md; compiled by control/compiler/tracing.py). Not filled
#: in when absent: the compiler reads an absent field as its default (enabled, 100 %, builtin).
TRACING: Final = Obj(
    {
        "enabled": opt(Bool(), True),
        # 100: a mesh run by `ubimesh up` is small and for developing: every request shows
        # up as a trace. Production meshes lower it (docs/resources.md says how much).
        "sampling": opt(Percent(), 100),
        "provider": opt(Enum(*TRACING_PROVIDERS), "builtin"),
        "address": opt(Str(TRACING_ADDRESS_EXPECTED, _tracing_address_problem)),
    },
    _tracing_rules,
)

def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else "is not an absolute path"


#: ``spec.accessLog`` (docs/resources.md; compiled by control/compiler/access_log.py). Not
#: filled in when absent: the compiler reads an absent field as its default (on, stdout, text).
ACCESS_LOG: Final = Obj(
    {
        "enabled": opt(Bool(), True),
        "path": opt(Str("an absolute file path, or /dev/stdout", _absolute_path), "/dev/stdout"),
        "format": opt(Enum("text", "json"), "text"),
    }
)

#: Conditions a mesh route retries on (Envoy retry_on names; docs/resources.md "Resilience").
RETRY_ON: Final = Enum(
    "connect-failure", "refused-stream", "reset", "gateway-error", "5xx", "retriable-4xx"
)
#: ``retries`` of Mesh ``spec.defaults`` (with its defaults) and of a Service (each field
#: overrides the mesh's). A non-idempotent request is retried only when nothing reached the
#: upstream, whatever ``retryOn`` says (docs/envoy-compat.md).
RETRIES_FIELDS: Final = {
    "attempts": Int(0, 10, "retries after the first try, 0..10"),
    "perTryTimeout": DURATION,
    "retryOn": ListOf(RETRY_ON, min_items=1, unique_items=True),
    "budgetPercent": Int(1, 100, "a percentage 1..100 of the active requests"),
    "minRetryConcurrency": Int(0, 1000, "an integer 0..1000"),
}
#: ``outlierDetection``: eject an endpoint after consecutive errors (5xx, connect failures,
#: timeouts, resets), for ``baseEjectionTime`` times the number of its ejections.
OUTLIER_FIELDS: Final = {
    "enabled": Bool(),
    "consecutiveErrors": Int(1, 1000, "an integer 1..1000"),
    "interval": DURATION,
    "baseEjectionTime": DURATION,
    "maxEjectionPercent": Int(0, 100, "a percentage 0..100 of the endpoints"),
}
RETRY_DEFAULTS: Final = {
    "attempts": 2,
    "retryOn": ["connect-failure", "refused-stream", "reset", "gateway-error"],
    "budgetPercent": 20,
    "minRetryConcurrency": 10,
}
OUTLIER_DEFAULTS: Final = {
    "enabled": True,
    "consecutiveErrors": 5,
    "interval": "2s",
    "baseEjectionTime": "10s",
    "maxEjectionPercent": 100,
}


def _fields(nodes: dict[str, Node], defaults: dict[str, Any]) -> dict[str, Any]:
    return {
        name: (opt(node, defaults[name]) if name in defaults else opt(node))
        for name, node in nodes.items()
    }


MESH: Final = Obj(
    {
        "trustDomain": opt(TRUST_DOMAIN, "cluster.local"),
        # STRICT: zero trust by default (every proxy `ubimesh up` starts gets its identity
        # with no manual step). The compiler's default (compiler/index.py
        # MeshDefaults.mtls_mode) must stay equal to this one.
        "mtls": opt(
            Obj({"mode": opt(Enum("STRICT", "PERMISSIVE", "DISABLE"), "STRICT")}), FILL
        ),
        # DENY: nothing reaches a workload until a TrafficTarget allows it (SMI); ALLOW: a
        # destination no TrafficTarget names is open (docs/policy.md section 3). The
        # compiler's default (compiler/index.py MeshDefaults.default_action) must stay equal.
        "authorization": opt(
            Obj({"defaultAction": opt(Enum("DENY", "ALLOW"), "DENY")}), FILL
        ),
        "defaults": opt(
            Obj(
                {
                    "connectTimeout": opt(DURATION, "1s"),
                    "requestTimeout": opt(DURATION, "15s"),
                    "lbPolicy": opt(LB_POLICY, "ROUND_ROBIN"),
                    "retries": opt(Obj(_fields(RETRIES_FIELDS, RETRY_DEFAULTS)), FILL),
                    "outlierDetection": opt(Obj(_fields(OUTLIER_FIELDS, OUTLIER_DEFAULTS)), FILL),
                }
            ),
            FILL,
        ),
        "tracing": opt(TRACING),
        "accessLog": opt(ACCESS_LOG),
    }
)


def _service_port_defaults(port: dict[str, Any], path: str, ctx: Ctx) -> None:
    port.setdefault("targetPort", port["port"])


SERVICE: Final = Obj(
    {
        "ports": req(
            ListOf(
                Obj(
                    {
                        "name": req(NAME),
                        "port": req(PORT),
                        "protocol": req(Enum("http", "tcp")),
                        "targetPort": opt(PORT),
                    },
                    _service_port_defaults,
                ),
                min_items=1,
                unique=("name", "port"),
                expected="a list of at least 1 port {name, port, protocol, targetPort}",
            )
        ),
        "lbPolicy": opt(LB_POLICY),
        "connectTimeout": opt(DURATION),
        "requestTimeout": opt(DURATION),
        "retries": opt(Obj(_fields(RETRIES_FIELDS, {}))),
        "outlierDetection": opt(Obj(_fields(OUTLIER_FIELDS, {}))),
    }
)

PORT_MAP: Final = MapOf(NAME, PORT, "a mapping of service port name to port number")


def _upstream_defaults(upstream: dict[str, Any], path: str, ctx: Ctx) -> None:
    upstream.setdefault("namespace", ctx.namespace)


SIDECAR: Final = Obj(
    {
        "inboundPorts": opt(PORT_MAP),
        "outboundPort": opt(PORT),
        "upstreams": opt(
            ListOf(
                Obj(
                    {
                        "service": req(NAME),
                        "namespace": opt(NAME),
                        # Absent means the service's first port (resolved by the compiler).
                        "port": opt(PortRef()),
                        "localPort": req(PORT),
                    },
                    _upstream_defaults,
                ),
                unique=("localPort",),
            )
        ),
        "adminPort": opt(PORT),
    }
)


def _workload_defaults(spec: dict[str, Any], path: str, ctx: Ctx) -> None:
    spec.setdefault("serviceAccount", spec["service"])


WORKLOAD: Final = Obj(
    {
        "service": req(NAME),
        "address": req(IP),
        "ports": opt(PORT_MAP),
        "serviceAccount": opt(NAME),
        "site": opt(Str("a site name"), "default"),
        "locality": opt(
            Obj({"region": opt(Str()), "zone": opt(Str()), "subZone": opt(Str())})
        ),
        "weight": opt(Int(1, 128), 1),
        "command": opt(ListOf(AnyStr(), min_items=1)),
        "env": opt(MapOf(Str("an environment variable name"), AnyStr())),
        "sidecar": opt(SIDECAR),
    },
    _workload_defaults,
)

LISTENER_HOST: Final = Str(
    "a hostname, '*.' and a domain, or '*'",
    lambda v: None if v == "*" else hostname_problem(v),
)
TLS_REFUSED: Final = Refused(
    "no tls field (remove it)",
    "is not supported yet: TLS on gateway listeners arrives with the identity issue",
)


def _listener_rules(listener: dict[str, Any], path: str, ctx: Ctx) -> None:
    if listener["protocol"] == "TCP" and "backend" not in listener:
        ctx.fail(child(path, "backend"), MISSING, "{service, port}: a TCP listener "
                 "forwards to one service port", "required field is missing")
    if listener["protocol"] == "HTTP" and "backend" in listener:
        ctx.fail(child(path, "backend"), listener["backend"],
                 "no backend on an HTTP listener (attach HTTPRoutes to the gateway)",
                 "is only for TCP listeners")

GATEWAY: Final = Obj(
    {
        "address": opt(IP, "0.0.0.0"),
        "adminPort": opt(PORT),
        "listeners": req(
            ListOf(
                Obj(
                    {
                        "name": req(NAME),
                        "port": req(PORT),
                        "protocol": req(Enum("HTTP", "TCP")),
                        "hosts": opt(ListOf(LISTENER_HOST, min_items=1), ["*"]),
                        "tls": opt(TLS_REFUSED),
                        "backend": opt(Obj({"service": req(NAME), "port": req(PortRef())})),
                    },
                    _listener_rules,
                ),
                min_items=1,
                unique=("name", "port"),
                expected="a list of at least 1 listener {name, port, protocol, hosts}",
            )
        ),
    }
)

EXTERNAL_SERVICE: Final = Obj(
    {
        "host": req(HOST),
        "port": req(PORT),
        "protocol": req(Enum("http", "tcp")),
        "addresses": opt(ListOf(IP, min_items=1, unique_items=True)),
    }
)
