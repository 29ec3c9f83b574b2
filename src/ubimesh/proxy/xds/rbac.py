"""envoy.config.rbac.v3 and the two RBAC filters: Envoy's protos in, ``ubimesh.policy.rbac``
data out.

``http_rbac`` translates ``envoy.extensions.filters.http.rbac.v3.RBAC`` and ``network_rbac``
``envoy.extensions.filters.network.rbac.v3.RBAC``, each field against a whitelist, every other
field refused with its path (docs/envoy-compat.md). ``rbac_config_from_proto`` is the same for
callers outside the proxy (``ubimesh policy``): it raises ``ConfigErrors`` instead of
collecting errors in a context.
"""

from __future__ import annotations

from typing import Any

from ubimesh.policy.rbac import (
    Cidr,
    IdAnd,
    IdAny,
    IdAuthenticated,
    IdDirectRemoteIp,
    IdHeader,
    IdNot,
    IdOr,
    IdRemoteIp,
    IdSourceIp,
    PermAnd,
    PermAny,
    PermDestinationIp,
    PermDestinationPort,
    PermHeader,
    Permission,
    PermNot,
    PermOr,
    PermUrlPath,
    Policy,
    Principal,
    RbacAction,
    RbacConfig,
    RbacRules,
    make_cidr,
    sorted_rules,
)
from ubimesh.proxy.snapshot.types import NetworkRbacConfig, StringMatcher, StringMatchKind
from ubimesh.proxy.xds import common
from ubimesh.proxy.xds.context import Ctx, entry, item, join
from ubimesh.proxy.xds.errors import ConfigError, ConfigErrors

_NOT_YET = "not implemented yet"
_MATCHER_HINT = "the unified matcher API is " + _NOT_YET + "; use rules"
_SHADOW_MATCHER_HINT = "the unified matcher API is " + _NOT_YET + "; use shadow_rules"

HTTP_RBAC_TYPE = "envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC_TYPE = "envoy.extensions.filters.network.rbac.v3.RBAC"

# ---------------------------------------------------------------------------------------------
# The filters

_HTTP_RBAC = {
    "rules",
    "shadow_rules",
    "rules_stat_prefix",
    "shadow_rules_stat_prefix",
    "track_per_rule_stats",
}
_HTTP_RBAC_HINTS = {"matcher": _MATCHER_HINT, "shadow_matcher": _SHADOW_MATCHER_HINT}

_NETWORK_RBAC = {
    "rules",
    "shadow_rules",
    "stat_prefix",
    "shadow_rules_stat_prefix",
    "enforcement_type",
}
_NETWORK_RBAC_HINTS = {
    "matcher": _MATCHER_HINT,
    "shadow_matcher": _SHADOW_MATCHER_HINT,
    "delay_deny": "delaying the close of a denied connection is " + _NOT_YET,
}
_CONTINUOUS = 1  # RBAC.EnforcementType.CONTINUOUS


def http_rbac(ctx: Ctx, msg: Any, path: str) -> RbacConfig:
    """envoy.extensions.filters.http.rbac.v3.RBAC."""
    ctx.fields(msg, path, _HTTP_RBAC, _HTTP_RBAC_HINTS)
    return RbacConfig(
        rules=_optional_rules(ctx, msg, "rules", path, network=False),
        shadow_rules=_optional_rules(ctx, msg, "shadow_rules", path, network=False),
        rules_stat_prefix=msg.rules_stat_prefix,
        shadow_rules_stat_prefix=msg.shadow_rules_stat_prefix,
        track_per_rule_stats=msg.track_per_rule_stats,
    )


def network_rbac(ctx: Ctx, msg: Any, path: str) -> NetworkRbacConfig:
    """envoy.extensions.filters.network.rbac.v3.RBAC. The decision is taken when the
    connection is accepted (ONE_TIME_ON_FIRST_BYTE, the default, is the only enforcement)."""
    ctx.fields(msg, path, _NETWORK_RBAC, _NETWORK_RBAC_HINTS)
    if msg.enforcement_type == _CONTINUOUS:
        ctx.unsupported(
            join(path, "enforcement_type"),
            "CONTINUOUS enforcement (for metadata that changes during a connection) is "
            + _NOT_YET
            + "; use ONE_TIME_ON_FIRST_BYTE",
        )
    config = RbacConfig(
        rules=_optional_rules(ctx, msg, "rules", path, network=True),
        shadow_rules=_optional_rules(ctx, msg, "shadow_rules", path, network=True),
        shadow_rules_stat_prefix=msg.shadow_rules_stat_prefix,
    )
    return NetworkRbacConfig(stat_prefix=msg.stat_prefix, rbac=config)


