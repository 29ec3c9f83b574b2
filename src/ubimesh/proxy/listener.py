"""Listeners: bind, accept, pick a filter chain, hand the connection to its terminal filter.

A ``ListenerRuntime`` owns one listening socket and the per-filter-chain runtimes built from
the current snapshot. When a listener has one filter chain and needs no TLS inspection (the
common case), accepted connections go straight to the chain's terminal filter. Otherwise a
short-lived ``ChainSelector`` protocol peeks at the first bytes (tls_inspector: SNI and ALPN,
bounded in size and time), selects the chain and hands the transport over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ubimesh.proto.client_hello import MAX_CLIENT_HELLO, parse_client_hello
from ubimesh.proxy.access_log.logger import (
    AccessLogs,
    build_access_logs,
    connection_entry,
    log_connection,
)
from ubimesh.proxy.chain_match import select_filter_chain
from ubimesh.proxy.http.rbac import NetworkRbac
from ubimesh.proxy.network.hcm_config import HcmRuntime
from ubimesh.proxy.network.http_manager import HttpConnection
from ubimesh.proxy.snapshot.types import (
    FilterChain,
    HttpConnectionManagerConfig,
    Listener,
    NetworkRbacConfig,
    RouteConfiguration,
    SocketAddress,
    TcpProxyConfig,
)
from ubimesh.telemetry.stats import Store

if TYPE_CHECKING:
    from ubimesh.proxy.tls.downstream import TlsStats
    from ubimesh.proxy.tls.manager import TlsEndpoint
    from ubimesh.proxy.upstream.cluster_manager import ClusterManager

log = logging.getLogger("ubimesh.listener")

#: How long tls_inspector waits for a ClientHello (Envoy's listener_filters_timeout default).
INSPECT_TIMEOUT = 15.0


class ChainRuntime:
    """One filter chain's compiled form: a factory of per-connection protocols, and its TLS
    endpoint when the chain has a DownstreamTlsContext."""

    def __init__(
        self,
        chain: FilterChain,
        clusters: ClusterManager,
        stats: Store,
        buffer_limit: int,
        tls_stats_prefix: str = "",
        listener: str = "",
        denial_header: str = "internal",
        listener_logs: AccessLogs | None = None,
    ) -> None:
        self.chain = chain
        self.hcm: HcmRuntime | None = None
        self.tls: TlsEndpoint | None = None
        self.tls_stats: TlsStats | None = None
        if chain.transport_socket is not None:
            from ubimesh.proxy.tls.downstream import TlsStats

            self.tls = clusters.tls.endpoint(chain.transport_socket)
            self.tls_stats = TlsStats(stats.counter, tls_stats_prefix)
        terminal = chain.filters[-1]
        # The filters before the terminal one are RBAC network filters.
        rbac_filters = [
            (f.stat_prefix, f.rbac) for f in chain.filters[:-1] if isinstance(f, NetworkRbacConfig)
        ]
        gate = NetworkRbac(rbac_filters, stats, listener, listener_logs) if rbac_filters else None
        self.factory: Callable[[], asyncio.Protocol]
        if isinstance(terminal, HttpConnectionManagerConfig):
            hcm = self.hcm = HcmRuntime(
                terminal,
                clusters,
                stats,
                listener=listener,
                denial_header=denial_header,
                network_rbac=gate,
            )
            self.factory = lambda: HttpConnection(hcm, buffer_limit)
        elif isinstance(terminal, TcpProxyConfig):
            # Loaded only for listeners that proxy TCP (it is half a megabyte resident).
            from ubimesh.proxy.network.tcp_proxy import TcpProxyProtocol

            tcp_logs = build_access_logs(terminal.access_log, stats)
            self.factory = lambda: TcpProxyProtocol(
                terminal, clusters, stats, buffer_limit, network_rbac=gate, access_logs=tcp_logs
            )
        else:  # pragma: no cover - the translator only produces the two terminal kinds
            raise AssertionError(f"unsupported terminal filter {terminal!r}")

    def take_routes(self, chain: FilterChain) -> None:
        """Serve ``chain``, which differs from the current one in route configuration only."""
        self.chain = chain
        if self.hcm is not None:
            terminal = chain.filters[-1]
            assert isinstance(terminal, HttpConnectionManagerConfig)
            self.hcm.take_routes(terminal)

    def drain(self, idle_grace: float = 0.0) -> None:
        if self.hcm is not None:
            for conn in list(self.hcm.connections):
                conn.start_drain(idle_grace)


class ChainSelector(asyncio.Protocol):
    """Reads just enough of a new connection to choose its filter chain."""

    def __init__(self, listener: ListenerRuntime) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self.listener.spec.needs_tls_inspector:
            self._dispatch("", "raw_buffer", ())
            return
        self.timer = asyncio.get_running_loop().call_later(INSPECT_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        info = parse_client_hello(self.buffer)
        if info.need_more and len(self.buffer) < MAX_CLIENT_HELLO:
            return
        if self.timer is not None:
            self.timer.cancel()
        self._dispatch(info.server_name, "tls" if info.is_tls else "raw_buffer", info.alpn)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _timeout(self) -> None:
        self.timer = None
        self.listener.stats_inspect_timeout.value += 1
        self._dispatch("", "raw_buffer", ())

    @staticmethod
    def _log_no_chain(logs: AccessLogs, transport: asyncio.Transport, sni: str) -> None:
        """Envoy's listener access log entry for a connection no filter chain matched."""
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        entry = connection_entry(
            (peer[0], peer[1]) if peer else ("", 0),
            (sockname[0], sockname[1]) if sockname else ("", 0),
            None,
            sni=sni,
            flags="NR",
            details="filter_chain_not_found",
        )
        log_connection(logs, entry)

    def _dispatch(self, sni: str, transport_protocol: str, alpn: tuple[str, ...]) -> None:
        transport = self.transport
        assert transport is not None
        sockname = transport.get_extra_info("sockname")
        port = sockname[1] if sockname else 0
        runtime = self.listener.select(port, sni, transport_protocol, alpn)
        if runtime is None:
            self.listener.stats_no_chain.value += 1
            logs = self.listener.access_logs
            if logs is not None:
                self._log_no_chain(logs, transport, sni)
            transport.abort()
            return
        proto = runtime.factory()
        if sni and hasattr(proto, "sni"):
            proto.sni = sni
        if runtime.tls is not None:
            from ubimesh.proxy.tls.downstream import start_server_tls

            assert runtime.tls_stats is not None
            data, self.buffer = self.buffer, b""
            start_server_tls(
                transport,
                proto,
                runtime.tls,
                data,
                runtime.chain.transport_socket_connect_timeout,
                runtime.tls_stats,
            )
            return
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.buffer:
            data, self.buffer = self.buffer, b""
            proto.data_received(data)


