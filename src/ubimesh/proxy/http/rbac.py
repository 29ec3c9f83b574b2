"""The RBAC filters at run time: ``envoy.filters.http.rbac`` (per request) and
``envoy.filters.network.rbac`` (per connection), around the engine ``ubimesh.policy.rbac``.

HTTP (``HttpRbac.allow``, called by the stream after the HCM's request rules, so after path
normalization, and before the router): the filters run in the order of ``http_filters``. Each
evaluates its shadow rules (counted, never enforced), then its rules; the first denial answers
403 ``RBAC: access denied`` (flag RBAC, details ``rbac_access_denied_matched_policy[<name>]``
or ``[none]``) and the upstream sees nothing. What depends on the connection alone (the
peer's names, addresses, destination port) is decided once per connection
(``policy.rbac.for_connection``), so a request usually evaluates a handful of policies or none;
and a connection keeps its last decisions by what the rules read of a request, so a keep-alive
connection that repeats a request evaluates it once.

Network (``NetworkRbac.admit``, called by the terminal filter's protocol when the connection is
handed to it): the decision is taken at once, before the HCM or the TCP proxy sees a byte. A
denied connection is aborted. Envoy decides at the first byte (its TCP proxy has already
connected upstream by then); deciding at accept denies the same connections, earlier.

Stats, Envoy's names: ``http.<hcm prefix>.rbac.<rules_stat_prefix>{allowed,denied}`` and
``http.<hcm prefix>.rbac.<shadow_rules_stat_prefix>{shadow_allowed,shadow_denied}``; the
network filter's under ``<stat_prefix>.rbac.``. ubimesh adds the deciding policy of each
denial, ``...rbac.<rules_stat_prefix>policy.<policy or none>.denied`` (characters outside
``[A-Za-z0-9_-]`` become ``_``), which Envoy's default tag extractor
(``envoy.rbac_policy_name``) turns into a label; with ``track_per_rule_stats`` the allowed and
shadow decisions are counted per policy too, as Envoy does.

Why, for people: every denial is logged on ``ubimesh.rbac`` (WARNING, at most 20 lines a second
per process, then a line with the number left out), and an HTTP denial carries
``x-ubimesh-denied-by: <policy>|none`` when the listener's ``denial_header`` mode allows it
("internal": callers whose client certificate was verified as a SPIFFE SVID).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ubimesh.policy.rbac import (
    Decision,
    HeaderLookup,
    RbacConfig,
    RbacInput,
    RbacRules,
    constant_decision,
    evaluate,
    for_connection,
    ip_value,
    no_headers,
    request_reads,
)
from ubimesh.proxy.access_log.logger import AccessLogs, connection_entry, log_connection
from ubimesh.telemetry.stats import Counter, Store

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection
    from ubimesh.proxy.tls.peer import PeerInfo

log = logging.getLogger("ubimesh.rbac")

DENIED_BODY = b"RBAC: access denied"
DENIED_BY_HEADER = "x-ubimesh-denied-by"
#: Envoy's RBAC filter sets no response flag on a denial, only the response code details
#: (``stream.details``); ``ubimesh.proxy.response_flags`` has no RBAC flag either.
RBAC_FLAG = ""
#: Listener ``denial_header`` modes.
HEADER_INTERNAL = "internal"
HEADER_ALWAYS = "always"
HEADER_NEVER = "never"

_STAT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def policy_stat_name(policy: str) -> str:
    """The policy's name as it appears in a stat name ("none" for no policy)."""
    return _STAT_UNSAFE.sub("_", policy) if policy else "none"


# ---------------------------------------------------------------------------------------------
# Denial log


