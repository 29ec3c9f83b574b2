"""How fast the ADS server pushes a change to many proxies (control plane, docs/control-plane.md).

One process serves (``AdsServer`` with one snapshot per node), another runs every simulated
proxy: ``--clients`` ADS streams spread over ``--channels`` gRPC connections, each with its own
node id, subscribing CDS and LDS (wildcard) and EDS and RDS (by name) and ACKing every response
as Envoy does.  Once every client has its initial configuration, the server sets a new snapshot
for every node in which one resource changed (by default one ClusterLoadAssignment: a workload
moved), and each client notes when the new version of that type reached it.  Latency is
measured from the moment the server started setting the new snapshots (CLOCK_MONOTONIC is
shared by the two processes) to the moment a client read the response.

    python bench/control_push.py [--clients 1000] [--channels 50] [--change eds|rds|cds|lds]

Prints p50/p99/max and PASS/FAIL against the bar: p99 < 1 s (``--bar``).  Exit status 0 on
PASS, 1 on FAIL, 2 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2  # noqa: E402
from envoy.config.listener.v3 import listener_pb2  # noqa: E402
from envoy.config.route.v3 import route_components_pb2, route_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402

from ubimesh.control.ads import CDS, EDS, LDS, RDS, AdsServer, SnapshotCache  # noqa: E402

CLUSTERS_PER_NODE = 10
CHANGE_TYPES = {"cds": CDS, "eds": EDS, "lds": LDS, "rds": RDS}
READY_TIMEOUT = 120.0
PUSH_TIMEOUT = 60.0


# -- the server process ---------------------------------------------------------------------


class Snapshots:
    """One XdsSet per node: 10 EDS clusters with endpoints, 1 listener, 1 route configuration.

    Messages are shared between nodes, as the compiler shares them.  ``generation`` changes one
    resource of the chosen type in every node's set.
    """

    def __init__(self, nodes: list[str], change: str) -> None:
        self.nodes = nodes
        self.change = CHANGE_TYPES[change]

    def build(self, generation: int) -> dict[str, Any]:
        from ubimesh.control.compiler.model import XdsSet, message_digest, version_of

        ads = config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(),
            resource_api_version=config_source_pb2.V3,
        )
        names = [f"outbound|80||svc{i}.default" for i in range(CLUSTERS_PER_NODE)]
        bump = {t: (generation if t == self.change else 0) for t in CHANGE_TYPES.values()}
        clusters = {
            n: cluster_pb2.Cluster(
                name=n,
                type=cluster_pb2.Cluster.EDS,
                eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads),
                per_connection_buffer_limit_bytes={"value": 32768 + (bump[CDS] if i == 0 else 0)},
            )
            for i, n in enumerate(names)
        }
        endpoints = {
            n: endpoint_pb2.ClusterLoadAssignment(
                cluster_name=n,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(
                                    address=address_pb2.Address(
                                        socket_address=address_pb2.SocketAddress(
                                            address=f"10.0.{i}.{k + 1}",
                                            port_value=8080 + (bump[EDS] if i == 0 else 0),
                                        )
                                    )
                                )
                            )
                            for k in range(3)
                        ]
                    )
                ],
            )
            for i, n in enumerate(names)
        }
        listener = listener_pb2.Listener(
            name="outbound_http_15001",
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address="127.0.0.1", port_value=15001 + bump[LDS]
                )
            ),
        )
        route = route_pb2.RouteConfiguration(
            name="outbound_http_15001",
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=f"svc{i}",
                    domains=[f"svc{i}", f"svc{i}.default"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(cluster=n),
                        )
                    ],
                    response_headers_to_add=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key="x-gen", value=str(bump[RDS]))
                        )
                    ]
                    if i == 0
                    else [],
                )
                for i, n in enumerate(names)
            ],
        )
        resources = {
            CDS: clusters,
            EDS: endpoints,
            LDS: {listener.name: listener},
            RDS: {route.name: route},
        }
        versions = {
            t: version_of({n: message_digest(m) for n, m in named.items()})
            for t, named in resources.items()
        }
        xds = XdsSet(resources=resources, versions=versions)
        return {node: xds for node in self.nodes}


async def serve(args: argparse.Namespace) -> None:
    """The server side: commands on stdin, one JSON line per answer on stdout."""
    nodes = [f"proxy-{i}.bench" for i in range(args.clients)]
    snapshots = Snapshots(nodes, args.change)
    cache = SnapshotCache()
    for node, xds in snapshots.build(0).items():
        cache.set(node, xds)
    server = AdsServer(cache, max_streams=args.clients + 10)
    port = await server.start("127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    generation = 0
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line in ("", "quit"):
            break
        if line == "change":
            generation += 1
            new = snapshots.build(generation)  # built before the clock starts
            cpu0 = time.process_time()
            t0 = time.monotonic()
            for node, xds in new.items():
                cache.set(node, xds)
            t1 = time.monotonic()
            version = next(iter(new.values())).versions[snapshots.change]
            print(json.dumps({"t0": t0, "set_s": t1 - t0, "version": version}), flush=True)
            # Let the pushes happen, then report the server's CPU for them.
            await asyncio.sleep(args.settle)
            print(json.dumps({"push_cpu_s": time.process_time() - cpu0}), flush=True)
        elif line == "stats":
            stats = server.stats()
            stats.pop("nodes_connected")
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"stats": stats, "max_rss_kib": rss}), flush=True)
    await server.stop(1.0)


# -- the client process ---------------------------------------------------------------------


class SimClient:
    """One simulated proxy: an ADS stream that subscribes like Envoy and ACKs everything."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, watch: str) -> None:
        self.node_id = node_id
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.watch = watch
        self.versions: dict[str, str] = {}
        self.ready = asyncio.Event()
        self.target: str | None = None
        self.reached: float | None = None
        self.got_target = asyncio.Event()
        self.eds_names = [f"outbound|80||svc{i}.default" for i in range(CLUSTERS_PER_NODE)]
        self.names = {CDS: [], EDS: self.eds_names, LDS: [], RDS: ["outbound_http_15001"]}
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            first = True
            for type_url in (CDS, EDS, LDS, RDS):
                req = discovery_pb2.DiscoveryRequest(
                    type_url=type_url, resource_names=self.names[type_url]
                )
                if first:
                    req.node.id = self.node_id
                    req.node.cluster = "bench"
                    first = False
                await self.call.write(req)
            async for resp in self.call:
                now = time.monotonic()
                self.versions[resp.type_url] = resp.version_info
                if resp.type_url == self.watch and resp.version_info == self.target:
                    self.reached = now
                    self.got_target.set()
                await self.call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=resp.type_url,
                        resource_names=self.names[resp.type_url],
                        version_info=resp.version_info,
                        response_nonce=resp.nonce,
                    )
                )
                if len(self.versions) == 4:
                    self.ready.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            self.got_target.set()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


