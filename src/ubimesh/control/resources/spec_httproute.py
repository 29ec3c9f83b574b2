"""Spec schema of the Gateway API ``gateway.networking.k8s.io/v1`` HTTPRoute, the subset
docs/control-plane.md section 1 lists: parents are ubimesh Gateways, or Services for mesh
routing as GAMMA does; backends are Services or ExternalServices."""

from __future__ import annotations

from typing import Any, Final

from ubimesh.control.resources.errors import MISSING
from ubimesh.control.resources.scalars import dns_name_problem, hostname_problem, parse_duration
from ubimesh.control.resources.schema import (
    NAME,
    PORT,
    AnyStr,
    Ctx,
    Enum,
    Int,
    ListOf,
    Node,
    Obj,
    Str,
    child,
    opt,
    req,
)
from ubimesh.control.resources.spec_smi import HEADER_NAME, REGEX
from ubimesh.control.resources.spec_ubimesh import DURATION

PATH_VALUE: Final = Str("a path that starts with '/'",
                        lambda v: None if v.startswith("/") else "does not start with '/'")
DNS_NAME: Final = Str("a DNS name", dns_name_problem)


class IntOneOf(Node):
    """One of a fixed set of integers (redirect status codes)."""

    def __init__(self, *values: int) -> None:
        self.values = frozenset(values)
        self.expected = "one of: " + ", ".join(str(v) for v in values)

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if isinstance(value, bool) or value not in self.values:
            ctx.fail(path, value, self.expected, "is not supported")
        return value


def _parent_defaults(ref: dict[str, Any], path: str, ctx: Ctx) -> None:
    ref.setdefault("namespace", ctx.namespace)
    if ref["kind"] == "Service" and "sectionName" in ref:
        ctx.fail(child(path, "sectionName"), ref["sectionName"],
                 "port (a Service parent is narrowed by port)", "is only for Gateway parents")


PARENT_REF: Final = Obj(
    {
        "kind": opt(Enum("Gateway", "Service"), "Gateway"),
        "name": req(NAME),
        "namespace": opt(NAME),
        "sectionName": opt(NAME),
        "port": opt(PORT),
    },
    _parent_defaults,
    expected="a parent {kind: Gateway | Service, name, namespace, sectionName, port}",
)


def _backend_defaults(ref: dict[str, Any], path: str, ctx: Ctx) -> None:
    ref.setdefault("namespace", ctx.namespace)
    if ref["kind"] == "Service" and "port" not in ref:
        ctx.fail(child(path, "port"), MISSING,
                 "a port number of the Service (required for a Service backend)")


def _backend(with_weight: bool) -> Obj:
    fields = {
        "kind": opt(Enum("Service", "ExternalService"), "Service"),
        "name": req(NAME),
        "namespace": opt(NAME),
        "port": opt(PORT),
    }
    if with_weight:
        fields["weight"] = opt(Int(0, 1_000_000), 1)
    return Obj(fields, _backend_defaults,
               expected="a backend {kind: Service | ExternalService, name, namespace, port}")


def _string_match_rules(match: dict[str, Any], path: str, ctx: Ctx) -> None:
    if match["type"] == "RegularExpression":
        REGEX.check(match["value"], child(path, "value"), ctx)


def _path_match_rules(match: dict[str, Any], path: str, ctx: Ctx) -> None:
    where = child(path, "value")
    if match["type"] == "RegularExpression":
        REGEX.check(match["value"], where, ctx)
    else:
        PATH_VALUE.check(match["value"], where, ctx)


def _string_match(name: Node) -> ListOf:
    return ListOf(
        Obj(
            {
                "type": opt(Enum("Exact", "RegularExpression"), "Exact"),
                "name": req(name),
                "value": req(AnyStr()),
            },
            _string_match_rules,
        ),
        unique=("name",),
        fold_case=name is HEADER_NAME,
    )


ROOT_PATH_MATCH: Final = {"type": "PathPrefix", "value": "/"}