def rbac_config_from_proto(msg: Any) -> RbacConfig:
    """The engine's configuration of an HTTP or network RBAC filter message (for callers
    outside the proxy, such as ``ubimesh policy``). Raises ``ConfigErrors`` naming every
    problem by its path inside ``msg``."""
    ctx = Ctx()
    name = msg.DESCRIPTOR.full_name
    if name == HTTP_RBAC_TYPE:
        config = http_rbac(ctx, msg, "")
    elif name == NETWORK_RBAC_TYPE:
        config = network_rbac(ctx, msg, "").rbac
    else:
        raise ConfigErrors(
            [ConfigError.not_supported("", f"{name} is not an RBAC filter configuration")]
        )
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    return config


def _optional_rules(ctx: Ctx, msg: Any, name: str, path: str, *, network: bool) -> RbacRules | None:
    if not msg.HasField(name):
        return None
    return rbac_rules(ctx, getattr(msg, name), join(path, name), network=network)


# ---------------------------------------------------------------------------------------------
# envoy.config.rbac.v3

_RBAC = {"action", "policies"}
_RBAC_HINTS = {"audit_logging_options": "RBAC audit loggers are " + _NOT_YET}
_ACTIONS = {0: RbacAction.ALLOW, 1: RbacAction.DENY, 2: RbacAction.LOG}

_POLICY = {"permissions", "principals"}
_CEL_HINT = "CEL conditions are " + _NOT_YET
_POLICY_HINTS = {"condition": _CEL_HINT, "checked_condition": _CEL_HINT, "cel_config": _CEL_HINT}

_PERMISSION = {
    "and_rules",
    "or_rules",
    "any",
    "header",
    "url_path",
    "destination_ip",
    "destination_port",
    "not_rule",
}
_PERMISSION_HINTS = {
    "destination_port_range": "port ranges are " + _NOT_YET + "; list the ports in or_rules",
    "metadata": "metadata matching is " + _NOT_YET,
    "sourced_metadata": "metadata matching is " + _NOT_YET,
    "requested_server_name": "matching the requested server name (SNI) is " + _NOT_YET,
    "matcher": "permission matcher extensions are " + _NOT_YET,
    "uri_template": "URI templates are " + _NOT_YET + "; use url_path",
}
_PRINCIPAL = {
    "and_ids",
    "or_ids",
    "any",
    "authenticated",
    "source_ip",
    "direct_remote_ip",
    "remote_ip",
    "header",
    "not_id",
}
_PRINCIPAL_HINTS = {
    "url_path": "url_path as a principal is " + _NOT_YET + "; use it as a permission",
    "metadata": "metadata matching is " + _NOT_YET,
    "sourced_metadata": "metadata matching is " + _NOT_YET,
    "filter_state": "filter state matching is " + _NOT_YET,
    "custom": "principal extensions are " + _NOT_YET,
}
_PERMISSION_SET = {"rules"}
_PRINCIPAL_SET = {"ids"}
_AUTHENTICATED = {"principal_name"}
_PATH_MATCHER = {"path"}
_CIDR = {"address_prefix", "prefix_len"}

#: Envoy's error for an HTTP-only rule in the network filter.
_NO_HEADERS_IN_NETWORK = "header rule, not supported by the RBAC network filter (Envoy refuses it)"


def rbac_rules(ctx: Ctx, msg: Any, path: str, *, network: bool) -> RbacRules:
    """envoy.config.rbac.v3.RBAC: the action and the policies, in Envoy's (name) order."""
    ctx.fields(msg, path, _RBAC, _RBAC_HINTS)
    action = _ACTIONS.get(msg.action)
    if action is None:
        ctx.error(join(path, "action"), f"{msg.action} is not a value of Action")
        action = RbacAction.ALLOW
    ppath = join(path, "policies")
    policies = [
        policy(ctx, name, msg.policies[name], entry(ppath, name), network=network)
        for name in sorted(msg.policies)
    ]
    return sorted_rules(action, policies)


def policy(ctx: Ctx, name: str, msg: Any, path: str, *, network: bool) -> Policy:
    """envoy.config.rbac.v3.Policy (Envoy requires at least one permission and principal)."""
    ctx.fields(msg, path, _POLICY, _POLICY_HINTS)
    perms_path = join(path, "permissions")
    ids_path = join(path, "principals")
    return Policy(
        name,
        tuple(
            permission(ctx, p, item(perms_path, i), network=network)
            for i, p in enumerate(msg.permissions)
        ),
        tuple(
            principal(ctx, p, item(ids_path, i), network=network)
            for i, p in enumerate(msg.principals)
        ),
    )


