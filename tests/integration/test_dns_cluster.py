"""STRICT_DNS and LOGICAL_DNS clusters resolved through the system resolver."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from ubimesh.proxy.network.tcp_proxy import TcpProxyProtocol
from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    DnsLookupFamily,
    Endpoint,
    LbPolicy,
    Locality,
    LocalityEndpoints,
    SocketAddress,
    TcpProxyConfig,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.upstream.dns import DnsResolutionError, resolve
from ubimesh.telemetry.stats import Store

T = TypeVar("T")
UNRESOLVABLE = "ubimesh-test-does-not-exist.invalid"


def run(fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    async def main() -> T:
        async with asyncio.timeout(timeout):
            return await fn()

    return asyncio.run(main())


def system_addresses(name: str, family: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, 80, family, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    out: list[str] = []
    for _, _, _, _, sa in infos:
        if sa[0] not in out:
            out.append(str(sa[0]))
    return out


def dns_cluster(
    name: str,
    *targets: tuple[str, int] | tuple[str, int, int],
    kind: DiscoveryType = DiscoveryType.STRICT_DNS,
    family: DnsLookupFamily = DnsLookupFamily.V4_ONLY,
    refresh: float = 5.0,
    **kw: object,
) -> Cluster:
    groups = []
    for t in targets:
        host, port = t[0], t[1]
        prio = t[2] if len(t) > 2 else 0
        groups.append(
            LocalityEndpoints(Locality(), (Endpoint(SocketAddress(host, port)),), priority=prio)
        )
    return Cluster(
        name,
        kind,
        endpoints=tuple(groups),
        dns_lookup_family=family,
        dns_refresh_rate=refresh,
        **kw,  # type: ignore[arg-type]
    )


def addresses(cm: ClusterManager, name: str) -> list[tuple[str, int]]:
    c = cm.get(name)
    assert c is not None
    return [(h.address.host, h.address.port) for h in c.hosts]


# -- the resolver ----------------------------------------------------------------------------


def test_resolve_localhost_v4() -> None:
    got = run(lambda: resolve("localhost", 8080, DnsLookupFamily.V4_ONLY, timeout=5))
    assert got == [SocketAddress("127.0.0.1", 8080)]


def test_resolve_families_match_the_system_resolver() -> None:
    v4 = system_addresses("localhost", socket.AF_INET)
    v6 = system_addresses("localhost", socket.AF_INET6)

    async def body() -> dict[DnsLookupFamily, list[str] | None]:
        out: dict[DnsLookupFamily, list[str] | None] = {}
        for fam in DnsLookupFamily:
            try:
                out[fam] = [a.host for a in await resolve("localhost", 1, fam, timeout=5)]
            except OSError:
                out[fam] = None
        return out

    got = run(body)
    assert got[DnsLookupFamily.V4_ONLY] == v4
    assert got[DnsLookupFamily.V6_ONLY] == (v6 or None)
    assert got[DnsLookupFamily.AUTO] == (v6 or v4)
    assert got[DnsLookupFamily.V4_PREFERRED] == (v4 or v6)
    assert sorted(got[DnsLookupFamily.ALL] or []) == sorted(set(v4) | set(v6))


def test_resolve_literals_and_family_mismatch() -> None:
    assert run(lambda: resolve("::1", 5, DnsLookupFamily.V6_ONLY)) == [SocketAddress("::1", 5)]
    assert run(lambda: resolve("127.0.0.1", 5, DnsLookupFamily.AUTO)) == [
        SocketAddress("127.0.0.1", 5)
    ]
    with pytest.raises(DnsResolutionError):
        run(lambda: resolve("127.0.0.1", 5, DnsLookupFamily.V6_ONLY))


def test_resolve_unknown_name_fails() -> None:
    with pytest.raises(OSError):
        run(lambda: resolve(UNRESOLVABLE, 5, DnsLookupFamily.AUTO, timeout=5))


# -- STRICT_DNS ------------------------------------------------------------------------------


def test_strict_dns_localhost_resolves_to_loopback() -> None:
    async def body() -> None:
        store = Store()
        cm = ClusterManager({"d": dns_cluster("d", ("localhost", 9000))}, store)
        assert cm.get("d") is not None and addresses(cm, "d") == []  # before start
        assert store.gauges["cluster_manager.warming_clusters"].value == 1
        await cm.start()
        assert addresses(cm, "d") == [("127.0.0.1", 9000)]
        c = cm.get("d")
        assert c is not None
        (h,) = c.hosts
        assert h.hostname == "localhost" and h.cluster_name == "d"
        assert c.choose_host() is h
        assert store.counters["cluster.d.update_success"].value == 1
        assert store.gauges["cluster_manager.warming_clusters"].value == 0
        await cm.stop()

    run(body)


@pytest.mark.parametrize("family", [DnsLookupFamily.AUTO, DnsLookupFamily.V6_ONLY])
def test_strict_dns_localhost_other_families(
    family: DnsLookupFamily, caplog: pytest.LogCaptureFixture
) -> None:
    v4 = system_addresses("localhost", socket.AF_INET)
    v6 = system_addresses("localhost", socket.AF_INET6)
    expected = (v6 or v4) if family is DnsLookupFamily.AUTO else v6

    async def body() -> None:
        cm = ClusterManager({"d": dns_cluster("d", ("localhost", 80), family=family)}, Store())
        await cm.start()
        assert [a for a, _ in addresses(cm, "d")] == expected
        await cm.stop()

    with caplog.at_level(logging.WARNING, logger="ubimesh.proxy.upstream.cluster_manager"):
        run(body)
    if not expected:  # this system has no IPv6 localhost: no hosts, and a warning
        assert "cannot resolve localhost" in caplog.text


def test_strict_dns_every_endpoint_with_its_priority() -> None:
    async def body() -> None:
        spec = dns_cluster("d", ("localhost", 1), ("127.0.0.1", 2, 1))
        cm = ClusterManager({"d": spec}, Store())
        await cm.start()
        c = cm.get("d")
        assert c is not None
        assert [(h.address.port, h.priority) for h in c.hosts] == [(1, 0), (2, 1)]
        assert c.choose_host() is c.hosts[0]
        c.set_host_health(c.hosts[0], False)
        assert c.choose_host() is c.hosts[1]
        await cm.stop()

    run(body)


def test_failed_resolution_no_hosts_warning_and_retry(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        store = Store()
        spec = dns_cluster("bad", (UNRESOLVABLE, 80), refresh=0.05)
        cm = ClusterManager({"bad": spec}, store)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await cm.start()
        assert loop.time() - start < cm.dns_timeout + 1
        c = cm.get("bad")
        assert c is not None and c.hosts == [] and c.choose_host() is None
        # Retried every dns_refresh_rate.
        async with asyncio.timeout(10):
            while store.counters["cluster.bad.update_attempt"].value < 4:
                await asyncio.sleep(0.01)
        assert store.counters["cluster.bad.update_failure"].value >= 3
        assert store.counters["cluster.bad.update_success"].value == 0
        assert store.gauges["cluster_manager.warming_clusters"].value == 0
        await cm.stop()

    with caplog.at_level(logging.DEBUG, logger="ubimesh.proxy.upstream.cluster_manager"):
        run(body)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and UNRESOLVABLE in r.message
    ]
    assert len(warnings) == 1  # once per failure streak, then debug


def test_refresh_keeps_host_objects() -> None:
    async def body() -> None:
        store = Store()
        cm = ClusterManager({"d": dns_cluster("d", ("localhost", 80), refresh=0.02)}, store)
        await cm.start()
        c = cm.get("d")
        assert c is not None
        (h,) = c.hosts
        async with asyncio.timeout(10):
            while store.counters["cluster.d.update_no_rebuild"].value < 3:
                await asyncio.sleep(0.01)
        assert c.hosts == [h]
        await cm.stop()

    run(body)


def test_update_of_a_dns_cluster_keeps_resolved_hosts() -> None:
    async def body() -> None:
        store = Store()
        cm = ClusterManager({"d": dns_cluster("d", ("localhost", 80))}, store)
        await cm.start()
        old = cm.get("d")
        assert old is not None
        (h,) = old.hosts
        cm.update({"d": dns_cluster("d", ("localhost", 80), lb_policy=LbPolicy.RANDOM)})
        new = cm.get("d")
        assert new is not None and new is not old and old.closed
        assert new.hosts == [h]  # right away, before any new resolution
        assert new.choose_host() is h
        await cm.stop()

    run(body)


# -- LOGICAL_DNS -----------------------------------------------------------------------------


def test_logical_dns_one_host_first_address() -> None:
    async def body() -> None:
        store = Store()
        spec = dns_cluster(
            "l",
            ("localhost", 7000),
            ("127.0.0.1", 7001),  # ignored: LOGICAL_DNS uses the first endpoint only
            kind=DiscoveryType.LOGICAL_DNS,
            family=DnsLookupFamily.ALL,
            refresh=0.02,
        )
        cm = ClusterManager({"l": spec}, store)
        await cm.start()
        c = cm.get("l")
        assert c is not None
        (h,) = c.hosts
        all_addrs = system_addresses("localhost", socket.AF_UNSPEC)
        assert h.address == SocketAddress(all_addrs[0], 7000)
        async with asyncio.timeout(10):
            while store.counters["cluster.l.update_attempt"].value < 3:
                await asyncio.sleep(0.01)
        assert c.hosts == [h]
        await cm.stop()

    run(body)


# -- through the TCP proxy -------------------------------------------------------------------


def test_tcp_proxy_to_a_strict_dns_cluster() -> None:
    async def body() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        store = Store()
        cm = ClusterManager({"d": dns_cluster("d", ("localhost", port))}, store)
        await cm.start()
        cfg = TcpProxyConfig(stat_prefix="dns", cluster="d")
        loop = asyncio.get_running_loop()
        proxy = await loop.create_server(
            lambda: TcpProxyProtocol(cfg, cm, store, 1 << 20), "127.0.0.1", 0
        )
        r, w = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        w.write(b"through dns")
        assert await r.readexactly(11) == b"through dns"
        w.close()
        proxy.close()
        upstream.close()
        await cm.stop()

    run(body)
