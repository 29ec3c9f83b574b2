"""envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
(``envoy.filters.http.local_ratelimit``) translation, as an HTTP filter and as a route's or
virtual host's ``typed_per_filter_config``.

Supported: stat_prefix, token_bucket (fill_interval >= 50 ms, as Envoy requires), status,
filter_enabled / filter_enforced (their default_value alone; ubimesh has no runtime),
response_headers_to_add, request_headers_to_add_when_not_enforced,
local_rate_limit_per_downstream_connection, enable_x_ratelimit_headers (DRAFT_VERSION_03),
always_consume_default_token_bucket, descriptors (exact entries) and the filter's own
``rate_limits`` (actions request_headers, remote_address, generic_key, header_value_match).
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

from ubimesh.proxy.snapshot.types import (
    LocalRateLimitConfig,
    LocalRateLimitDescriptor,
    RateLimitAction,
    RateLimitActionKind,
    TokenBucketConfig,
)
from ubimesh.proxy.xds import common
from ubimesh.proxy.xds.context import Ctx, entry, item, join, seconds, wrapped

LOCAL_RATELIMIT_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"

_LRL = {
    "stat_prefix",
    "status",
    "token_bucket",
    "filter_enabled",
    "filter_enforced",
    "request_headers_to_add_when_not_enforced",
    "response_headers_to_add",
    "descriptors",
    "local_rate_limit_per_downstream_connection",
    "enable_x_ratelimit_headers",
    "always_consume_default_token_bucket",
    "rate_limits",
}
_LRL_HINTS = {
    "stage": "rate limit stages are not implemented; leave stage at 0",
    "local_cluster_rate_limit": "sharing a rate limit across the local cluster is not implemented",
    "vh_rate_limits": "route and virtual host rate_limits are not implemented; put the "
    "actions in the filter's own rate_limits",
    "rate_limited_as_resource_exhausted": "gRPC status mapping is not implemented",
    "max_dynamic_descriptors": "wildcard (dynamic) descriptors are not implemented",
}
_TOKEN_BUCKET = {"max_tokens", "tokens_per_fill", "fill_interval"}
_RUNTIME_FRACTION = {"default_value"}
_RUNTIME_FRACTION_HINTS = {"runtime_key": "ubimesh has no runtime; use default_value alone"}
_STATUS = {"code"}
_DESCRIPTOR = {"entries", "token_bucket"}
_ENTRY = {"key", "value"}
_RATE_LIMIT = {"actions"}
_RATE_LIMIT_HINTS = {
    "stage": "rate limit stages are not implemented",
    "disable_key": "disable keys need a runtime; ubimesh has none",
    "limit": "dynamic limit overrides are not implemented",
    "hits_addend": "hits addends are not implemented (each request takes one token)",
    "apply_on_stream_done": "rate limiting on stream done is not implemented",
}
_ACTION = {"request_headers", "remote_address", "generic_key", "header_value_match"}
_ACTION_HINT = (
    "this rate limit action is not implemented; use request_headers, remote_address, "
    "generic_key or header_value_match"
)
_REQUEST_HEADERS = {"header_name", "descriptor_key", "skip_if_absent"}
_GENERIC_KEY = {"descriptor_value", "descriptor_key"}
_HEADER_VALUE_MATCH = {"descriptor_key", "descriptor_value", "expect_match", "headers"}
_MIN_FILL_INTERVAL = 0.05


def local_ratelimit(ctx: Ctx, msg: Any, path: str) -> LocalRateLimitConfig:
    """LocalRateLimit at ``path`` (a filter's typed_config or a per-route entry)."""
    ctx.fields(msg, path, _LRL, _LRL_HINTS)
    if not msg.stat_prefix:
        ctx.error(join(path, "stat_prefix"), "is required")
    bucket = (
        token_bucket(ctx, msg.token_bucket, join(path, "token_bucket"))
        if msg.HasField("token_bucket")
        else None
    )
    status = 429
    if msg.HasField("status"):
        ctx.fields(msg.status, join(path, "status"), _STATUS)
        # Envoy: a code below 400 means the default, 429.
        status = msg.status.code if msg.status.code >= 400 else 429
    dpath = join(path, "descriptors")
    descriptors = tuple(_descriptor(ctx, d, item(dpath, i)) for i, d in enumerate(msg.descriptors))
    if descriptors and bucket is None:
        ctx.error(join(path, "token_bucket"), "is required when descriptors are set (Envoy)")
    rpath = join(path, "rate_limits")
    rate_limits = tuple(_rate_limit(ctx, r, item(rpath, i)) for i, r in enumerate(msg.rate_limits))
    return LocalRateLimitConfig(
        stat_prefix=msg.stat_prefix,
        token_bucket=bucket,
        enabled=_fraction(ctx, msg, "filter_enabled", path),
        enforced=_fraction(ctx, msg, "filter_enforced", path),
        status=status,
        response_headers_to_add=_options(ctx, msg.response_headers_to_add, path, "response"),
        request_headers_to_add_when_not_enforced=_options(
            ctx, msg.request_headers_to_add_when_not_enforced, path, "request"
        ),
        per_downstream_connection=msg.local_rate_limit_per_downstream_connection,
        # XRateLimitHeadersRFCVersion: OFF (0), DRAFT_VERSION_03 (1).
        x_ratelimit_headers=msg.enable_x_ratelimit_headers == 1,
        descriptors=descriptors,
        rate_limits=rate_limits,
        always_consume_default_token_bucket=wrapped(
            msg, "always_consume_default_token_bucket", True
        ),
    )


def token_bucket(ctx: Ctx, msg: Any, path: str) -> TokenBucketConfig:
    """envoy.type.v3.TokenBucket, with Envoy's local rate limit minimum fill interval."""
    ctx.fields(msg, path, _TOKEN_BUCKET)
    interval = seconds(msg.fill_interval)
    if msg.HasField("fill_interval") and interval < _MIN_FILL_INTERVAL:
        ctx.error(
            join(path, "fill_interval"),
            f"{interval * 1000:g} ms is below the 50 ms Envoy requires of a local rate limit",
        )
    return TokenBucketConfig(
        max_tokens=msg.max_tokens,
        tokens_per_fill=wrapped(msg, "tokens_per_fill", 1),
        fill_interval=max(interval, _MIN_FILL_INTERVAL),
    )


def _fraction(ctx: Ctx, msg: Any, name: str, path: str) -> tuple[int, int]:
    """A RuntimeFractionalPercent's default_value; an absent field is 0 % (Envoy)."""
    if not msg.HasField(name):
        return (0, 100)
    fpath = join(path, name)
    value = getattr(msg, name)
    ctx.fields(value, fpath, _RUNTIME_FRACTION, _RUNTIME_FRACTION_HINTS)
    return common.fractional_percent(ctx, value.default_value, join(fpath, "default_value"))


def _options(ctx: Ctx, options: Any, path: str, direction: str) -> tuple[Any, ...]:
    name = (
        "response_headers_to_add"
        if direction == "response"
        else "request_headers_to_add_when_not_enforced"
    )
    opath = join(path, name)
    return tuple(common.header_value_option(ctx, o, item(opath, i)) for i, o in enumerate(options))


def _descriptor(ctx: Ctx, msg: Any, path: str) -> LocalRateLimitDescriptor:
    ctx.fields(msg, path, _DESCRIPTOR)
    entries: list[tuple[str, str]] = []
    epath = join(path, "entries")
    for i, e in enumerate(msg.entries):
        ipath = item(epath, i)
        ctx.fields(e, ipath, _ENTRY)
        if not e.value:
            ctx.unsupported(
                join(ipath, "value"),
                "an empty value (a wildcard descriptor) is not implemented; give the value",
            )
        entries.append((e.key, e.value))
    bucket = token_bucket(ctx, msg.token_bucket, join(path, "token_bucket"))
    return LocalRateLimitDescriptor(tuple(entries), bucket)


def _rate_limit(ctx: Ctx, msg: Any, path: str) -> tuple[RateLimitAction, ...]:
    ctx.fields(msg, path, _RATE_LIMIT, _RATE_LIMIT_HINTS)
    apath = join(path, "actions")
    out: list[RateLimitAction] = []
    for i, a in enumerate(msg.actions):
        ipath = item(apath, i)
        ctx.fields(a, ipath, _ACTION, default_hint=_ACTION_HINT)
        which = a.WhichOneof("action_specifier")
        if which == "request_headers":
            rh = a.request_headers
            ctx.fields(rh, join(ipath, which), _REQUEST_HEADERS)
            out.append(
                RateLimitAction(
                    RateLimitActionKind.REQUEST_HEADERS,
                    rh.descriptor_key,
                    header_name=rh.header_name.lower(),
                    skip_if_absent=rh.skip_if_absent,
                )
            )
        elif which == "remote_address":
            out.append(RateLimitAction(RateLimitActionKind.REMOTE_ADDRESS, "remote_address"))
        elif which == "generic_key":
            gk = a.generic_key
            ctx.fields(gk, join(ipath, which), _GENERIC_KEY)
            out.append(
                RateLimitAction(
                    RateLimitActionKind.GENERIC_KEY,
                    gk.descriptor_key or "generic_key",
                    gk.descriptor_value,
                )
            )
        elif which == "header_value_match":
            hv = a.header_value_match
            hpath = join(ipath, which)
            ctx.fields(hv, hpath, _HEADER_VALUE_MATCH)
            mpath = join(hpath, "headers")
            out.append(
                RateLimitAction(
                    RateLimitActionKind.HEADER_VALUE_MATCH,
                    hv.descriptor_key or "header_match",
                    hv.descriptor_value,
                    headers=tuple(
                        common.header_matcher(ctx, h, item(mpath, j))
                        for j, h in enumerate(hv.headers)
                    ),
                    expect_match=wrapped(hv, "expect_match", True),
                )
            )
    return tuple(out)


def per_filter_configs(ctx: Ctx, configs: Any, path: str) -> tuple[tuple[str, Any], ...]:
    """A route's or virtual host's ``typed_per_filter_config`` map: LocalRateLimit entries are
    compiled (keyed by the HTTP filter name they override); any other type is refused."""
    out: list[tuple[str, Any]] = []
    for name in sorted(configs):
        epath = entry(path, name)
        any_msg = configs[name]
        type_name = any_msg.type_url.rsplit("/", 1)[-1]
        if type_name != LOCAL_RATELIMIT_TYPE:
            ctx.unsupported(
                epath,
                f"per-route configuration of type {type_name or '(none)'}; only "
                f"{LOCAL_RATELIMIT_TYPE} is implemented",
            )
            continue
        msg = local_rate_limit_pb2.LocalRateLimit()
        if not any_msg.Unpack(msg):  # pragma: no cover - the type was checked above
            ctx.error(epath, f"cannot unpack {type_name}")
            continue
        out.append((name, local_ratelimit(ctx, msg, epath)))
    return tuple(out)