def permission(ctx: Ctx, msg: Any, path: str, *, network: bool) -> Permission:
    """envoy.config.rbac.v3.Permission."""
    ctx.fields(msg, path, _PERMISSION, _PERMISSION_HINTS)
    which = msg.WhichOneof("rule")
    rpath = join(path, which or "")
    if which == "any":
        _check_any(ctx, msg.any, rpath)
        return PermAny()
    if which in ("and_rules", "or_rules"):
        rules_msg = getattr(msg, which)
        ctx.fields(rules_msg, rpath, _PERMISSION_SET)
        spath = join(rpath, "rules")
        rules = tuple(
            permission(ctx, r, item(spath, i), network=network)
            for i, r in enumerate(rules_msg.rules)
        )
        return PermAnd(rules) if which == "and_rules" else PermOr(rules)
    if which == "not_rule":
        return PermNot(permission(ctx, msg.not_rule, rpath, network=network))
    if which == "header":
        if network:
            ctx.error(rpath, _NO_HEADERS_IN_NETWORK)
        return PermHeader(common.header_matcher(ctx, msg.header, rpath))
    if which == "url_path":
        ctx.fields(msg.url_path, rpath, _PATH_MATCHER)
        return PermUrlPath(_string_matcher(ctx, msg.url_path, "path", rpath))
    if which == "destination_port":
        return PermDestinationPort(msg.destination_port)
    if which == "destination_ip":
        return PermDestinationIp(cidr_range(ctx, msg.destination_ip, rpath))
    # No rule (reported by the constraint check) or a refused one: a rule that never matches.
    return PermNot(PermAny())


def principal(ctx: Ctx, msg: Any, path: str, *, network: bool) -> Principal:
    """envoy.config.rbac.v3.Principal."""
    ctx.fields(msg, path, _PRINCIPAL, _PRINCIPAL_HINTS)
    which = msg.WhichOneof("identifier")
    ipath = join(path, which or "")
    if which == "any":
        _check_any(ctx, msg.any, ipath)
        return IdAny()
    if which in ("and_ids", "or_ids"):
        ids_msg = getattr(msg, which)
        ctx.fields(ids_msg, ipath, _PRINCIPAL_SET)
        spath = join(ipath, "ids")
        ids = tuple(
            principal(ctx, p, item(spath, i), network=network) for i, p in enumerate(ids_msg.ids)
        )
        return IdAnd(ids) if which == "and_ids" else IdOr(ids)
    if which == "not_id":
        return IdNot(principal(ctx, msg.not_id, ipath, network=network))
    if which == "authenticated":
        ctx.fields(msg.authenticated, ipath, _AUTHENTICATED)
        name: StringMatcher | None = None
        if msg.authenticated.HasField("principal_name"):
            name = _string_matcher(ctx, msg.authenticated, "principal_name", ipath)
        return IdAuthenticated(name)
    if which == "header":
        if network:
            ctx.error(ipath, _NO_HEADERS_IN_NETWORK)
        return IdHeader(common.header_matcher(ctx, msg.header, ipath))
    if which == "source_ip":
        return IdSourceIp(cidr_range(ctx, msg.source_ip, ipath))
    if which == "direct_remote_ip":
        return IdDirectRemoteIp(cidr_range(ctx, msg.direct_remote_ip, ipath))
    if which == "remote_ip":
        return IdRemoteIp(cidr_range(ctx, msg.remote_ip, ipath))
    return IdNot(IdAny())


def cidr_range(ctx: Ctx, msg: Any, path: str) -> Cidr:
    """envoy.config.core.v3.CidrRange (the prefix must be an IP address, as Envoy requires)."""
    ctx.fields(msg, path, _CIDR)
    length = msg.prefix_len.value if msg.HasField("prefix_len") else 0
    try:
        return make_cidr(msg.address_prefix, length)
    except ValueError:
        if msg.address_prefix:  # empty: reported by the constraint check
            ctx.error(join(path, "address_prefix"), f"malformed IP address: {msg.address_prefix!r}")
        return make_cidr("0.0.0.0", 32)


def _check_any(ctx: Ctx, value: bool, path: str) -> None:
    # Envoy's constraint (bool const: true), which the generic rule check does not cover.
    if not value:
        ctx.error(path, "must be true")


def _string_matcher(ctx: Ctx, msg: Any, name: str, path: str) -> StringMatcher:
    spath = join(path, name)
    matcher = common.string_matcher(ctx, getattr(msg, name), spath)
    if matcher is None:  # reported already; a matcher nothing passes
        return StringMatcher(StringMatchKind.EXACT, "\x00never")
    return matcher