async def drive(args: argparse.Namespace) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    argv = [sys.executable, __file__, "--serve", "--clients", str(args.clients)]
    argv += ["--change", args.change, "--settle", str(args.settle)]
    server = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert server.stdin is not None and server.stdout is not None
    loop = asyncio.get_running_loop()

    async def ask(command: str | None) -> dict[str, Any]:
        assert server.stdin is not None and server.stdout is not None
        if command is not None:
            server.stdin.write(command + "\n")
            server.stdin.flush()
        line = await asyncio.wait_for(loop.run_in_executor(None, server.stdout.readline), 120)
        if not line:
            raise RuntimeError(f"the server process ended (status {server.poll()})")
        return dict(json.loads(line))

    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        port = (await ask(None))["port"]
        watch = CHANGE_TYPES[args.change]
        clients = []
        for _ in range(args.channels):
            # A local subchannel pool: each channel is its own TCP connection.
            channels.append(
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
        for i in range(args.clients):
            client = SimClient(channels[i % args.channels], f"proxy-{i}.bench", watch)
            clients.append(client)
            tasks.append(loop.create_task(client.run()))
        t_connect = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), READY_TIMEOUT)
        errors = [c.error for c in clients if c.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
        connect_s = time.monotonic() - t_connect
        await asyncio.sleep(1.0)  # let the initial ACKs drain
        load_before = os.getloadavg()

        changed = await ask("change")
        for client in clients:
            client.target = changed["version"]
            if client.versions.get(watch) == client.target:  # arrived before we looked
                client.got_target.set()
        await asyncio.wait_for(
            asyncio.gather(*(c.got_target.wait() for c in clients)), PUSH_TIMEOUT
        )
        cpu = await ask(None)
        stats = await ask("stats")
        latencies = sorted(
            (c.reached - changed["t0"]) for c in clients if c.reached is not None
        )
        missing = args.clients - len(latencies)
        p50, p99, worst = (percentile(latencies, p) for p in (50, 99, 100))
        ok = missing == 0 and p99 < args.bar
        print(f"ADS push of one changed {args.change.upper()} resource to {args.clients} clients")
        print(f"  clients: {args.clients} streams over {args.channels} connections, one process")
        print(f"  initial config to all clients: {connect_s:.2f} s")
        print(f"  setting {args.clients} snapshots took {changed['set_s'] * 1000:.1f} ms")
        print(
            f"  change -> new version at the client: p50 {p50 * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms"
            + (f", {missing} never got it" if missing else "")
        )
        print(f"  server CPU for the push: {cpu['push_cpu_s']:.2f} s")
        srv = stats["stats"]
        responses = sum(srv["responses_sent"].values())
        print(
            f"  server: {srv['streams_connected']} streams, responses {responses},"
            f" ACKs {sum(srv['acks'].values())}, NACKs {sum(srv['nacks'].values())},"
            f" max RSS {stats['max_rss_kib'] / 1024:.0f} MiB"
        )
        print(
            f"  machine: {os.cpu_count()} cores, load average before the change "
            f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
        )
        print(f"  bar: p99 < {args.bar * 1000:.0f} ms -> {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        if server.poll() is None:
            try:
                server.stdin.write("quit\n")
                server.stdin.flush()
                server.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                server.kill()
                server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=50, help="gRPC connections for them")
    parser.add_argument("--change", choices=sorted(CHANGE_TYPES), default="eds")
    parser.add_argument("--bar", type=float, default=1.0, help="p99 bound in seconds")
    parser.add_argument("--settle", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients < 1 or not 1 <= args.channels <= args.clients:
        parser.error("need --clients >= 1 and 1 <= --channels <= --clients")
    try:
        if args.serve:
            asyncio.run(serve(args))
            return 0
        return asyncio.run(drive(args))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: {exc!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
