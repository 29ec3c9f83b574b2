"""Spec schemas of the ``ubimesh.io/v1alpha1`` kinds: Mesh, Service, Workload, Gateway and
ExternalService (docs/control-plane.md section 1; every field in docs/resources.md)."""

from __future__ import annotations

from typing import Any, Final

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
    Ctx,
    Enum,
    Int,
    ListOf,
    MapOf,
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
                }
            ),
            FILL,
        ),
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