MATCH: Final = Obj(
    {
        "path": opt(
            Obj(
                {
                    "type": opt(Enum("Exact", "PathPrefix", "RegularExpression"), "PathPrefix"),
                    "value": opt(Str("a path or a regex"), "/"),
                },
                _path_match_rules,
            ),
            ROOT_PATH_MATCH,
        ),
        "headers": opt(_string_match(HEADER_NAME)),
        "queryParams": opt(_string_match(Str("a query parameter name"))),
        "method": opt(Enum("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                           "PATCH")),
    }
)

HEADER_VALUES: Final = ListOf(
    Obj({"name": req(HEADER_NAME), "value": req(AnyStr())}), unique=("name",), fold_case=True
)
HEADER_MODIFIER: Final = Obj(
    {
        "set": opt(HEADER_VALUES),
        "add": opt(HEADER_VALUES),
        "remove": opt(ListOf(HEADER_NAME, unique_items=True)),
    }
)

_PATH_MODIFIER_FIELD = {"ReplaceFullPath": "replaceFullPath",
                        "ReplacePrefixMatch": "replacePrefixMatch"}


def _path_modifier_rules(mod: dict[str, Any], path: str, ctx: Ctx) -> None:
    _exactly_the_typed_field(mod, path, ctx, _PATH_MODIFIER_FIELD)


def _exactly_the_typed_field(
    obj: dict[str, Any], path: str, ctx: Ctx, fields: dict[str, str]
) -> None:
    """Gateway API's union shape: ``type`` names the one field that must be present."""
    wanted = fields[obj["type"]]
    if wanted not in obj:
        ctx.fail(child(path, wanted), MISSING, f"the {wanted} of a {obj['type']}")
    for other in fields.values():
        if other != wanted and other in obj:
            ctx.fail(child(path, other), MISSING, f"only {wanted} with type {obj['type']}",
                     "does not go with this type")


PATH_MODIFIER: Final = Obj(
    {
        "type": req(Enum(*_PATH_MODIFIER_FIELD)),
        "replaceFullPath": opt(PATH_VALUE),
        "replacePrefixMatch": opt(PATH_VALUE),
    },
    _path_modifier_rules,
)


def _fraction_rules(fraction: dict[str, Any], path: str, ctx: Ctx) -> None:
    if fraction["numerator"] > fraction["denominator"]:
        ctx.fail(child(path, "numerator"), fraction["numerator"],
                 "a numerator no greater than the denominator", "is too large")


def _mirror_rules(mirror: dict[str, Any], path: str, ctx: Ctx) -> None:
    if "percent" in mirror and "fraction" in mirror:
        ctx.fail(child(path, "fraction"), mirror["fraction"], "percent or fraction, not both",
                 "is given with percent")


MIRROR: Final = Obj(
    {
        "backendRef": req(_backend(with_weight=False)),
        "percent": opt(Int(0, 100)),
        "fraction": opt(
            Obj(
                {"numerator": req(Int(0, 2**31 - 1)), "denominator": opt(Int(1, 2**31 - 1), 100)},
                _fraction_rules,
            )
        ),
    },
    _mirror_rules,
)

REDIRECT: Final = Obj(
    {
        "scheme": opt(Enum("http", "https")),
        "hostname": opt(DNS_NAME),
        "path": opt(PATH_MODIFIER),
        "port": opt(PORT),
        "statusCode": opt(IntOneOf(301, 302, 303, 307, 308), 302),
    }
)

REWRITE: Final = Obj({"hostname": opt(DNS_NAME), "path": opt(PATH_MODIFIER)})

_FILTER_FIELD = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
}


def _filter_rules(filt: dict[str, Any], path: str, ctx: Ctx) -> None:
    _exactly_the_typed_field(filt, path, ctx, _FILTER_FIELD)


FILTER: Final = Obj(
    {
        "type": req(Enum(*_FILTER_FIELD)),
        "requestHeaderModifier": opt(HEADER_MODIFIER),
        "responseHeaderModifier": opt(HEADER_MODIFIER),
        "requestMirror": opt(MIRROR),
        "requestRedirect": opt(REDIRECT),
        "urlRewrite": opt(REWRITE),
    },
    _filter_rules,
)


def _rule_rules(rule: dict[str, Any], path: str, ctx: Ctx) -> None:
    filters = rule.get("filters", [])
    seen: dict[str, int] = {}
    for i, filt in enumerate(filters):
        kind = filt["type"]
        if kind in seen and kind != "RequestMirror":
            ctx.fail(f"{path}.filters[{i}].type", kind,
                     "each filter type once per rule (RequestMirror may repeat)",
                     f"is used twice (also at {path}.filters[{seen[kind]}])")
        seen.setdefault(kind, i)
    if "RequestRedirect" in seen and "URLRewrite" in seen:
        ctx.fail(f"{path}.filters[{seen['URLRewrite']}].type", "URLRewrite",
                 "RequestRedirect or URLRewrite in one rule, not both",
                 "is used with RequestRedirect")
    for i, filt in enumerate(filters):
        body = filt.get("requestRedirect") or filt.get("urlRewrite") or {}
        mod = body.get("path")
        if mod is not None and mod["type"] == "ReplacePrefixMatch":
            for j, match in enumerate(rule["matches"]):
                if match["path"]["type"] != "PathPrefix":
                    ctx.fail(f"{path}.matches[{j}].path.type", match["path"]["type"],
                             f"PathPrefix (filters[{i}] uses ReplacePrefixMatch)",
                             "does not go with ReplacePrefixMatch")
    timeouts = rule.get("timeouts", {})
    if "request" in timeouts and "backendRequest" in timeouts:
        request = parse_duration(timeouts["request"])
        backend = parse_duration(timeouts["backendRequest"])
        if request and (not backend or backend > request):
            ctx.fail(f"{path}.timeouts.backendRequest", timeouts["backendRequest"],
                     f"a timeout no longer than request ({timeouts['request']})", "is longer")


RULE: Final = Obj(
    {
        "matches": opt(ListOf(MATCH, min_items=1), [{"path": ROOT_PATH_MATCH}]),
        "filters": opt(ListOf(FILTER)),
        "backendRefs": opt(ListOf(_backend(with_weight=True))),
        "timeouts": opt(Obj({"request": opt(DURATION), "backendRequest": opt(DURATION)})),
    },
    _rule_rules,
)

HTTP_ROUTE: Final = Obj(
    {
        "parentRefs": req(ListOf(PARENT_REF, min_items=1)),
        "hostnames": opt(
            ListOf(Str("a hostname ('*.' and a domain for a wildcard)", hostname_problem),
                   unique_items=True)
        ),
        "rules": req(
            ListOf(RULE, min_items=1,
                   expected="a list of at least 1 rule {matches, filters, backendRefs, timeouts}")
        ),
    }
)