class DenialLog:
    """The ``ubimesh.rbac`` WARNING lines: at most ``limit`` a second; the number of lines left
    out is logged when the second is over."""

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self.window = 0.0
        self.count = 0
        self.suppressed = 0
        self.flush_armed = False

    def denied(
        self,
        listener: str,
        source: str,
        principal: str,
        method: str,
        authority: str,
        path: str,
        port: int,
        policy: str,
    ) -> None:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.flush()
            self.window = now
        if self.count >= self.limit:
            self.suppressed += 1
            if not self.flush_armed:
                self._arm_flush(self.window + 1.0 - now)
            return
        self.count += 1
        log.warning(
            "RBAC denied: listener=%s source=%s principal=%s method=%s authority=%s path=%s "
            "destination_port=%d policy=%s",
            listener,
            source,
            principal,
            method,
            authority,
            path,
            port,
            policy or "none",
        )

    def flush(self) -> None:
        """Report the lines left out in the current second, and start a new one."""
        if self.suppressed:
            log.warning(
                "RBAC denied: %d more denials in one second were not logged", self.suppressed
            )
        self.count = 0
        self.suppressed = 0

    def _arm_flush(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tool): reported with the next denial
        self.flush_armed = True
        loop.call_later(max(delay, 0.0), self._flushed, self.window)

    def _flushed(self, window: float) -> None:
        # The loop's timers are not exact to the microsecond: the second the timer was armed
        # for is over when it fires, whatever the clock says.
        self.flush_armed = False
        if self.window == window:
            self.flush()
            self.window = time.monotonic()
        elif self.suppressed:
            self._arm_flush(self.window + 1.0 - time.monotonic())


#: One per process: the limit is for the process's log, whatever the listener.
DENIALS = DenialLog()


# ---------------------------------------------------------------------------------------------
# One configured filter


class RbacStats:
    """The counters of one RBAC filter (``prefix`` ends with "rbac.")."""

    __slots__ = (
        "allowed",
        "denied",
        "policy_counters",
        "rules_prefix",
        "shadow_allowed",
        "shadow_denied",
        "shadow_prefix",
        "store",
    )

    def __init__(self, store: Store, prefix: str, config: RbacConfig) -> None:
        self.store = store
        self.rules_prefix = rules = prefix + config.rules_stat_prefix
        self.shadow_prefix = shadow = prefix + config.shadow_rules_stat_prefix
        self.allowed = store.counter(rules + "allowed")
        self.denied = store.counter(rules + "denied")
        self.shadow_allowed = store.counter(shadow + "shadow_allowed")
        self.shadow_denied = store.counter(shadow + "shadow_denied")
        self.policy_counters: dict[tuple[str, str], Counter] = {}

    def policy(self, policy: str, outcome: str) -> Counter:
        """``...rbac.<prefix>policy.<policy>.<outcome>`` (outcome: allowed, denied,
        shadow_allowed, shadow_denied)."""
        key = (policy, outcome)
        counter = self.policy_counters.get(key)
        if counter is None:
            prefix = self.shadow_prefix if outcome.startswith("shadow") else self.rules_prefix
            name = f"{prefix}policy.{policy_stat_name(policy)}.{outcome}"
            counter = self.policy_counters[key] = self.store.counter(name)
        return counter


class RbacFilter:
    """One RBAC filter's configuration and stats."""

    __slots__ = ("config", "per_rule", "remote_ip", "rules", "shadow_rules", "stats")

    def __init__(self, config: RbacConfig, store: Store, prefix: str) -> None:
        self.config = config
        self.rules = config.rules
        self.shadow_rules = config.shadow_rules
        self.per_rule = config.track_per_rule_stats
        self.stats = RbacStats(store, prefix, config)
        self.remote_ip = any(
            r is not None and request_reads(r).remote_ip for r in (self.rules, self.shadow_rules)
        )
        """Whether a policy looks at the remote address after x-forwarded-for."""

    def connection(self, conn: RbacInput) -> RbacCut:
        """This filter's rules cut for one connection."""
        return RbacCut(_cut(self.rules, conn), _cut(self.shadow_rules, conn))

    def count_shadow(self, decision: Decision) -> None:
        stats = self.stats
        if decision.allowed:
            stats.shadow_allowed.value += 1
            if self.per_rule and decision.policy:
                stats.policy(decision.policy, "shadow_allowed").value += 1
        else:
            stats.shadow_denied.value += 1
            if self.per_rule and decision.policy:
                stats.policy(decision.policy, "shadow_denied").value += 1

    def count(self, decision: Decision) -> None:
        stats = self.stats
        if decision.allowed:
            stats.allowed.value += 1
            if self.per_rule and decision.policy:
                stats.policy(decision.policy, "allowed").value += 1
        else:
            stats.denied.value += 1
            stats.policy(decision.policy, "denied").value += 1


