"""How long `ubimesh policy blast-radius` takes on a large mesh
(`python bench/policy_blast_radius.py`).

Generates, in memory, N services (default 1,000) over 10 namespaces with R TrafficTarget rules
(default 5,000; deterministic from ``--seed``), every service with ``--workloads`` sidecar
workloads (an http port 8080, every 5th service also a tcp port 9000), and times the whole
question as the CLI answers it with ``-f``: from the validated resources to the answer
(compiling the inbound RBAC, translating it, evaluating; printing excluded), for the identity
of ``svc0`` (or ``--identity``). The bar: under 2 s for 1,000 services and 5,000 rules. The
whole command as a fresh process (imports, reading the YAML, printing) is timed by
``bench/policy_blast_radius_cli.py``.

``generate`` is also the integration test's mesh (tests/integration/test_policy_agreement.py):
its ``address``, ``inbound`` and ``app`` hooks put some workloads on 127.0.0.1 with real ports.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from ubimesh.control.resources import validate_document
from ubimesh.control.resources.model import Resource

MESH_API = "ubimesh.io/v1alpha1"
ACCESS_API = "access.smi-spec.io/v1alpha3"
SPECS_API = "specs.smi-spec.io/v1alpha4"
NAMESPACES = 10
HTTP_PORT = 8080
TCP_PORT = 9000

#: The HTTPRouteGroup every namespace holds: a rule names it, with some of its matches or all.
ROUTE_MATCHES: list[dict[str, Any]] = [
    {"name": "read", "methods": ["GET", "HEAD"], "pathRegex": "/api/v1/.*"},
    {"name": "write", "methods": ["POST", "PUT"], "pathRegex": "/api/v1/items"},
    {"name": "admin", "pathRegex": "/admin", "headers": {"x-role": "admin|ops"}},
    {"name": "health", "methods": ["GET"], "pathRegex": "/healthz"},
]
#: The TCPRoutes every namespace holds (name -> ports).
TCP_ROUTES: dict[str, list[int]] = {
    "http-port": [HTTP_PORT],
    "tcp-port": [TCP_PORT],
    "any-port": [],
}


def _doc(api: str, kind: str, name: str, ns: str | None, spec: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if ns is not None:
        metadata["namespace"] = ns
    return {"apiVersion": api, "kind": kind, "metadata": metadata, "spec": spec}


def has_tcp(i: int) -> bool:
    """Whether service ``i`` also has the tcp port."""
    return i % 5 == 4


def service_key(i: int) -> tuple[str, str]:
    """(namespace, name) of service ``i``."""
    return f"ns{i % NAMESPACES}", f"svc{i}"


def generate_documents(
    services: int,
    rules: int,
    seed: int = 1,
    *,
    workloads: int = 1,
    trust_domain: str = "cluster.local",
    address: Callable[[int, int], str] | None = None,
    inbound: Callable[[int, int, str], int] | None = None,
    app: Callable[[int, int, str], int] | None = None,
) -> list[dict[str, Any]]:
    """The mesh as kubectl-shaped documents (what ``ubimesh apply`` reads).

    - ``services`` services ``svc<i>`` in ``ns<i % 10>``, port ``http`` 8080 (and ``tcp`` 9000
      for every 5th); each with ``workloads`` workloads ``svc<i>-<j>`` running as service
      account ``svc<i>`` (every 7th service's second workload as ``svc<i>-batch``), with a
      sidecar (inbound ports by default equal to the service ports).
    - per namespace one HTTPRouteGroup ``api-routes`` (ROUTE_MATCHES) and the TCP_ROUTES.
    - TrafficTargets in the destination's namespace, 1 to 3 rules each, until ``rules`` rules:
      a random destination service account, 1 to 4 random sources (any namespace), rules
      drawn from the group (with 1 or 2 of its matches, or all) and the TCPRoutes.

    ``address(i, j)``, ``inbound(i, j, port name)`` and ``app(i, j, port name)`` override a
    workload's address, sidecar inbound port and application port.
    """
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = [
        _doc(MESH_API, "Mesh", "default", None,
             {"trustDomain": trust_domain, "mtls": {"mode": "STRICT"}})
    ]
    accounts: list[tuple[str, str]] = []  # (namespace, service account), every identity
    for ns_i in range(min(NAMESPACES, services)):
        ns = f"ns{ns_i}"
        docs.append(_doc(SPECS_API, "HTTPRouteGroup", "api-routes", ns,
                         {"matches": ROUTE_MATCHES}))
        for name, ports in TCP_ROUTES.items():
            docs.append(_doc(SPECS_API, "TCPRoute", name, ns, {"matches": {"ports": ports}}))
    for i in range(services):
        ns, name = service_key(i)
        ports = [{"name": "http", "port": HTTP_PORT, "protocol": "http"}]
        if has_tcp(i):
            ports.append({"name": "tcp", "port": TCP_PORT, "protocol": "tcp"})
        docs.append(_doc(MESH_API, "Service", name, ns, {"ports": ports}))
        for j in range(workloads):
            account = f"{name}-batch" if (i % 7 == 3 and j == 1) else name
            if (ns, account) not in accounts:
                accounts.append((ns, account))
            port_names = [p["name"] for p in ports]
            spec: dict[str, Any] = {
                "service": name,
                "serviceAccount": account,
                "address": address(i, j) if address else f"10.{i // 250}.{i % 250}.{j + 1}",
                "sidecar": {
                    "inboundPorts": {
                        p["name"]: inbound(i, j, p["name"]) if inbound else p["port"]
                        for p in ports
                    }
                },
            }
            if app is not None:
                spec["ports"] = {p: app(i, j, p) for p in port_names}
            docs.append(_doc(MESH_API, "Workload", f"{name}-{j}", ns, spec))
    made = 0
    target = 0
    while made < rules:
        dest_ns, dest = accounts[rng.randrange(len(accounts))]
        count = min(rng.randint(1, 3), rules - made)
        tt_rules: list[dict[str, Any]] = []
        for _ in range(count):
            pick = rng.random()
            if pick < 0.6:
                rule: dict[str, Any] = {"kind": "HTTPRouteGroup", "name": "api-routes"}
                if rng.random() < 0.7:
                    names = [m["name"] for m in ROUTE_MATCHES]
                    rule["matches"] = sorted(rng.sample(names, rng.randint(1, 2)))
            else:
                rule = {"kind": "TCPRoute", "name": rng.choice(sorted(TCP_ROUTES))}
            tt_rules.append(rule)
        sources = []
        for _ in range(rng.randint(1, 4)):
            src_ns, src = accounts[rng.randrange(len(accounts))]
            subject = {"kind": "ServiceAccount", "name": src, "namespace": src_ns}
            if subject not in sources:
                sources.append(subject)
        docs.append(_doc(ACCESS_API, "TrafficTarget", f"tt{target}", dest_ns, {
            "destination": {"kind": "ServiceAccount", "name": dest, "namespace": dest_ns},
            "sources": sources,
            "rules": tt_rules,
        }))
        made += count
        target += 1
    return docs


def generate(services: int, rules: int, seed: int = 1, **options: Any) -> list[Resource]:
    """``generate_documents`` validated into resources (defaults filled, as the store has
    them)."""
    return [
        validate_document(doc, f"generated#{n}")
        for n, doc in enumerate(generate_documents(services, rules, seed, **options))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--rules", type=int, default=5000)
    parser.add_argument("--workloads", type=int, default=2, help="workloads per service")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs (the median is the figure)")
    parser.add_argument("--identity", default="", help="default: svc0's identity")
    parser.add_argument("--bar", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)

    from ubimesh.policy.questions import MeshPolicy, blast_radius

    started = time.perf_counter()
    resources = generate(args.services, args.rules, args.seed, workloads=args.workloads)
    generated = time.perf_counter() - started
    identity = args.identity or "spiffe://cluster.local/ns/ns0/sa/svc0"
    times = []
    cpu = []
    answer = None
    for _ in range(args.repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        # The whole question, as `ubimesh policy blast-radius -f` answers it after reading the
        # files: a fresh mesh (nothing cached between runs), compile, translate, evaluate.
        answer = blast_radius(MeshPolicy(resources), identity)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    assert answer is not None
    median = statistics.median(times)
    direct = sum(1 for r in answer.reached if r.hops == 1)
    print(f"resources: {len(resources)} ({args.services} services, {args.rules} rules, "
          f"{args.workloads} workloads each), generated in {generated:.1f} s")
    print(f"blast-radius {identity}: {len(answer.reached)} (service, port, route) reached, "
          f"{direct} directly, {len(answer.identities)} identities, max hops "
          f"{max((r.hops for r in answer.reached), default=0)}")
    runs = ", ".join(f"{t * 1000:.0f}" for t in times)
    cpu_runs = ", ".join(f"{t * 1000:.0f}" for t in cpu)
    over = args.services == 1000 and args.rules == 5000 and median >= args.bar
    verdict = f"OVER THE {args.bar:g} s BAR" if over else "OK"
    # On a shared machine the wall time includes waiting for a core: CPU time says how much
    # of it was this process's own work (one thread).
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"time: median {median * 1000:.0f} ms wall (runs: {runs} ms; CPU {cpu_runs} ms; "
          f"load average {load:.2f}) {verdict}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
