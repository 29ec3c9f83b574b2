"""CPU per request of the proxy process, per telemetry feature, A/B interleaved (issue 6).

Throughput on a shared machine is noise; the proxy's own CPU time per request is not (much).
This script starts one nginx upstream and one ubimesh proxy per variant (all at once), then
for ``--rounds`` rounds sends each variant, in a shuffled order, ``-n`` requests with h2load
(HTTP/1.1, keep-alive, ``-c`` connections) and records, per variant and round, from /proc:

* CPU µs per request of the proxy (utime + stime of every thread, and of its descendants);
* context switches per request (voluntary + involuntary, summed over the proxy's threads);
* read-like and write-like system calls per request (/proc/PID/io ``syscr``/``syscw``);
* the proxy's thread count at the end.

Variants (``--variants``, comma-separated; default all):

``off``        the bench's all-off target (S1 with generate_request_id)
``metrics``    + Istio mesh metrics (listener metadata)
``alog``       + a file access log (Envoy's default format)
``trace1``     + Zipkin tracing at 1 % (spans posted to the upstream's span sink)
``trace100``   + Zipkin tracing at 100 %
``trace100nx`` tracing at 100 % whose collector cluster has no endpoint: spans are made and
               queued, but never encoded or sent (the exporter's share is trace100 - this)
``full1`` / ``full100``  the bench's telemetry targets (all three features)

Issue 7's variants (compare with ``--baseline s1``): ``s1`` (the S1 bootstrap, no request
ids), ``retry`` (+ the resilience scenario's retry policy), ``breakers`` (+ its circuit
breakers), ``outlier`` (+ its outlier detection), ``resil`` (all three; benchlib/resilience.py).

    python bench/telemetry_cpu.py [--rounds 6] [-n 20000] [-c 50] [--variants off,full1]

Before/after a change: copy the source tree twice (``cp -r src /tmp/A``, edit one copy) and
name each copy: ``--tree A=/tmp/A --tree B=/tmp/B --variants off@A,alog@A,off@B,alog@B``
(a variant ``name@T`` runs with ``PYTHONPATH`` set to tree ``T``; the editable install's own
path comes after it). The Δ column then compares with ``off`` of the same tree.

The median and the spread (min..max) over rounds are printed, and the difference of each
variant's median to ``off``. On a shared machine the spread is ±15 µs or more: differences
below that need ``--callgrind N``, which counts the instructions (and with ``--cache-sim`` the
simulated cache misses and mispredicted branches) of N requests per variant under valgrind,
figures that do not depend on the machine's load. ``--strace`` additionally runs one extra
round per variant under ``strace -c -f`` and prints syscall counts per request (strace slows
the proxy: its CPU figures are not used). ``--perf`` runs one extra round per variant under
``perf record`` on the CPU clock and prints µs per request by shared object and by symbol: where
the real time goes, caches and kernel included, which callgrind does not model.
``--corun S`` instead runs every variant at once for ``--rounds`` rounds of S seconds, all
proxies pinned to one core and each driven by its own wrk (benchlib/corun.py, as run.py's
telemetry cross-check): they share that core at the same moments, so the machine's drift,
which makes sequential rounds differ by ±25 %, cancels out of each round's rate ratio (about
±2 % between rounds; see ``corun``). This is the throughput bars' question without the
drift: ``--variants off,full1 --corun 5 --rounds 8 --proxy-cpu 1 --load-cpu 0`` (the
bench's layout); A/B of two trees: ``--variants full1@A,full1@B --baseline
full1@A``. With several variants at once each proxy's caches are shared with the others, so
compare pairs where the figure matters.
``--ubimesh-cmd`` as in run.py (default ``ubimesh proxy``).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import configs, resilience, telemetry
from benchlib.corun import together
from benchlib.procs import (
    ProcessRegistry,
    answers_200,
    answers_http,
    free_port,
    process_tree,
    wait_until,
)

VARIANTS = ("off", "metrics", "alog", "trace1", "trace100", "trace100nx", "full1", "full100")
#: Issue 7's variants: the S1 bootstrap (no request ids) with none, one or all of the
#: resilience scenario's features (bench/benchlib/resilience.py).
RESILIENCE_VARIANTS = ("s1", "retry", "breakers", "outlier", "resil")
TICK = os.sysconf("SC_CLK_TCK")


def variant_bootstrap(
    name: str, listen: int, admin: int, upstream: int, workdir: Path
) -> dict[str, Any]:
    """The bootstrap of one variant: the bench's all-off target plus one feature."""
    if name in RESILIENCE_VARIANTS:
        features = {"s1": (), "resil": resilience.FEATURES}.get(name, (name,))
        return resilience.resilience_bootstrap(listen, admin, upstream, features)
    if name == "full1":
        return telemetry.bootstrap(telemetry.SAMPLED, listen, admin, upstream, workdir)
    if name == "full100":
        return telemetry.bootstrap(telemetry.FULL, listen, admin, upstream, workdir)
    cfg = telemetry.plain_bootstrap(listen, admin, upstream)
    if name == "off":
        return cfg
    full = telemetry.telemetry_bootstrap(
        listen, admin, upstream, 1.0 if name == "trace1" else 100.0,
        workdir / f"{name}.access.log",
    )  # fmt: skip
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    full_listener = full["static_resources"]["listeners"][0]
    full_hcm = full_listener["filter_chains"][0]["filters"][0]["typed_config"]
    if name == "metrics":
        listener["metadata"] = full_listener["metadata"]
    elif name == "alog":
        hcm["access_log"] = full_hcm["access_log"]
    elif name.startswith("trace"):
        hcm["tracing"] = full_hcm["tracing"]
        sink = copy.deepcopy(full["static_resources"]["clusters"][-1])
        if name == "trace100nx":
            sink["load_assignment"]["endpoints"] = []
        cfg["static_resources"]["clusters"].append(sink)
    else:
        raise ValueError(f"unknown variant {name!r}")
    return cfg


