"""How many CSRs the CA signs per second on one core (`python bench/identity_sign.py`).

The bar (issue 4): at least 1,000 CSRs per second on one core. The CSRs (ECDSA P-256, one
SPIFFE URI SAN each, as ``new_key_and_csr`` makes them) are generated before timing; the timed
loop is ``CertificateAuthority.sign`` alone: parse the CSR, check its signature, build and sign
the leaf, serialise leaf + chain to PEM. The process is pinned to one CPU when the OS allows.
Each run is repeated and the median reported; ``--verify`` also checks every issued chain
with ``verify_svid`` (outside the timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from ubimesh.identity import CertificateAuthority, SpiffeId, new_key_and_csr, verify_svid

BAR = 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csrs", type=int, default=2000, help="CSRs per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs (median reported)")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to (default 0)")
    parser.add_argument("--verify", action="store_true", help="verify every issued chain")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {args.cpu})
        except OSError as exc:
            print(f"note: could not pin to CPU {args.cpu} ({exc}); running unpinned")
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(f"{tmp}/ca", "cluster.local")
        ids = [SpiffeId.for_service_account("cluster.local", f"ns{i % 10}", f"sa{i}")
               for i in range(args.csrs)]
        started = time.perf_counter()
        csrs = [new_key_and_csr(sid)[1] for sid in ids]
        print(f"generated {len(csrs)} CSRs in {time.perf_counter() - started:.2f} s "
              "(not timed)")
        rates = []
        chains: list[bytes] = []
        for run in range(max(1, args.repeat)):
            cpu0 = time.process_time()
            started = time.perf_counter()
            chains = [ca.sign(csr, sid) for csr, sid in zip(csrs, ids, strict=True)]
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu0
            rate = len(csrs) / wall
            rates.append(rate)
            print(f"run {run + 1}: {rate:,.0f} CSR/s wall ({len(csrs) / cpu:,.0f} per CPU "
                  f"second), {wall / len(csrs) * 1e6:.0f} us per CSR")
        if args.verify:
            bundles = ca.bundles()
            bad = [i for i, c in enumerate(chains) if verify_svid(c, bundles) != ids[i]]
            print(f"verified {len(chains)} chains: {len(bad)} wrong")
            if bad:
                return 1
    median = statistics.median(rates)
    verdict = "meets" if median >= BAR else "MISSES"
    print(f"median {median:,.0f} CSR/s on one core: {verdict} the bar of {BAR:,.0f} CSR/s")
    return 0 if median >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
