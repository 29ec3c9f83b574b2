"""The local rate limit filter at run time (``envoy.filters.http.local_ratelimit``), as
Envoy 1.40's.

Which config applies: the route's ``typed_per_filter_config`` entry for this filter's name, else
the virtual host's, else the filter's own. Each config object has its own buckets (shared by
every request it applies to, or per downstream connection with
``local_rate_limit_per_downstream_connection``) and its own stats. Buckets live in one
worker process: with ``--concurrency`` N each worker has its own (Envoy's threads share one).

Per request: nothing happens unless ``filter_enabled`` draws true; then ``enabled`` counts.
The request's descriptors (built from the config's ``rate_limits`` actions) select the
configured descriptors with the same entries; each matched descriptor bucket, from the slowest
fill rate up, must give a token, then (unless ``always_consume_default_token_bucket`` is false
and a descriptor matched) the default bucket. Allowed: ``ok``. Denied: ``rate_limited``; then
if ``filter_enforced`` draws true, ``enforced`` counts and the request is answered with the
status (429) and body ``local_rate_limited`` with ``response_headers_to_add`` (flag RL; Envoy
1.40 sends no x-envoy-ratelimited here); else the request goes on with
``request_headers_to_add_when_not_enforced``. With ``enable_x_ratelimit_headers``
(DRAFT_VERSION_03) every response of a limited-or-checked request carries ``x-ratelimit-limit``,
``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (seconds to the next fill) of the deciding
bucket.

Buckets refill from the loop clock when a request looks at them (whole fill intervals since the
last fill, capped at max_tokens): no timers, nothing per request beyond the arithmetic.

Stats, Envoy's names: ``<stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}``
(and ``shadow_mode``, always 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ubimesh.proto.headers import Headers
from ubimesh.proxy.http.fault import fires
from ubimesh.proxy.http.filter_chain import CONTINUE, STOP, DecoderFilter
from ubimesh.proxy.response_flags import RL
from ubimesh.proxy.routing.headers import HeaderRules

# The route table's compiled header matcher (Envoy's HeaderUtility::matchHeaders semantics).
from ubimesh.proxy.routing.table import _HeaderCheck
from ubimesh.proxy.snapshot.types import (
    LocalRateLimitConfig,
    RateLimitAction,
    RateLimitActionKind,
    TokenBucketConfig,
)
from ubimesh.telemetry.stats import Store

if TYPE_CHECKING:
    import asyncio

    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection

LIMITED_BODY = b"local_rate_limited"
LIMITED_DETAILS = "local_rate_limited"


class TokenBucket:
    """A token bucket refilled lazily: ``tokens_per_fill`` for every whole ``fill_interval``
    since the last fill, never above ``max_tokens``. It starts full."""

    __slots__ = ("interval", "last_fill", "max_tokens", "per_fill", "tokens")

    def __init__(self, config: TokenBucketConfig, now: float) -> None:
        self.max_tokens = config.max_tokens
        self.per_fill = config.tokens_per_fill
        self.interval = config.fill_interval
        self.tokens = config.max_tokens
        self.last_fill = now

    def refill(self, now: float) -> None:
        elapsed = now - self.last_fill
        if elapsed >= self.interval:
            fills = int(elapsed // self.interval)
            self.last_fill += fills * self.interval
            self.tokens = min(self.max_tokens, self.tokens + fills * self.per_fill)

    def consume(self, now: float) -> bool:
        """Take one token if there is one."""
        self.refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def reset_seconds(self, now: float) -> int:
        """Whole seconds (rounded up) until the next fill."""
        return max(0, math.ceil(self.last_fill + self.interval - now))

    def fill_rate(self) -> float:
        return self.per_fill / self.interval


class _Buckets:
    """One set of buckets of a limiter: the default one (None: never limits) and one per
    configured descriptor, by its entries."""

    __slots__ = ("by_entries", "default")

    def __init__(self, limiter: RateLimiter, now: float) -> None:
        config = limiter.config
        self.default = (
            TokenBucket(config.token_bucket, now) if config.token_bucket is not None else None
        )
        self.by_entries = {d.entries: TokenBucket(d.token_bucket, now) for d in config.descriptors}


class RateLimiter:
    """One LocalRateLimit config (the filter's, or a route's / virtual host's override)."""

    __slots__ = (
        "checks",
        "config",
        "enabled",
        "enabled_count",
        "enforced",
        "enforced_count",
        "ok",
        "per_connection",
        "rate_limited",
        "request_rules",
        "response_rules",
        "shared",
        "x_headers",
    )

    def __init__(self, config: LocalRateLimitConfig, store: Store, now: float) -> None:
        self.config = config
        p = f"{config.stat_prefix}.http_local_rate_limit."
        self.enabled_count = store.counter(p + "enabled")
        self.enforced_count = store.counter(p + "enforced")
        self.rate_limited = store.counter(p + "rate_limited")
        self.ok = store.counter(p + "ok")
        # Envoy 1.40 keeps a shadow_mode counter for a shadow mode ubimesh does not have
        # (not filter_enforced: that counts nothing there either); it stays 0, as Envoy's.
        store.counter(p + "shadow_mode")
        self.enabled = config.enabled
        self.enforced = config.enforced
        self.per_connection = config.per_downstream_connection
        self.shared: _Buckets | None = None if self.per_connection else _Buckets(self, now)
        self.x_headers = config.x_ratelimit_headers
        self.response_rules = HeaderRules(config.response_headers_to_add, ())
        self.request_rules = HeaderRules(config.request_headers_to_add_when_not_enforced, ())
        # header_value_match matchers, compiled once; keyed by the action's id (the config,
        # held here, keeps the action alive).
        self.checks: dict[int, tuple[_HeaderCheck, ...]] = {
            id(a): tuple(_HeaderCheck(h) for h in a.headers)
            for actions in config.rate_limits
            for a in actions
            if a.kind is RateLimitActionKind.HEADER_VALUE_MATCH
        }

    def buckets(self, conn: HttpConnection, now: float) -> _Buckets:
        shared = self.shared
        if shared is not None:
            return shared
        state = conn.filter_state
        if state is None:
            state = conn.filter_state = {}
        found = state.get(id(self))
        if found is None:
            found = _Buckets(self, now)
            # The connection keeps its buckets as long as it lives; the key is this limiter's
            # id, and the limiter outlives the connection's use of it (it is held by the HCM).
            state[id(self)] = found
        assert isinstance(found, _Buckets)
        return found


def _descriptor(
    limiter: RateLimiter,
    actions: tuple[RateLimitAction, ...],
    stream: ActiveStream,
    conn: HttpConnection,
) -> tuple[tuple[str, str], ...] | None:
    """The request descriptor one ``rate_limits`` entry builds, or None (an action produced
    nothing: Envoy then drops the whole descriptor)."""
    entries: list[tuple[str, str]] = []
    headers = stream.headers
    for a in actions:
        kind = a.kind
        if kind is RateLimitActionKind.GENERIC_KEY:
            entries.append((a.key, a.value))
        elif kind is RateLimitActionKind.REQUEST_HEADERS:
            value = headers.get(a.header_name)
            if value is None:
                if a.skip_if_absent:
                    continue
                return None
            entries.append((a.key, value))
        elif kind is RateLimitActionKind.REMOTE_ADDRESS:
            entries.append((a.key, conn.remote[0]))
        else:
            scheme = "http" if conn.tls is None else "https"
            matched = all(
                c.matches(headers, stream.method, stream.path, stream.host_header, scheme)
                for c in limiter.checks[id(a)]
            )
            if matched != a.expect_match:
                return None
            entries.append((a.key, a.value))
    return tuple(entries) if entries else None


class LocalRateLimitFilter(DecoderFilter):
    """One local rate limit filter of an HCM: its own limiter and the per-route overrides."""

    __slots__ = ("loop", "name", "overrides", "own", "store")

    def __init__(
        self, name: str, config: LocalRateLimitConfig, store: Store, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.name = name
        self.store = store
        self.loop = loop
        self.own = RateLimiter(config, store, loop.time())
        # Per-route configs by identity; each entry keeps its config alive, so an id is never
        # reused while it is cached.
        self.overrides: dict[int, tuple[LocalRateLimitConfig, RateLimiter]] = {}

    def _override(self, entries: Iterable[tuple[str, object]]) -> LocalRateLimitConfig | None:
        """This filter's entry in a route's or virtual host's typed_per_filter_config."""
        for name, value in entries:
            if name == self.name and isinstance(value, LocalRateLimitConfig):
                return value
        return None

    def limiter_for(self, stream: ActiveStream) -> RateLimiter:
        """The route's override, else the virtual host's, else the filter's own limiter."""
        config: LocalRateLimitConfig | None = None
        route = stream.route
        if route is not None:
            config = self._override(route.typed_per_filter_config)
            if config is None:
                vhost = stream.vhost
                if vhost is not None:
                    config = self._override(vhost.typed_per_filter_config)
        if config is None:
            return self.own
        found = self.overrides.get(id(config))
        if found is None:
            found = self.overrides[id(config)] = (
                config,
                RateLimiter(config, self.store, self.loop.time()),
            )
        return found[1]

    def routes_changed(self) -> None:
        # The overrides belong to the old routes: without this, every RDS update would add
        # limiters that are never freed. The new routes' buckets start full, as in Envoy.
        self.overrides.clear()

    def decode(self, stream: ActiveStream, conn: HttpConnection, index: int) -> int:
        limiter = self.limiter_for(stream)
        num, den = limiter.enabled
        if not fires(num, den):
            return CONTINUE
        limiter.enabled_count.value += 1
        now = self.loop.time()
        buckets = limiter.buckets(conn, now)
        matched: list[TokenBucket] = []
        if buckets.by_entries:
            for actions in limiter.config.rate_limits:
                entries = _descriptor(limiter, actions, stream, conn)
                if entries is not None:
                    bucket = buckets.by_entries.get(entries)
                    if bucket is not None and bucket not in matched:
                        matched.append(bucket)
            if len(matched) > 1:
                matched.sort(key=TokenBucket.fill_rate)
        allowed = True
        deciding: TokenBucket | None = None
        for bucket in matched:
            if not bucket.consume(now):
                allowed = False
                deciding = bucket
                break
        if allowed:
            if matched and not limiter.config.always_consume_default_token_bucket:
                deciding = matched[0]
            else:
                default = buckets.default
                if default is not None:
                    allowed = default.consume(now)
                deciding = matched[0] if matched else default
        extra: list[tuple[str, str]] | None = None
        if limiter.x_headers and deciding is not None:
            deciding.refill(now)
            extra = [
                ("x-ratelimit-limit", str(deciding.max_tokens)),
                ("x-ratelimit-remaining", str(max(0, deciding.tokens))),
                ("x-ratelimit-reset", str(deciding.reset_seconds(now))),
            ]
        if allowed:
            limiter.ok.value += 1
            if extra is not None:
                stream.response_extra = extra
            return CONTINUE
        limiter.rate_limited.value += 1
        num, den = limiter.enforced
        if not fires(num, den):
            if limiter.request_rules:
                ctx = stream.hcm.format_context(stream)
                ctx.request_headers = stream.headers
                limiter.request_rules.apply(stream.headers, ctx)
            if extra is not None:
                stream.response_extra = extra
            return CONTINUE
        limiter.enforced_count.value += 1
        reply = Headers(extra)
        if limiter.response_rules:
            ctx = stream.hcm.format_context(stream, reply)
            limiter.response_rules.apply(reply, ctx)
        stream.details = LIMITED_DETAILS
        stream.send_local_reply(limiter.config.status, LIMITED_BODY, RL, extra=reply.items)
        return STOP