def proc_counts(pid: int) -> dict[str, float]:
    """CPU seconds, context switches and syscalls of ``pid``'s tree, now."""
    out = {"cpu": 0.0, "user": 0.0, "sys": 0.0, "ctx": 0.0, "syscr": 0.0, "syscw": 0.0,
           "threads": 0.0, "faults": 0.0}  # fmt: skip
    for proc in process_tree(pid):
        base = f"/proc/{proc.pid}"
        try:
            fields = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
            # utime, stime are fields 14, 15 (1-based); after ")" field 3 is index 0.
            out["cpu"] += (int(fields[11]) + int(fields[12])) / TICK
            out["user"] += int(fields[11]) / TICK
            out["sys"] += int(fields[12]) / TICK
            out["threads"] += int(fields[17])
            out["faults"] += int(fields[7]) + int(fields[9])  # minflt, majflt
            for task in os.listdir(f"{base}/task"):
                status = Path(f"{base}/task/{task}/status").read_text()
                for m in re.finditer(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M):
                    out["ctx"] += int(m.group(1))
            io = Path(f"{base}/io").read_text()
            out["syscr"] += int(re.search(r"^syscr: (\d+)", io, re.M).group(1))  # type: ignore[union-attr]
            out["syscw"] += int(re.search(r"^syscw: (\d+)", io, re.M).group(1))  # type: ignore[union-attr]
        except (OSError, IndexError, AttributeError):
            continue
    return out