#: Decisions kept per connection and rule set; past that many the memo starts over.
MEMO_SIZE = 32


class CutRules:
    """Rules cut for a connection; their decision when no request can change it; otherwise
    the decisions of the connection's recent requests, by what the rules read of a request
    (``policy.rbac.request_reads``): a keep-alive connection mostly repeats a few requests."""

    __slots__ = ("constant", "memo", "reads", "rules")

    def __init__(self, rules: RbacRules) -> None:
        self.rules = rules
        self.constant: Decision | None = constant_decision(rules)
        self.reads = request_reads(rules)
        self.memo: dict[tuple[object, ...], Decision] = {}

    def decide(self, request: RbacInput, headers: HeaderLookup) -> Decision:
        """``evaluate(self.rules, request)``, remembered by the request's inputs."""
        constant = self.constant
        if constant is not None:
            return constant
        reads = self.reads
        parts: list[object] = [request.path if reads.path else ""]
        for name in reads.header_names:
            parts.append(tuple(headers.lookup(name)))
        if reads.remote_ip:
            parts.append(request.remote_ip)
        key = tuple(parts)
        memo = self.memo
        found = memo.get(key)
        if found is not None:
            return found
        decision = evaluate(self.rules, request)
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[key] = decision
        return decision


class RbacCut:
    """One filter's enforced and shadow rules cut for one connection (None: not configured)."""

    __slots__ = ("rules", "shadow")

    def __init__(self, rules: CutRules | None, shadow: CutRules | None) -> None:
        self.rules = rules
        self.shadow = shadow


class RbacConnection:
    """What the HTTP RBAC filters keep per downstream connection."""

    __slots__ = ("cuts", "headers", "request")

    def __init__(self, cuts: list[RbacCut], request: RbacInput, headers: _RequestHeaders) -> None:
        self.cuts = cuts
        self.request = request
        self.headers = headers


def _cut(rules: RbacRules | None, conn: RbacInput) -> CutRules | None:
    return None if rules is None else CutRules(for_connection(rules, conn))


# ---------------------------------------------------------------------------------------------
# What a connection is


def peer_principals(tls: PeerInfo | None) -> tuple[str, ...]:
    """The engine's ``principals`` of a connection: () for plaintext, the peer's URI SANs, DNS
    SANs and subject on TLS (only the empty subject when it sent no certificate)."""
    if tls is None:
        return ()
    if not tls.presented:
        return ("",)
    return (*tls.uri_sans, *tls.dns_sans, tls.subject)


def peer_name(tls: PeerInfo | None) -> str:
    """Who the peer is, for the log: its SPIFFE ID, else its first name, else "-"."""
    if tls is None or not tls.presented:
        return "-"
    if tls.spiffe_id:
        return tls.spiffe_id
    for name in (*tls.uri_sans, *tls.dns_sans, tls.subject):
        if name:
            return name
    return "-"


def connection_input(
    remote: tuple[str, int], local: tuple[str, int], tls: PeerInfo | None
) -> RbacInput:
    """What the network filter sees (and what the HTTP filter decides once per connection)."""
    return RbacInput(
        method="",
        path="",
        headers=no_headers,
        destination_ip=local[0],
        destination_port=local[1],
        direct_remote_ip=remote[0],
        remote_ip=remote[0],
        principals=peer_principals(tls),
    )


def last_xff_address(xff: str | None, skip: int) -> str | None:
    """Envoy's ``Utility::getLastAddressFromXFF``: the address ``skip`` entries from the end of
    x-forwarded-for, when it is a valid IP (else None)."""
    if xff is None:
        return None
    text = xff
    for _ in range(skip):
        comma = text.rfind(",")
        if comma < 0:
            return None
        text = text[:comma]
    comma = text.rfind(",")
    if comma >= 0 and comma + 1 < len(text):
        text = text[comma + 1 :]
    text = text.strip(" \t")
    return text if ip_value(text)[0] else None


