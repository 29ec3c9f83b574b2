"""Filter chain selection with Envoy's precedence (envoy.config.listener.v3.FilterChainMatch).

Criteria are applied in Envoy's order; at each step the most specific candidates win and the
rest are dropped: destination port (exact beats unset), server name (exact beats the longest
``*.suffix`` wildcard, which beats unset), transport protocol, application protocols. When no
chain survives, the listener's default filter chain is used (or the connection is closed).
"""

from __future__ import annotations

from ubimesh.proxy.snapshot.types import FilterChain, Listener


def _server_name_rank(names: tuple[str, ...], sni: str) -> int:
    """How well ``names`` match ``sni``: 0 no match, 1 unset (any), 2+ wildcard by length,
    a large number for exact."""
    if not names:
        return 1
    if not sni:
        return 0
    best = 0
    for n in names:
        if n == sni:
            return 1 << 20
        if (n.startswith("*.") and sni.endswith(n[1:]) and len(sni) > len(n) - 1) or (
            n.startswith(".") and sni.endswith(n)
        ):
            best = max(best, 2 + len(n))
    return best


def select_filter_chain(
    listener: Listener,
    destination_port: int,
    server_name: str = "",
    transport_protocol: str = "raw_buffer",
    alpn: tuple[str, ...] = (),
) -> FilterChain | None:
    chains = list(listener.filter_chains)
    exact = [c for c in chains if c.match.destination_port == destination_port]
    chains = exact or [c for c in chains if c.match.destination_port is None]
    if chains:
        ranked = [(c, _server_name_rank(c.match.server_names, server_name)) for c in chains]
        top = max(r for _, r in ranked)
        chains = [c for c, r in ranked if r == top and r > 0]
    if chains:
        exact_tp = [c for c in chains if c.match.transport_protocol == transport_protocol]
        chains = exact_tp or [c for c in chains if not c.match.transport_protocol]
    if chains:
        # The client's preference order decides (Envoy's
        # findFilterChainForApplicationProtocols): the first protocol it offers that some
        # chain lists selects those chains.
        with_alpn: list[FilterChain] = []
        for proto in alpn:
            with_alpn = [c for c in chains if proto in c.match.application_protocols]
            if with_alpn:
                break
        chains = with_alpn or [c for c in chains if not c.match.application_protocols]
    if chains:
        return chains[0]
    return listener.default_filter_chain