def thread_switches(pid: int) -> dict[str, list[int]]:
    """Per thread name: [voluntary, involuntary] context switches, summed over its threads."""
    out: dict[str, list[int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        name = re.search(r"^Name:\s+(.*)$", status, re.M)
        vol = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        inv = re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)
        if name and vol and inv:
            acc = out.setdefault(name.group(1), [0, 0])
            acc[0] += int(vol.group(1))
            acc[1] += int(inv.group(1))
    return out


def read_gc(path: Path) -> dict[str, list[float]]:
    """The GC report of a wrapped proxy (collections and seconds per generation), or zeros."""
    import json

    try:
        data: dict[str, list[float]] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {"n": [0, 0, 0], "t": [0.0, 0.0, 0.0]}


def cpu_precise(pid: int) -> float:
    """CPU seconds of ``pid`` (all threads) with nanosecond resolution (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def h2load(url: str, n: int, c: int, cpu: int | None) -> tuple[int, str]:
    argv = ["h2load", "--h1", "-n", str(n), "-c", str(c), "-t", "1", url]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"status codes: (\d+) 2xx", done.stdout)
    if m is None:
        raise RuntimeError(f"h2load output not understood:\n{done.stdout}\n{done.stderr}")
    ok = int(m.group(1))
    if ok < n * 0.99:
        raise RuntimeError(f"only {ok} of {n} requests got a 2xx:\n{done.stdout}")
    return ok, done.stdout


def corun(args: argparse.Namespace, names: list[str], proxies: dict[str, tuple[int, str]]) -> None:
    """``--corun S``: all variants at once, ``--rounds`` times for S seconds each, every proxy
    pinned to the same core and driven by its own closed-loop wrk (``-c`` connections, on the
    load core): benchlib/corun.py, as run.py's telemetry cross-check. The ratio of two
    variants' request rates in one round is the ratio of their costs per request, without
    the machine's drift between the moments that separate runs are measured at. Prints each
    variant's requests per second and CPU share, and the median over rounds of its rate
    divided by the baseline's in the same round."""
    rates: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    for _rnd in range(args.rounds):
        got = together(proxies, args.load_cpu, args.c, args.corun)
        for name in names:
            rates[name].append(got[name]["rps"])
            shares[name].append(got[name]["cpu_share"])
        time.sleep(1.5)  # flush timers fire outside the next round
    print(
        f"\n--corun: {args.rounds} rounds of {args.corun} s, all variants at once "
        f"(proxies on cpu {args.proxy_cpu}, wrk -c {args.c} each on cpu {args.load_cpu})\n"
    )
    print(
        "| variant | rps median | CPU share median | µs/req (CPU share / rps) | "
        f"ratio to {args.baseline} (median of rounds) | min..max |"
    )
    print("|---|---|---|---|---|---|")
    base = rates.get(args.baseline)
    for name in names:
        rps = rates[name]
        us = [s / r * 1e6 for s, r in zip(shares[name], rps, strict=True) if r]
        ratios = [r / b for r, b in zip(rps, base, strict=True) if b] if base else []
        r = (f"{statistics.median(ratios):.3f} | {min(ratios):.3f}..{max(ratios):.3f}"
             if ratios else "- | -")  # fmt: skip
        print(
            f"| {name} | {statistics.median(rps):,.0f} | "
            f"{statistics.median(shares[name]):.0%} | {statistics.median(us):.1f} | {r} |"
        )
    busy = statistics.median(sum(s[i] for s in shares.values()) for i in range(args.rounds))
    if busy < 0.95:
        # Then the load core, not the proxies' costs, set the pace: the ratios understate
        # the differences.
        print(
            f"\nwarning: the proxy core was only {busy:.0%} busy (median); fewer variants "
            "at once, or fewer -c connections, keep the load core from being the limit"
        )


def count_instructions(
    args: argparse.Namespace,
    names: list[str],
    trees: dict[str, str],
    registry: ProcessRegistry,
    workdir: Path,
    up_port: int,
) -> int:
    """``--callgrind``: one variant at a time under callgrind, counting only the measured
    requests (``callgrind_control`` zeroes the counters after the warm-up and dumps them after
    the requests and the 1 s flush timers). Instruction counts do not depend on what else runs
    on the machine; they are user-space only (the kernel's share is not in them)."""
    results: dict[str, dict[str, float]] = {}
    for name in names:
        kind, _, tree = name.partition("@")
        port, admin = free_port(), free_port()
        cfg = variant_bootstrap(kind, port, admin, up_port, workdir)
        path = configs.write_text(workdir / f"{name}.yaml", configs.dump_yaml(cfg))
        base = shlex.split(args.ubimesh_cmd)
        script = shutil.which(base[0]) if base else None
        if script is not None and base[0] == "ubimesh":
            base = [sys.executable, script, *base[1:]]  # valgrind runs the interpreter
        out = workdir / f"cg.{name}.out"
        sim = ["--cache-sim=yes", "--branch-sim=yes"] if args.cache_sim else []
        cmd = ["valgrind", "--tool=callgrind", "--trace-children=no",
               f"--callgrind-out-file={out}", *sim, *base, "-c", str(path),
               "--concurrency", "1"]  # fmt: skip
        env_path = os.environ.pop("PYTHONPATH", None)
        if tree:
            os.environ["PYTHONPATH"] = trees[tree]
        managed = registry.spawn(name, cmd, workdir / f"{name}.log", workdir)
        os.environ.pop("PYTHONPATH", None)
        if env_path is not None:
            os.environ["PYTHONPATH"] = env_path
        url = f"http://127.0.0.1:{port}/1k"
        wait_until(f"{name} proxying", answers_200(url, 1024), 240, managed)
        h2load(url, 400, 10, None)
        time.sleep(2.0)
        subprocess.run(["callgrind_control", "-z", str(managed.pid)], capture_output=True,
                       timeout=60, check=True)  # fmt: skip
        ok, _ = h2load(url, args.callgrind, 10, None)
        time.sleep(2.5)  # the flush timers (1 s) of these requests
        subprocess.run(["callgrind_control", "-d", str(managed.pid)], capture_output=True,
                       timeout=60, check=True)  # fmt: skip
        registry.stop(managed)
        dump = workdir / f"cg.{name}.out.1"
        events: list[str] = []
        totals: list[int] = []
        for line in dump.read_text().splitlines():
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                totals = [int(x) for x in line.split()[1:]]
                break
        row = {e: v / ok for e, v in zip(events, totals, strict=True)}
        results[name] = row
        print(f"{name}: {row.get('Ir', 0) / 1000:.1f}k instructions/request", file=sys.stderr)
    print(f"\ncallgrind, {args.callgrind} requests per variant (10 connections), per request "
          "(user space of the proxy process):\n")  # fmt: skip
    print("| variant | instructions | Δ vs off | L1 misses (I+D) | mispredicted branches |")
    print("|---|---|---|---|---|")
    for name in names:
        row = results[name]
        tree = name.partition("@")[2]
        off = results.get(f"{args.baseline}@{tree}" if tree else args.baseline)
        delta = f"{(row['Ir'] - off['Ir']) / 1000:+.1f}k" if off is not None else "-"
        l1 = row.get("I1mr", 0) + row.get("D1mr", 0) + row.get("D1mw", 0)
        br = row.get("Bcm", 0) + row.get("Bim", 0)
        sim_cols = f"{l1:.0f} | {br:.0f}" if args.cache_sim else "- | -"
        print(f"| {name} | {row['Ir'] / 1000:.1f}k | {delta} | {sim_cols} |")
    return 0


#: perf's sampling rate (Hz of CPU time): each sample stands for 1/PERF_HZ s of the proxy's CPU.
PERF_HZ = 4999


def perf_profiles(
    args: argparse.Namespace,
    names: list[str],
    proxies: dict[str, tuple[int, str]],
    workdir: Path,
) -> None:
    """``--perf``: one more round per variant under ``perf record`` on the software CPU clock
    (this VM has no hardware counters), then the CPU µs per request each shared object and
    each symbol took, side by side. Unlike callgrind this sees the real machine: cache and
    memory stalls, the kernel's share, page faults. The figures carry sampling noise
    (±1/sqrt(samples)) and the perf overhead, so compare variants of the same run only."""
    if shutil.which("perf") is None:
        print("\n--perf: no perf on PATH", file=sys.stderr)
        return
    by_dso: dict[str, dict[str, float]] = {}
    by_sym: dict[str, dict[str, float]] = {}
    for name in names:
        pid, url = proxies[name]
        data = workdir / f"{name}.perf.data"
        recorder = subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", str(pid),
             "-o", str(data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        ok, _ = h2load(url, args.n, args.c, args.load_cpu)
        time.sleep(1.2)  # the flush timers of these requests
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
        done = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-F",
             "sample,dso,sym", "--sort", "dso,sym"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        dsos: dict[str, float] = {}
        syms: dict[str, float] = {}
        for line in done.stdout.splitlines():
            m = re.match(r"\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*\S)", line)
            if m is None:
                continue
            us = int(m.group(1)) / PERF_HZ / ok * 1e6
            dso, sym = m.group(2), m.group(3)
            dsos[dso] = dsos.get(dso, 0.0) + us
            key = f"{dso} {sym}"
            syms[key] = syms.get(key, 0.0) + us
        by_dso[name], by_sym[name] = dsos, syms
    base = by_dso.get(args.baseline)
    print(f"\nperf record -e cpu-clock -F {PERF_HZ}, one round each: CPU µs per request\n")
    print("| shared object | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    totals = {n: sum(by_dso[n].values()) for n in names}
    print("| **all** | " + " | ".join(f"{totals[n]:.1f}" for n in names) + " |")
    top = sorted({d for n in names for d in by_dso[n]},
                 key=lambda d: -max(by_dso[n].get(d, 0.0) for n in names))  # fmt: skip
    for dso in top[:12]:
        print(f"| {dso} | " + " | ".join(f"{by_dso[n].get(dso, 0.0):.2f}" for n in names) + " |")
    if base is None:
        return
    print(f"\nSymbols whose time grew most against {args.baseline} (µs per request):\n")
    ref = by_sym[args.baseline]
    for name in names:
        if name == args.baseline:
            continue
        grown = sorted(by_sym[name], key=lambda k: ref.get(k, 0.0) - by_sym[name][k])
        print(f"### {name} ({totals[name] - totals[args.baseline]:+.1f} µs in all)")
        for key in grown[:25]:
            print(f"  {by_sym[name][key] - ref.get(key, 0.0):+6.2f}  {key}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("-n", type=int, default=20000, help="requests per variant per round")
    p.add_argument("-c", type=int, default=50, help="h2load connections")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--baseline", default="off", help="the variant Δ compares with (s1 for issue 7's variants)"
    )
    p.add_argument("--ubimesh-cmd", default="ubimesh proxy")
    p.add_argument("--proxy-cpu", type=int, default=None, help="pin the proxies to this core")
    p.add_argument("--load-cpu", type=int, default=None, help="pin h2load and nginx here")
    p.add_argument(
        "--strace", action="store_true", help="one more round per variant under strace -c"
    )
    p.add_argument(
        "--perf", action="store_true",
        help="one more round per variant under perf record (CPU clock): µs per request by "
        "shared object and symbol",
    )  # fmt: skip
    p.add_argument("--corun", type=int, default=0, metavar="S",
                   help="instead: run all variants at once, S seconds per round, on one "
                   "proxy core (see corun()); needs --proxy-cpu and --load-cpu")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5000, help="requests per variant before round 1")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--callgrind", type=int, default=0, metavar="N",
                   help="instead: count instructions over N requests per variant under "
                   "valgrind's callgrind (deterministic; about 50 times slower)")  # fmt: skip
    p.add_argument("--cache-sim", action="store_true",
                   help="with --callgrind: also simulate caches and branch prediction")  # fmt: skip
    p.add_argument("--tree", action="append", default=[], metavar="NAME=SRC",
                   help="a source tree for variants named VARIANT@NAME")  # fmt: skip
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    if args.corun and (args.proxy_cpu is None or args.load_cpu is None):
        p.error("--corun needs --proxy-cpu and --load-cpu (the proxies must share one core)")
    if args.corun and args.baseline not in names:
        p.error(f"--corun compares with --baseline {args.baseline!r}, which is not in --variants")
    trees = dict(t.split("=", 1) for t in args.tree)
    for v in names:
        kind, _, tree = v.partition("@")
        if kind not in VARIANTS + RESILIENCE_VARIANTS:
            p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS + RESILIENCE_VARIANTS)}")
        if tree and tree not in trees:
            p.error(f"variant {v!r}: no --tree {tree}=SRC")

    # SIGTERM (and SIGINT, which a background job ignores) end the run through ``finally``.
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    workdir = Path(tempfile.mkdtemp(prefix="telemetry-cpu-"))
    registry = ProcessRegistry()
    try:
        up_port = free_port()
        (workdir / "upstream.tmp").mkdir()
        conf = configs.write_text(
            workdir / "upstream.nginx.conf",
            configs.nginx_upstream_conf(workdir, up_port, {"1k": 1024}),
        )
        nginx = [
            "nginx",
            "-p",
            str(workdir),
            "-e",
            str(workdir / "up.startup.log"),
            "-c",
            str(conf),
        ]
        if args.load_cpu is not None:
            nginx = ["taskset", "-c", str(args.load_cpu), *nginx]
        upstream = registry.spawn("upstream", nginx, workdir / "upstream.log", workdir)
        wait_until("upstream", answers_200(f"http://127.0.0.1:{up_port}/1k", 1024), 20, upstream)
        if args.callgrind:
            return count_instructions(args, names, trees, registry, workdir, up_port)
        proxies: dict[str, tuple[int, str]] = {}
        for name in names:
            port, admin = free_port(), free_port()
            kind, _, tree = name.partition("@")
            cfg = variant_bootstrap(kind, port, admin, up_port, workdir)
            path = configs.write_text(workdir / f"{name}.yaml", configs.dump_yaml(cfg))
            env_path = os.environ.pop("PYTHONPATH", None)
            if tree:
                os.environ["PYTHONPATH"] = trees[tree]
            cmd = [*shlex.split(args.ubimesh_cmd), "-c", str(path), "--concurrency", "1"]
            if args.proxy_cpu is not None:
                cmd = ["taskset", "-c", str(args.proxy_cpu), *cmd]
            # A wrapper (--ubimesh-cmd) may report its garbage collections there.
            os.environ["GCSTATS_FILE"] = str(workdir / f"{name}.gc.json")
            managed = registry.spawn(name, cmd, workdir / f"{name}.log", workdir)
            os.environ.pop("PYTHONPATH", None)
            if env_path is not None:
                os.environ["PYTHONPATH"] = env_path
            wait_until(
                f"{name} ready", answers_http(f"http://127.0.0.1:{admin}/ready"), 60, managed
            )
            url = f"http://127.0.0.1:{port}/1k"
            wait_until(f"{name} proxying", answers_200(url, 1024), 30, managed)
            proxies[name] = (managed.pid, url)
        for _pid, url in proxies.values():
            h2load(url, args.warmup, args.c, args.load_cpu)
        if args.corun:
            corun(args, names, proxies)
            return 0
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        per_thread: dict[str, dict[str, list[float]]] = {}
        for rnd in range(args.rounds):
            order = list(names)
            random.shuffle(order)
            for name in order:
                pid, url = proxies[name]
                time.sleep(0.3)  # let timers from the previous load fire elsewhere
                time.sleep(0.6)  # a GC report of the wrapper, if any, is now current
                gc0 = read_gc(workdir / f"{name}.gc.json")
                before = proc_counts(pid)
                threads0 = thread_switches(pid)
                t0 = cpu_precise(pid)
                ok, _out = h2load(url, args.n, args.c, args.load_cpu)
                # The last flush timers (1 s) belong to these requests: wait for them.
                time.sleep(1.2)
                t1 = cpu_precise(pid)
                time.sleep(0.6)
                gc1 = read_gc(workdir / f"{name}.gc.json")
                after = proc_counts(pid)
                threads1 = thread_switches(pid)
                per_thread[name] = {
                    comm: [(v - threads0.get(comm, [0, 0])[i]) / ok for i, v in enumerate(vn)]
                    for comm, vn in threads1.items()
                }
                keys = ("ctx", "syscr", "syscw", "user", "sys", "faults")
                d = {k: after[k] - before[k] for k in keys}
                d["cpu"] = t1 - t0
                rows[name].append({
                    "us": d["cpu"] / ok * 1e6,
                    "ctx": d["ctx"] / ok,
                    "user": d["user"] / ok * 1e6,
                    "sys": d["sys"] / ok * 1e6,
                    "syscr": d["syscr"] / ok,
                    "syscw": d["syscw"] / ok,
                    "faults": d["faults"] / ok,
                    "threads": after["threads"],
                    "ok": ok,
                    "gc0": (gc1["n"][0] - gc0["n"][0]) / ok * 1000,
                    "gc1": (gc1["n"][1] - gc0["n"][1]) / ok * 1000,
                    "gc2": (gc1["n"][2] - gc0["n"][2]) / ok * 1000,
                    "gc_us": (sum(gc1["t"]) - sum(gc0["t"])) / ok * 1e6,
                })  # fmt: skip
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

        def base_of(name: str) -> float | None:
            tree = name.partition("@")[2]
            off = f"{args.baseline}@{tree}" if tree else args.baseline
            return statistics.median(r["us"] for r in rows[off]) if off in rows else None

        print(f"\n{args.rounds} rounds x {args.n} requests, {args.c} connections; CPU of the proxy "
              "process (all threads, schedstat), per request\n")  # fmt: skip
        print("| variant | CPU µs/req median | min..max | Δ vs off | user | sys | ctx sw/req | "
              "syscr/req | syscw/req | page faults/req | threads |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            rs = rows[name]
            us = [r["us"] for r in rs]
            med = statistics.median(us)
            base = base_of(name)
            delta = f"{med - base:+.1f}" if base is not None else "-"
            print(
                f"| {name} | {med:.1f} | {min(us):.1f}..{max(us):.1f} | {delta} | "
                f"{statistics.median(r['user'] for r in rs):.1f} | "
                f"{statistics.median(r['sys'] for r in rs):.1f} | "
                f"{statistics.median(r['ctx'] for r in rs):.3f} | "
                f"{statistics.median(r['syscr'] for r in rs):.3f} | "
                f"{statistics.median(r['syscw'] for r in rs):.3f} | "
                f"{statistics.median(r['faults'] for r in rs):.3f} | {int(rs[-1]['threads'])} |"
            )
        print("\nGarbage collections per 1000 requests (gen0/gen1/gen2) and GC µs per request "
              "(only with a GC-reporting wrapper as --ubimesh-cmd):\n")  # fmt: skip
        for name in names:
            rs = rows[name]
            print(f"  {name}: " + "/".join(
                f"{statistics.median(r[g] for r in rs):.2f}" for g in ("gc0", "gc1", "gc2")
            ) + f"  {statistics.median(r['gc_us'] for r in rs):.2f} µs")  # fmt: skip
        print(
            "\nContext switches per request by thread name (last round; voluntary/involuntary):\n"
        )
        for name in names:
            parts = [f"{comm} {v:.3f}/{n:.3f}" for comm, (v, n) in sorted(per_thread[name].items())]
            print(f"  {name}: " + ", ".join(parts))
        if args.strace and shutil.which("strace"):
            print("\nstrace -c -f, one round each (syscalls per request):\n")
            for name in names:
                pid, url = proxies[name]
                out = workdir / f"{name}.strace"
                tracer = subprocess.Popen(
                    ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)
                ok, _ = h2load(url, args.n, args.c, args.load_cpu)
                time.sleep(1.2)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
                print(f"### {name}")
                for line in out.read_text().splitlines():
                    cols = line.split()
                    if len(cols) >= 5 and cols[3].isdigit():
                        calls = int(cols[3])
                        print(f"  {cols[-1]:<16} {calls / ok:8.3f}/req")
                    elif len(cols) >= 4 and cols[2].isdigit() and cols[-1] != "total":
                        print(f"  {cols[-1]:<16} {int(cols[2]) / ok:8.3f}/req")
                print()
        if args.perf:
            perf_profiles(args, names, proxies, workdir)
    finally:
        registry.stop_all()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"workdir kept: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
