"""Spec schemas of the SMI kinds (../shared/docs/specs.md section 1): TrafficTarget
(access v1alpha3), HTTPRouteGroup and TCPRoute (specs v1alpha4), TrafficSplit (split
v1alpha4), with the [choice] decisions written there."""

from __future__ import annotations

from typing import Any, Final

from ubimesh.control.resources.scalars import dns_label_problem, header_name_problem, regex_problem
from ubimesh.control.resources.schema import (
    NAME,
    PORT,
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

REGEX: Final = Str(
    "a regular expression RE2 accepts (no lookaround, no backreferences)", regex_problem
)
HEADER_NAME: Final = Str("an HTTP header name", header_name_problem)
METHOD: Final = Enum("*", "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH")


class HeaderRegexes(Node):
    """SMI ``headers``: header name -> value regex, written as a map (the spec prose) or as a
    list of one-key maps (the CRD schema); normalized to one map with lower-case names. A list
    item with several keys, or a name given twice, is refused."""

    expected = "a mapping of header name to value regex, or a list of one-key mappings"

    def check(self, value: Any, path: str, ctx: Ctx) -> Any:
        if isinstance(value, dict):
            pairs = [(child(path, str(k)), k, v) for k, v in value.items()]
        elif isinstance(value, list):
            pairs = []
            for i, item in enumerate(value):
                where = f"{path}[{i}]"
                if not isinstance(item, dict) or len(item) != 1:
                    ctx.fail(where, item, "a mapping with exactly one header name",
                             "is not a one-key mapping")
                    continue
                ((k, v),) = item.items()
                pairs.append((child(where, str(k)), k, v))
        else:
            ctx.fail(path, value, self.expected, "is neither a mapping nor a list")
            return value
        out: dict[str, Any] = {}
        for where, k, v in pairs:
            HEADER_NAME.check(k, where, ctx)
            REGEX.check(v, where, ctx)
            name = k.lower() if isinstance(k, str) else k
            if name in out:
                ctx.fail(where, k, "each header name once", "is given twice")
            out[name] = v
        return out


HTTP_ROUTE_GROUP: Final = Obj(
    {
        "matches": req(
            ListOf(
                Obj(
                    {
                        "name": req(Str("a match name")),
                        "pathRegex": opt(REGEX),
                        "methods": opt(ListOf(METHOD, unique_items=True)),
                        "headers": opt(HeaderRegexes()),
                    }
                ),
                min_items=1,
                unique=("name",),
                expected="a list of at least 1 match {name, pathRegex, methods, headers}",
            )
        )
    }
)

TCP_ROUTE: Final = Obj(
    {
        "matches": req(
            Obj(
                {
                    # [] (the default) means every port of the destination service.
                    "ports": opt(ListOf(PORT, unique_items=True), []),
                    # In the Go types only; accepted and ignored.
                    "name": opt(Str()),
                },
                expected="a mapping {ports}",
            )
        )
    }
)


def _subject_defaults(subject: dict[str, Any], path: str, ctx: Ctx) -> None:
    subject.setdefault("namespace", ctx.namespace)


SUBJECT: Final = Obj(
    {
        "kind": req(Enum("ServiceAccount")),
        "name": req(NAME),
        "namespace": opt(NAME),
    },
    _subject_defaults,
    expected="a ServiceAccount {kind, name, namespace}",
)


def _rule_rules(rule: dict[str, Any], path: str, ctx: Ctx) -> None:
    if rule["kind"] == "TCPRoute" and "matches" in rule:
        ctx.fail(child(path, "matches"), rule["matches"],
                 "no matches on a TCPRoute rule (its ports are in the TCPRoute)",
                 "is only for HTTPRouteGroup rules")


#: A TrafficTarget's destination: a ServiceAccount (SMI), or an ExternalService (a ubimesh
#: extension: egress control, docs/policy.md section 3).
DESTINATION: Final = Obj(
    {
        "kind": req(Enum("ServiceAccount", "ExternalService")),
        "name": req(NAME),
        "namespace": opt(NAME),
    },
    _subject_defaults,
    expected="a ServiceAccount or ExternalService {kind, name, namespace}",
)


TRAFFIC_TARGET: Final = Obj(
    {
        "destination": req(DESTINATION),
        "sources": req(ListOf(SUBJECT, min_items=1)),
        "rules": req(
            ListOf(
                Obj(
                    {
                        "kind": req(Enum("HTTPRouteGroup", "TCPRoute")),
                        "name": req(NAME),
                        "matches": opt(ListOf(Str("a match name"), unique_items=True)),
                    },
                    _rule_rules,
                ),
                min_items=1,
                expected="a list of at least 1 rule {kind, name, matches}",
            )
        ),
    }
)


def _split_root(spec: dict[str, Any], path: str, ctx: Ctx) -> None:
    # [choice] The root is a Service of the split's namespace, by name or by one of its
    # hostnames (NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local); stored as the name.
    root = spec["service"]
    parts = root.split(".")
    ok = dns_label_problem(parts[0]) is None and (
        len(parts) == 1
        or (parts[1] == ctx.namespace and parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]))
    )
    if ok:
        spec["service"] = parts[0]
    else:
        ctx.fail(child(path, "service"), root,
                 f"a Service name of namespace {ctx.namespace!r} (or its hostname)",
                 "is not a service of this namespace")


TRAFFIC_SPLIT: Final = Obj(
    {
        "service": req(Str("a Service name")),
        "backends": req(
            ListOf(
                Obj({"service": req(NAME), "weight": req(Int(0, 1_000_000))}),
                min_items=1,
                unique=("service",),
                expected="a list of at least 1 backend {service, weight}",
            )
        ),
        "matches": opt(
            ListOf(
                Obj(
                    {
                        "kind": req(Enum("HTTPRouteGroup")),
                        "name": req(NAME),
                        "apiGroup": opt(Enum("specs.smi-spec.io")),
                    }
                ),
                unique=("name",),
            )
        ),
    },
    _split_root,
)