class ListenerRuntime:
    """A bound listener and the chains of the snapshot it currently serves."""

    def __init__(self, spec: Listener, clusters: ClusterManager, stats: Store) -> None:
        self.spec = spec
        self.stats = stats
        self.clusters = clusters
        self.server: asyncio.AbstractServer | None = None
        self.sock: socket.socket | None = None
        # Envoy spells the address in stat names with "_" for ":" (127.0.0.1_8080, [__1]_80).
        prefix = f"listener.{str(spec.address).replace(':', '_')}."
        self.stats_no_chain = stats.counter(prefix + "no_filter_chain_match")
        self.stats_inspect_timeout = stats.counter(prefix + "downstream_pre_cx_timeout")
        self._build(spec)

    def _build(self, spec: Listener) -> None:
        limit = spec.per_connection_buffer_limit_bytes
        prefix = f"listener.{str(spec.address).replace(':', '_')}."
        self.access_logs = build_access_logs(spec.access_log, self.stats)
        logs = self.access_logs

        def chain_runtime(c: FilterChain) -> ChainRuntime:
            return ChainRuntime(
                c,
                self.clusters,
                self.stats,
                limit,
                prefix,
                listener=spec.name,
                denial_header=spec.rbac_denial_header,
                listener_logs=logs,
            )

        self.chains = [chain_runtime(c) for c in spec.filter_chains]
        self.default_chain = (
            chain_runtime(spec.default_filter_chain)
            if spec.default_filter_chain is not None
            else None
        )
        self._index_chains()
        direct = (
            len(self.chains) == 1
            and not spec.needs_tls_inspector
            and self.chains[0].chain.match.destination_port is None
            and not self.chains[0].chain.match.server_names
            and self.chains[0].chain.match.transport_protocol in ("", "raw_buffer")
            and not self.chains[0].chain.match.application_protocols
            and self.chains[0].tls is None
        )
        self.protocol_factory: Callable[[], asyncio.Protocol] = (
            self.chains[0].factory if direct else (lambda: ChainSelector(self))
        )

    def _index_chains(self) -> None:
        self._by_chain = {id(c.chain): c for c in self.chains}
        if self.default_chain is not None:
            self._by_chain[id(self.default_chain.chain)] = self.default_chain

    def select(
        self, port: int, sni: str, transport_protocol: str, alpn: tuple[str, ...]
    ) -> ChainRuntime | None:
        chain = select_filter_chain(self.spec, port, sni, transport_protocol, alpn)
        return None if chain is None else self._by_chain.get(id(chain))

    @staticmethod
    def bind_socket(addr: SocketAddress, reuse_port: bool) -> socket.socket:
        """A bound, listening, non-blocking socket (port 0 gets a free port)."""
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((addr.host, addr.port))
            sock.listen(4096)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from exc
        sock.setblocking(False)
        return sock

    def bind(self, reuse_port: bool) -> socket.socket:
        self.sock = self.bind_socket(self.spec.address, reuse_port)
        return self.sock

    @property
    def bound_port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    async def start(self, sock: socket.socket | None = None) -> None:
        if sock is not None:
            self.sock = sock
        sock = self.sock if self.sock is not None else self.bind(reuse_port=False)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self.protocol_factory(), sock=sock, backlog=4096
        )

    def update(self, spec: Listener) -> None:
        """Serve a new snapshot's version of this listener (same address).

        - Nothing of the listener changed (an update of clusters or endpoints only): nothing
          happens here; the cluster manager has already taken the change.
        - Only route configurations changed (what an RDS update is): the chains stay and take
          the new routes, so open connections route their next request with them, as Envoy
          applies RDS without draining.
        - Anything else: new chains serve new connections; connections made under the old
          chains drain (they close after their current response).
        """
        if spec == self.spec:
            return
        old = [*self.chains, *([self.default_chain] if self.default_chain else [])]
        if _routes_only_differ(self.spec, spec):
            default = [spec.default_filter_chain] if spec.default_filter_chain else []
            for runtime, chain in zip(old, [*spec.filter_chains, *default], strict=True):
                runtime.take_routes(chain)
            self.spec = spec
            self._index_chains()
            return
        self.spec = spec
        self._build(spec)
        for c in old:
            c.drain(c.hcm.config.drain_timeout if c.hcm is not None else 0.0)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def drain(self) -> None:
        for c in [*self.chains, *([self.default_chain] if self.default_chain else [])]:
            c.drain()

    def active_connections(self) -> int:
        n = 0
        for c in [*self.chains, *([self.default_chain] if self.default_chain else [])]:
            if c.hcm is not None:
                n += len(c.hcm.connections)
        return n


def _without_routes(chain: FilterChain | None) -> FilterChain | None:
    if chain is None:
        return None
    terminal = chain.filters[-1]
    if not isinstance(terminal, HttpConnectionManagerConfig):
        return chain
    bare = dataclasses.replace(terminal, route_config=_NO_ROUTES)
    return dataclasses.replace(chain, filters=(*chain.filters[:-1], bare))


def _routes_only_differ(old: Listener, new: Listener) -> bool:
    """Whether ``new`` is ``old`` with other route configurations and nothing else changed."""
    if len(old.filter_chains) != len(new.filter_chains) or (
        (old.default_filter_chain is None) != (new.default_filter_chain is None)
    ):
        return False
    if dataclasses.replace(old, filter_chains=(), default_filter_chain=None) != (
        dataclasses.replace(new, filter_chains=(), default_filter_chain=None)
    ):
        return False
    pairs = [*zip(old.filter_chains, new.filter_chains, strict=True),
             (old.default_filter_chain, new.default_filter_chain)]
    return all(_without_routes(a) == _without_routes(b) for a, b in pairs)


#: Stands in for every route configuration when chains are compared without their routes.
_NO_ROUTES = RouteConfiguration(name="", virtual_hosts=())