def _path_only(path: str) -> str:
    """The path without query and fragment (``routing.text.path_only``, here so that it is
    compiled with the request path)."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    h = path.find("#")
    return path if h < 0 else path[:h]


def _source(remote: tuple[str, int]) -> str:
    host, port = remote
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# The HTTP filters of one HTTP connection manager


class _RequestHeaders(HeaderLookup):
    """The engine's header lookup for the current request of a connection: pseudo-headers from
    the request line, the others from the headers as the HCM left them (Envoy's inline headers
    already folded). The last answer is kept: policies often ask for the same header one after
    another."""

    def __init__(self, scheme: str) -> None:
        self.stream: ActiveStream | None = None
        self.scheme = scheme
        self.last_name = ""
        self.last_values: list[str] = []

    def lookup(self, name: str) -> list[str]:
        if name == self.last_name:
            return self.last_values
        stream = self.stream
        if stream is None:
            return []
        values: list[str]
        if name == "host" or name[:1] == ":":
            if name == ":method":
                values = [stream.method]
            elif name == ":path":
                values = [stream.path]
            elif name in (":authority", "host"):
                values = [stream.host_header] if stream.host_header else []
            elif name == ":scheme":
                values = [self.scheme]
            else:
                values = []
        else:
            values = stream.headers.get_all(name)
        self.last_name = name
        self.last_values = values
        return values


class HttpRbac:
    """The RBAC filters of one HTTP connection manager, in ``http_filters`` order."""

    __slots__ = (
        "denial_header",
        "filters",
        "listener",
        "remote_ip",
        "skip_xff",
        "use_remote_address",
        "xff_hops",
    )

    def __init__(
        self,
        configs: Sequence[RbacConfig],
        store: Store,
        stat_prefix: str,
        *,
        listener: str,
        denial_header: str,
        use_remote_address: bool,
        xff_num_trusted_hops: int,
        skip_xff_append: bool,
    ) -> None:
        prefix = f"http.{stat_prefix}.rbac."
        self.filters = tuple(RbacFilter(c, store, prefix) for c in configs)
        self.listener = listener
        self.denial_header = denial_header
        self.remote_ip = any(f.remote_ip for f in self.filters)
        self.use_remote_address = use_remote_address
        self.xff_hops = xff_num_trusted_hops
        self.skip_xff = skip_xff_append

    def connection_state(self, conn: HttpConnection) -> RbacConnection:
        """What the filters keep for ``conn``: their rules cut for it, and the input object
        its requests reuse (made on its first request)."""
        state = conn.rbac
        if state is None:
            base = connection_input(conn.remote, conn.local, conn.tls)
            cuts = [f.connection(base) for f in self.filters]
            scheme = "http" if conn.tls is None else "https"
            state = conn.rbac = RbacConnection(cuts, base, _RequestHeaders(scheme))
            base.headers = state.headers
        return state

    def allow(
        self, stream: ActiveStream, conn: HttpConnection, first: int = 0, stop: int = -1
    ) -> bool:
        """Run the filters ``first`` to ``stop`` (exclusive; -1: to the end) for ``stream``;
        on a denial answer it (403) and return False. The request's fields are filled in only
        when a cut rule set needs them. (A slice is one RbacStage of a decoder filter chain.)"""
        state = self.connection_state(conn)
        request: RbacInput | None = None
        cuts = state.cuts
        filters = self.filters
        for i in range(first, len(filters) if stop < 0 else stop):
            flt = filters[i]
            cut = cuts[i]
            shadow = cut.shadow
            if shadow is not None:
                decision = shadow.constant
                if decision is None:
                    if request is None:
                        request = self.request_input(stream, conn, state)
                    decision = shadow.decide(request, state.headers)
                flt.count_shadow(decision)
            rules = cut.rules
            if rules is None:
                continue
            decision = rules.constant
            if decision is None:
                if request is None:
                    request = self.request_input(stream, conn, state)
                decision = rules.decide(request, state.headers)
            flt.count(decision)
            if not decision.allowed:
                state.headers.stream = None
                self.deny(stream, conn, decision.policy)
                return False
        state.headers.stream = None  # the stream is not kept alive past its decision
        return True

    def request_input(
        self, stream: ActiveStream, conn: HttpConnection, state: RbacConnection
    ) -> RbacInput:
        """The connection's input object with this request's fields (requests on a
        connection are decided one at a time)."""
        request = state.request
        headers = state.headers
        headers.stream = stream
        headers.last_name = ""
        request.method = stream.method
        request.path = _path_only(stream.path)
        if self.remote_ip:
            request.remote_ip = self.remote_address(stream, request.direct_remote_ip)
        return request

    def remote_address(self, stream: ActiveStream, direct: str) -> str:
        """Envoy's downstream remote address after x-forwarded-for, from the request as the
        HCM left it (x-forwarded-for already carries this hop's entry with use_remote_address,
        unless skip_xff_append)."""
        hops = self.xff_hops
        if self.use_remote_address:
            if hops == 0:
                return direct
            skip = hops - 1 if self.skip_xff else hops
        else:
            skip = hops
        found = last_xff_address(stream.headers.get("x-forwarded-for"), skip)
        return direct if found is None else found

    def deny(self, stream: ActiveStream, conn: HttpConnection, policy: str) -> None:
        name = policy or "none"
        tls = conn.tls
        DENIALS.denied(
            self.listener,
            _source(conn.remote),
            peer_name(tls),
            stream.method,
            stream.host_header,
            _path_only(stream.path),
            conn.local[1],
            policy,
        )
        mode = self.denial_header
        extra: list[tuple[str, str]] | None = None
        # "internal": a caller whose certificate was verified as an SVID of the trust bundle
        # (the TLS gate sets spiffe_id only then).
        if mode == HEADER_ALWAYS or (
            mode == HEADER_INTERNAL and tls is not None and tls.spiffe_id != ""
        ):
            extra = [(DENIED_BY_HEADER, _HEADER_UNSAFE.sub("_", name))]
        stream.details = f"rbac_access_denied_matched_policy[{name}]"
        stream.send_local_reply(403, DENIED_BODY, RBAC_FLAG, extra=extra)


# ---------------------------------------------------------------------------------------------
# The network filters of one filter chain


class NetworkRbac:
    """The RBAC network filters of one filter chain, in order."""

    __slots__ = ("access_logs", "filters", "listener")

    def __init__(
        self,
        configs: Sequence[tuple[str, RbacConfig]],
        store: Store,
        listener: str,
        access_logs: AccessLogs | None = None,
    ) -> None:
        self.filters = tuple(
            RbacFilter(config, store, _stat_prefix_join(prefix) + "rbac.")
            for prefix, config in configs
        )
        self.listener = listener
        self.access_logs = access_logs
        """The listener's access logs, which get every denial (as Envoy's listener log)."""

    def admit(
        self,
        remote: tuple[str, int],
        local: tuple[str, int],
        tls: PeerInfo | None,
        sni: str = "",
    ) -> bool:
        """Whether the connection may go on to the next filter; a denial is counted and
        logged, on ``ubimesh.rbac`` and in the listener's access logs with Envoy's
        %CONNECTION_TERMINATION_DETAILS% (the caller closes the connection)."""
        conn = connection_input(remote, local, tls)
        for flt in self.filters:
            if flt.shadow_rules is not None:
                flt.count_shadow(evaluate(flt.shadow_rules, conn))
            if flt.rules is None:
                continue
            decision = evaluate(flt.rules, conn)
            flt.count(decision)
            if not decision.allowed:
                DENIALS.denied(
                    self.listener, _source(remote), peer_name(tls), "-", "-", "-", local[1],
                    decision.policy,
                )  # fmt: skip
                logs = self.access_logs
                if logs is not None:
                    policy = decision.policy or "none"
                    entry = connection_entry(
                        remote,
                        local,
                        tls,
                        sni=sni,
                        termination_details=f"rbac_access_denied_matched_policy[{policy}]",
                    )
                    log_connection(logs, entry)
                return False
        return True


def _stat_prefix_join(prefix: str) -> str:
    """Envoy's statPrefixJoin: a "." between the prefix and what follows, unless it has one."""
    return prefix if prefix.endswith(".") else prefix + "."
