"""ubimesh proxy benchmark: ubimesh against Envoy, nginx and HAProxy (performance.md S1).

``--scenario mtls-pair`` runs the other scenario instead: a sidecar pair with mTLS between the
two proxies (client -> proxy -> proxy -> upstream), ubimesh's pair against Envoy's, at fixed
rates (issue 4, second benchmark bar; see benchlib/mtls_pair.py).

``--scenario rbac`` runs ubimesh alone, the S1 setup without and with an RBAC filter of 100
policies, closed loop, and reports the throughput ratio (issue 5 bar; benchlib/rbac.py).

``--scenario telemetry`` runs ubimesh alone, the S1 setup with mesh metrics, an access log and
tracing off, then on at 100 % and at 1 % sampling, and reports the throughput ratios (issue 6
bars; benchlib/telemetry.py).

``--scenario resilience`` runs ubimesh alone, the S1 setup without and with a retry policy,
circuit breakers and outlier detection, closed loop, and reports the throughput ratio when
nothing fails (issue 7 bar; benchlib/resilience.py).

Run it with ``bash bench/run.sh [options]`` (which installs what is missing first), or with
``python bench/run.py [options]`` from an environment that already has everything. See
bench/README.md for the method and for how to read the results.

Layout on a 2-core machine: the proxy under test runs alone on ``--proxy-cpu`` (core 1) with
one worker; the upstream (nginx, 1 worker) and the load generators share ``--load-cpu``
(core 0). Every process listens on 127.0.0.1 only and is stopped at the end, also on errors
and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchlib import configs, machine_speed, mtls_pair, rbac, resilience, telemetry
from benchlib.corun import together as corun_together
from benchlib.loads import LoadResult, run_h2load, run_wrk
from benchlib.procs import (
    BenchError,
    Managed,
    MemSampler,
    ProcessRegistry,
    answers_200,
    answers_http,
    core_busy,
    cpu_affinities,
    cpu_snapshot,
    cpu_snapshot_all,
    free_port,
    http_get,
    mem_sample,
    pinned,
    wait_for_quiet,
    wait_until,
)
from benchlib.report import DIRECT, chart, markdown, summarise, write_json

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
ALL_PROXIES = ("ubimesh", "envoy", "nginx", "haproxy")
SCENARIOS = ("s1", "mtls-pair", "rbac", "telemetry", "resilience")
# Per-scenario defaults of the options whose default depends on the scenario.
SCENARIO_DEFAULTS = {
    "s1": {"proxies": ",".join(ALL_PROXIES), "sizes": "1k,16k", "rates": "1000,5000",
           "wrk_conns": "50"},
    "mtls-pair": {"proxies": ",".join(mtls_pair.PRODUCTS), "sizes": "1k", "rates": "1000",
                  "wrk_conns": ""},
    "rbac": {"proxies": ",".join(rbac.PRODUCTS), "sizes": "1k", "rates": "", "wrk_conns": "50"},
    "telemetry": {"proxies": ",".join(telemetry.PRODUCTS), "sizes": "1k", "rates": "",
                  "wrk_conns": "50"},
    "resilience": {"proxies": ",".join(resilience.PRODUCTS), "sizes": "1k", "rates": "",
                   "wrk_conns": "50"},
}  # fmt: skip
#: The proxies each scenario can run.
SCENARIO_PRODUCTS = {
    "s1": ALL_PROXIES,
    "mtls-pair": mtls_pair.PRODUCTS,
    "rbac": rbac.PRODUCTS,
    "telemetry": telemetry.PRODUCTS,
    "resilience": resilience.PRODUCTS,
}
MB = 1024 * 1024
# The proxy's admin counter of requests sent upstream (Envoy's name; ubimesh mirrors it).
# Notes that mean someone else's work disturbed a run (see --noise-retries).
NOISE_NOTES = ("other load on proxy core", "machine busy before run")
UPSTREAM_RQ_COUNTER = re.compile(r"^cluster\.upstream\.upstream_rq_total:\s*(\d+)\s*$", re.M)


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_size(label: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmM]?)[bB]?", label)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {label!r} (use e.g. 1k, 16k, 512)")
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return int(m.group(1)) * factor


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark the ubimesh proxy against Envoy, nginx and HAProxy (S1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=None, help="measured seconds per run [60]")
    p.add_argument("--warmup", type=int, default=None, help="warm-up seconds per run [10]")
    p.add_argument("--repeat", type=int, default=None, help="repetitions; median reported [3]")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: duration 5, warm-up 2, repeat 1 (explicit options still win)",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="s1",
        help="s1: one proxy, plain HTTP; mtls-pair: a pair of proxies with mTLS between them; "
        "rbac: ubimesh without and with an RBAC filter of 100 policies (closed loop); "
        "telemetry: ubimesh with metrics, access log and tracing off, and on at 100 %% and 1 %% "
        "sampling (closed loop); resilience: ubimesh without and with retries, circuit breakers "
        "and outlier detection, nothing failing (closed loop)",
    )
    p.add_argument(
        "--proxies",
        default=None,
        help="comma list of proxies [s1: ubimesh,envoy,nginx,haproxy; mtls-pair: ubimesh,envoy]",
    )
    p.add_argument("--no-direct", action="store_true", help="skip the direct-to-upstream baseline")
    p.add_argument("--ubimesh-cmd", default="ubimesh proxy", help="command that starts ubimesh")
    p.add_argument("--sizes", default=None, help="response body sizes [s1: 1k,16k; mtls-pair: 1k]")
    p.add_argument(
        "--rates",
        default=None,
        help="fixed rates for h2load, total rps [s1: 1000,5000; mtls-pair: 1000]",
    )
    p.add_argument(
        "--wrk-conns",
        default=None,
        help="wrk connection counts (closed loop) [s1: 50; mtls-pair: none]",
    )
    p.add_argument("--h2load-conns", type=int, default=16, help="h2load clients (fixed rate)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="core for the proxy under test")
    p.add_argument("--load-cpu", type=int, default=0, help="core for upstream and load gen")
    p.add_argument("--start-timeout", type=float, default=30.0, help="seconds to become ready")
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=20.0,
        help="before each run, wait until both cores are less busy than this (%%)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=None,
        help="longest wait for a quiet machine before a run, 0: do not wait [120; quick: 30]",
    )
    p.add_argument(
        "--noise-retries",
        type=int,
        default=2,
        help="run a load again, up to this many times, when other work disturbed it",
    )
    p.add_argument(
        "--corun-rounds",
        type=int,
        default=8,
        help="telemetry: after the repetitions, this many rounds of each target at once with "
        "all off on the proxy core (the bars' verdict; 0: none, and no verdict)",
    )
    p.add_argument(
        "--speed-tries",
        type=int,
        default=None,
        help="time a fixed loop on the proxy core this many times before and after the run "
        "(how steady the machine's speed is; 0: not at all) [30; quick: 5]",
    )
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before idle RSS")
    p.add_argument("--subject", default="ubimesh", help="proxy whose ratios to peers are tabulated")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-workdir", action="store_true", help="keep generated configs/logs")
    # Set by preflight: whether the run began with a compiled build for this source.
    p.set_defaults(native_built=False)
    args = p.parse_args(argv)

    quick = {"duration": 5, "warmup": 2, "repeat": 1, "quiet_timeout": 30.0, "speed_tries": 5}
    full = {"duration": 60, "warmup": 10, "repeat": 3, "quiet_timeout": 120.0, "speed_tries": 30}
    for key, value in [
        *(quick if args.quick else full).items(),
        *SCENARIO_DEFAULTS[args.scenario].items(),
    ]:
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration < 1 or args.warmup < 0 or args.repeat < 1 or args.speed_tries < 0:
        p.error("--duration must be >= 1, --warmup >= 0, --repeat >= 1, --speed-tries >= 0")
    args.proxies = _csv(args.proxies)
    allowed = SCENARIO_PRODUCTS[args.scenario]
    unknown = [x for x in args.proxies if x not in allowed]
    if unknown:
        p.error(
            f"unknown proxies {unknown} for --scenario {args.scenario}; "
            f"choose from {','.join(allowed)}"
        )
    try:
        args.sizes = {label: parse_size(label) for label in _csv(args.sizes)}
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.rates = [float(x) for x in _csv(args.rates)]
    args.wrk_conns = [int(x) for x in _csv(args.wrk_conns)]
    if args.subject not in args.proxies and args.proxies:
        args.subject = args.proxies[0]
    return args


# --------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------


def which(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None
    )
    if not found:
        raise BenchError(f"{name} not found; run bash bench/setup.sh")
    return found


def command_output(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def first_line(text: str, contains: str = "") -> str:
    for line in text.splitlines():
        if contains in line and line.strip():
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else ""


@dataclass
class Tools:
    nginx: str
    haproxy: str
    envoy: str | None
    ubimesh: list[str] | None


def warn_if_pure_python(ubimesh_cmd: str) -> bool:
    """Say loudly when the default ``ubimesh proxy`` would run without its compiled hot path:
    a build made stale by any source edit makes the proxy silently run pure Python, and its
    figures then say nothing about the product. (A custom --ubimesh-cmd is the caller's.)
    Returns whether a build for this source exists (False for a custom command)."""
    if ubimesh_cmd != "ubimesh proxy":
        return False
    code, out = command_output(
        [
            sys.executable,
            "-c",
            "from ubimesh import native; print((native.cache_dir() / 'BUILD_OK').exists())",
        ]
    )
    if code == 0 and out.strip().endswith("False"):
        print(
            "warning: no compiled hot path for this source: ubimesh will run pure Python. "
            "Run `ubimesh build-native` first, and edit nothing under src/ while measuring."
        )
        return False
    return code == 0


#: What ``ubimesh proxy`` logs when no build matches its source (``ubimesh.native.enable``).
NO_BUILD_LOG = "no compiled hot path for this source"


def refuse_stale_build(managed: Managed) -> None:
    """Stop the run when a ubimesh target started without the compiled hot path that the run
    started with: something under src/ changed during the run (the build is keyed by the
    source), and this target's figures would be pure Python's, not the product's."""
    try:
        text = managed.log_path.read_text(errors="replace")
    except OSError:
        return
    if NO_BUILD_LOG in text:
        raise BenchError(
            f"{managed.name} started without the compiled hot path the run began with: a "
            "source file changed during the run. Run `ubimesh build-native` and measure "
            "again, editing nothing under src/ meanwhile."
        )


def preflight(args: argparse.Namespace) -> Tools:
    for tool in ("taskset", "wrk", "h2load"):
        which(tool)
    ncpu = os.cpu_count() or 1
    for opt, cpu in (("--proxy-cpu", args.proxy_cpu), ("--load-cpu", args.load_cpu)):
        if cpu >= ncpu:
            raise BenchError(f"{opt} {cpu} but this machine has {ncpu} CPU(s)")
    if args.proxy_cpu == args.load_cpu:
        print("warning: proxy and load share one core; results are not comparable")
    envoy = which("envoy") if "envoy" in args.proxies else None
    ubimesh = None
    if "ubimesh" in args.proxies:
        ubimesh = shlex.split(args.ubimesh_cmd)
        code, out = command_output([*ubimesh, "--help"])
        if code != 0:
            raise BenchError(
                f"`{args.ubimesh_cmd} --help` failed (exit {code}):\n{out[-2000:]}\n"
                "Is ubimesh installed (pip install -e .)? Run without it with "
                "--proxies envoy,nginx,haproxy."
            )
        args.native_built = warn_if_pure_python(args.ubimesh_cmd)
        # Fail before any load runs if ubimesh rejects the bootstrap it will be given.
        with tempfile.TemporaryDirectory(prefix="ubimesh-bench-check-") as tmp:
            if args.scenario == "mtls-pair":
                certs = mtls_pair.mint_certs(Path(tmp))
                ports = (free_port(), free_port(), free_port())
                samples = {
                    "outbound.yaml": mtls_pair.outbound_bootstrap("ubimesh", *ports, certs),
                    "inbound.yaml": mtls_pair.inbound_bootstrap("ubimesh", *ports, certs),
                }
            elif args.scenario == "rbac":
                sizes = list(args.sizes)
                samples = {
                    f"{t}.yaml": rbac.bootstrap(t, free_port(), free_port(), free_port(), sizes)
                    for t in rbac.TARGETS
                }
            elif args.scenario == "resilience":
                samples = {
                    f"{t}.yaml": resilience.bootstrap(t, free_port(), free_port(), free_port())
                    for t in resilience.TARGETS
                }
            elif args.scenario == "telemetry":
                samples = {
                    f"{t}.yaml": telemetry.bootstrap(
                        t, free_port(), free_port(), free_port(), Path(tmp)
                    )
                    for t in telemetry.TARGETS
                }
            else:
                sample = configs.ubimesh_bootstrap(free_port(), free_port(), free_port())
                samples = {"bootstrap.yaml": sample}
            for fname, cfg in samples.items():
                path = configs.write_text(Path(tmp) / fname, configs.dump_yaml(cfg))
                code, out = command_output([*ubimesh, "-c", str(path), "--mode", "validate"])
                if code != 0:
                    raise BenchError(
                        f"`{args.ubimesh_cmd} -c {fname} --mode validate` failed (exit {code}):"
                        f"\n{out[-2000:]}\nRun without it with --proxies "
                        f"{'envoy' if args.scenario == 'mtls-pair' else 'envoy,nginx,haproxy'}."
                    )
    return Tools(nginx=which("nginx"), haproxy=which("haproxy"), envoy=envoy, ubimesh=ubimesh)


def collect_versions(tools: Tools) -> dict[str, str]:
    versions: dict[str, str] = {}

    def add(name: str, argv: Sequence[str], contains: str = "") -> None:
        _code, out = command_output(argv, timeout=20)
        versions[name] = first_line(out, contains)

    if tools.envoy:
        add("envoy", [tools.envoy, "--version"], "version")
    add("nginx", [tools.nginx, "-v"])
    add("haproxy", [tools.haproxy, "-v"])
    add("wrk", ["wrk", "-v"])
    add("h2load", ["h2load", "--version"])
    add("ubimesh git", ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"])
    versions["python"] = platform.python_version()
    versions["psutil"] = psutil.__version__
    versions["kernel"] = platform.release()
    return versions


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base_url: str
    managed: Managed | None = None
    stats_url: str | None = None
    idle_rss_mb: float | None = None
    idle_pss_mb: float | None = None
    affinity: list[list[int]] | None = None
    # mtls-pair: the two proxies of the pair ("outbound", "inbound"); S1 uses ``managed``.
    parts: dict[str, Managed] | None = None
    part_idle: dict[str, dict[str, float | None]] | None = None
    handshake_url: str | None = None

    @property
    def pid(self) -> int | None:
        return self.managed.pid if self.managed else None

    @property
    def pids(self) -> list[int]:
        if self.parts:
            return [m.pid for m in self.parts.values()]
        return [self.managed.pid] if self.managed else []


@dataclass
class Context:
    args: argparse.Namespace
    tools: Tools
    registry: ProcessRegistry
    workdir: Path
    upstream: Managed
    upstream_port: int
    run_counter: int = 0
    pair_certs: mtls_pair.PairCerts | None = None


def start_upstream(
    args: argparse.Namespace, tools: Tools, registry: ProcessRegistry, workdir: Path
) -> tuple[Managed, int]:
    port = free_port()
    (workdir / "upstream.tmp").mkdir(exist_ok=True)
    conf = configs.write_text(
        workdir / "upstream.nginx.conf", configs.nginx_upstream_conf(workdir, port, args.sizes)
    )
    argv = pinned(
        args.load_cpu,
        [
            tools.nginx,
            "-p",
            str(workdir),
            "-e",
            str(workdir / "upstream.startup.log"),
            "-c",
            str(conf),
        ],
    )
    managed = registry.spawn("upstream", argv, workdir / "upstream.log", workdir)
    for label, size in args.sizes.items():
        wait_until(
            f"upstream /{label}",
            answers_200(f"http://127.0.0.1:{port}/{label}", size),
            args.start_timeout,
            managed,
        )
    return managed, port


#: The targets that run ``ubimesh proxy``.
UBIMESH_TARGETS = (
    "ubimesh",
    rbac.WITH_RBAC,
    resilience.WITH_RESILIENCE,
    *telemetry.BARS,
    telemetry.CONTROL,
)


def target_bootstrap(
    scenario: str,
    name: str,
    port: int,
    side_port: int,
    upstream_port: int,
    sizes: list[str],
    workdir: Path,
) -> dict[str, Any]:
    """The bootstrap of a ubimesh or Envoy target ``name`` in ``scenario``. A scenario's own
    targets come first: the telemetry scenario's all-off target is ``ubimesh`` with the HCM's
    default request ids (``telemetry.plain_bootstrap``), not S1's ``ubimesh``, which turns
    them off to match nginx and HAProxy."""
    if scenario == "telemetry" and name in (*telemetry.TARGETS, telemetry.CONTROL):
        return telemetry.bootstrap(name, port, side_port, upstream_port, workdir)
    if name == rbac.WITH_RBAC:
        return rbac.rbac_bootstrap(port, side_port, upstream_port, sizes)
    if name == resilience.WITH_RESILIENCE:
        return resilience.resilience_bootstrap(port, side_port, upstream_port)
    if name == "ubimesh":
        return configs.ubimesh_bootstrap(port, side_port, upstream_port)
    if name == "envoy":
        return configs.envoy_bare_bootstrap(port, side_port, upstream_port)
    raise BenchError(f"no bootstrap for target {name!r} in scenario {scenario!r}")


def start_proxy(ctx: Context, name: str) -> Target:
    args, tools, workdir = ctx.args, ctx.tools, ctx.workdir
    port, side_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    stats_url = None
    if name in UBIMESH_TARGETS or name == "envoy":
        cfg = target_bootstrap(
            args.scenario, name, port, side_port, ctx.upstream_port, list(args.sizes), workdir
        )
        path = configs.write_text(workdir / f"{name}.bootstrap.yaml", configs.dump_yaml(cfg))
        if name in UBIMESH_TARGETS:
            assert tools.ubimesh is not None
            cmd = [*tools.ubimesh, "-c", str(path), "--concurrency", "1"]
        else:
            assert tools.envoy is not None
            cmd = [tools.envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
        ready_url = f"http://127.0.0.1:{side_port}/ready"
        stats_url = f"http://127.0.0.1:{side_port}/stats"
    elif name == "nginx":
        (workdir / "nginx-proxy.tmp").mkdir(exist_ok=True)
        conf = configs.write_text(
            workdir / "proxy.nginx.conf",
            configs.nginx_proxy_conf(workdir, port, side_port, ctx.upstream_port),
        )
        cmd = [
            tools.nginx,
            "-p",
            str(workdir),
            "-e",
            str(workdir / "nginx-proxy.startup.log"),
            "-c",
            str(conf),
        ]
        ready_url = f"http://127.0.0.1:{side_port}/ready"
    elif name == "haproxy":
        conf = configs.write_text(
            workdir / "haproxy.cfg",
            configs.haproxy_conf(port, side_port, ctx.upstream_port, args.proxy_cpu),
        )
        cmd = [tools.haproxy, "-db", "-f", str(conf)]
        ready_url = f"http://127.0.0.1:{side_port}/ready"
    else:  # pragma: no cover - parse_args rejects it
        raise BenchError(f"unknown proxy {name}")

    managed = ctx.registry.spawn(
        name, pinned(args.proxy_cpu, cmd), workdir / f"{name}.log", workdir
    )
    target = Target(name, base, managed, stats_url)
    wait_until(
        f"{name} admin/readiness at {ready_url}",
        answers_http(ready_url),
        args.start_timeout,
        managed,
    )
    if args.native_built and name in UBIMESH_TARGETS:
        refuse_stale_build(managed)
    for label, size in args.sizes.items():
        wait_until(
            f"{name} proxying /{label}",
            answers_200(f"{base}/{label}", size),
            args.start_timeout,
            managed,
        )
    time.sleep(args.settle)
    idle = mem_sample(managed.pid)
    target.idle_rss_mb = idle.rss / MB
    target.idle_pss_mb = idle.pss / MB if idle.pss is not None else None
    target.affinity = cpu_affinities(managed.pid)
    if any(aff != [args.proxy_cpu] for aff in target.affinity):
        print(
            f"warning: {name} processes are not all pinned to cpu {args.proxy_cpu}: "
            f"{target.affinity}"
        )
    return target


def _pair_cmd(ctx: Context, product: str, path: Path) -> list[str]:
    if product == "ubimesh":
        assert ctx.tools.ubimesh is not None
        return [*ctx.tools.ubimesh, "-c", str(path), "--concurrency", "1"]
    assert ctx.tools.envoy is not None
    return [ctx.tools.envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]


def _refuses_plaintext(url: str) -> Callable[[], bool]:
    """A check that passes when a plain HTTP request to ``url`` gets no 200 (TLS is on)."""

    def check() -> bool:
        try:
            status, _body = http_get(url, timeout=2.0)
        except (OSError, http.client.HTTPException):
            return True
        return status != 200

    return check


def start_pair(ctx: Context, product: str) -> Target:
    """Start the inbound, then the outbound proxy of an mTLS pair, both on --proxy-cpu.

    Ready means: both admins answer, a request through the pair returns 200 with the full body
    for every size, and the inbound listener does not serve plain HTTP.
    """
    args, workdir = ctx.args, ctx.workdir
    assert ctx.pair_certs is not None
    name = mtls_pair.target_name(product)
    in_port, in_admin, out_port, out_admin = (free_port() for _ in range(4))
    cfgs = {
        "inbound": mtls_pair.inbound_bootstrap(
            product, in_port, in_admin, ctx.upstream_port, ctx.pair_certs
        ),
        "outbound": mtls_pair.outbound_bootstrap(
            product, out_port, out_admin, in_port, ctx.pair_certs
        ),
    }
    admins = {"inbound": in_admin, "outbound": out_admin}
    parts: dict[str, Managed] = {}
    target = Target(
        name,
        f"http://127.0.0.1:{out_port}",
        stats_url=f"http://127.0.0.1:{in_admin}/stats",
        parts=parts,
        handshake_url=f"http://127.0.0.1:{out_admin}/stats",
    )
    try:
        for role in ("inbound", "outbound"):
            path = workdir / f"{name}.{role}.bootstrap.yaml"
            configs.write_text(path, configs.dump_yaml(cfgs[role]))
            cmd = pinned(args.proxy_cpu, _pair_cmd(ctx, product, path))
            managed = ctx.registry.spawn(
                f"{name} {role}", cmd, workdir / f"{name}.{role}.log", workdir
            )
            parts[role] = managed
            ready_url = f"http://127.0.0.1:{admins[role]}/ready"
            wait_until(
                f"{name} {role} admin at {ready_url}",
                answers_http(ready_url),
                args.start_timeout,
                managed,
            )
            if args.native_built and product == "ubimesh":
                refuse_stale_build(managed)
        for label, size in args.sizes.items():
            wait_until(
                f"{name} proxying /{label} over mTLS",
                answers_200(f"{target.base_url}/{label}", size),
                args.start_timeout,
                parts["outbound"],
            )
        wait_until(
            f"{name} inbound refusing plain HTTP",
            _refuses_plaintext(f"http://127.0.0.1:{in_port}/{next(iter(args.sizes))}"),
            5.0,
            parts["inbound"],
        )
    except BaseException:
        for managed in parts.values():
            ctx.registry.stop(managed)
        raise
    time.sleep(args.settle)
    target.part_idle = {}
    target.affinity = []
    for role, managed in parts.items():
        idle = mem_sample(managed.pid)
        target.part_idle[role] = {
            "idle_rss_mb": idle.rss / MB,
            "idle_pss_mb": idle.pss / MB if idle.pss is not None else None,
        }
        target.affinity += cpu_affinities(managed.pid)
    target.idle_rss_mb = sum(v["idle_rss_mb"] or 0.0 for v in target.part_idle.values())
    pss = [v["idle_pss_mb"] for v in target.part_idle.values()]
    target.idle_pss_mb = None if None in pss else sum(p or 0.0 for p in pss)
    if any(aff != [args.proxy_cpu] for aff in target.affinity):
        print(
            f"warning: {name} processes are not all pinned to cpu {args.proxy_cpu}: "
            f"{target.affinity}"
        )
    return target


def read_counter(target: Target) -> int | None:
    if not target.stats_url:
        return None
    try:
        status, body = http_get(target.stats_url, timeout=2.0)
    except OSError:
        return None
    m = UPSTREAM_RQ_COUNTER.search(body.decode(errors="replace")) if status == 200 else None
    return int(m.group(1)) if m else None


def read_handshakes(target: Target) -> int | None:
    """mtls-pair: the outbound proxy's count of TLS handshakes with the inbound one."""
    if not target.handshake_url:
        return None
    try:
        status, body = http_get(target.handshake_url, timeout=2.0)
    except OSError:
        return None
    text = body.decode(errors="replace") if status == 200 else ""
    m = mtls_pair.HANDSHAKE_COUNTER.search(text)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def running(ctx: Context, name: str) -> Iterator[Target]:
    if name == DIRECT:
        yield Target(DIRECT, f"http://127.0.0.1:{ctx.upstream_port}")
        return
    if ctx.args.scenario == "mtls-pair":
        target = start_pair(ctx, mtls_pair.product_of(name))
        try:
            yield target
        finally:
            for managed in (target.parts or {}).values():
                if not managed.alive():
                    print(
                        f"warning: {managed.name} exited during the run; log tail:\n"
                        f"{managed.log_tail()}"
                    )
                ctx.registry.stop(managed)
        return
    target = start_proxy(ctx, name)
    try:
        yield target
    finally:
        assert target.managed is not None
        if not target.managed.alive():
            print(f"warning: {name} exited during the run; log tail:\n{target.managed.log_tail()}")
        ctx.registry.stop(target.managed)


def corun(ctx: Context, names: list[str], rounds: int) -> list[dict[str, Any]]:
    """The telemetry bars' measurement (their verdict; benchlib/telemetry.py): ``rounds``
    times, for each target but the first (all off), that target and all off at once for
    ``--duration`` seconds, both pinned to the proxy core and each driven by its own
    closed-loop wrk (the first ``--wrk-conns`` count) on the load core. The scheduler gives
    the two proxies equal shares of the same seconds, so the machine's drift between the
    moments that the sequential repetitions run in slows both alike, and the ratio of their
    request counts is the ratio of their costs per request. One of ``names`` may be a second
    all-off proxy (the A/A control). Each pair runs as two fresh processes, warmed up together
    for ``--warmup`` seconds. Two at a time, not all at once: with three, each proxy's slices
    are shorter and start with caches the others filled. Returns one record per pair:
    ``target``, ``round``, and per side (``plain``, ``with``) ``rps`` and ``cpu_share``."""
    args = ctx.args
    conns = args.wrk_conns[0] if args.wrk_conns else 50
    size = next(iter(args.sizes))  # the first size label
    plain, others = names[0], names[1:]
    out: list[dict[str, Any]] = []
    for i in range(rounds):
        for other in others:
            # Fresh processes for every pair: one process can be a percent or two faster than
            # another of the same build for all its life (its hash seed, its memory layout),
            # which fresh pairs turn into noise that the median averages, not into a bias.
            # The wrk that starts first alternates, so neither side always has it.
            pair = [plain, other] if i % 2 == 0 else [other, plain]
            with running(ctx, plain) as first, running(ctx, other) as second:
                started = {plain: first, other: second}
                loads = {n: (started[n].pid, f"{started[n].base_url}/{size}") for n in pair}
                if args.warmup > 0:  # wrk refuses -d0s
                    corun_together(loads, args.load_cpu, conns, args.warmup)
                got = corun_together(loads, args.load_cpu, conns, args.duration)
            out.append({"target": other, "round": i + 1, "plain": got[plain],
                        "with": got[other]})  # fmt: skip
            print(
                f"[corun {i + 1}/{rounds}] {plain} {got[plain]['rps']:.0f} rps, "
                f"{other} {got[other]['rps']:.0f} rps",
                flush=True,
            )
    return out


# --------------------------------------------------------------------------------------
# One measured run
# --------------------------------------------------------------------------------------


@dataclass
class Snap:
    t: float
    proxy: Any
    upstream: Any
    cores: list[Any]


def measure(
    ctx: Context, target: Target, rep: int, size: str, kind: str, conns: int, rate: float | None
) -> dict[str, Any]:
    args = ctx.args
    url = f"{target.base_url}/{size}"
    snaps: dict[str, Snap] = {}

    def snap(tag: str) -> Callable[[], None]:
        def take() -> None:
            proxy_cpu: Any
            if target.parts:  # both proxies of an mTLS pair, summed
                proxy_cpu = cpu_snapshot_all(target.pids)
            else:
                proxy_cpu = cpu_snapshot(target.pid) if target.pid else None
            snaps[tag] = Snap(
                time.monotonic(),
                proxy_cpu,
                cpu_snapshot(ctx.upstream.pid),
                psutil.cpu_times(percpu=True),
            )

        return take

    ctx.run_counter += 1
    notes: list[str] = []
    quiet_busy = None
    if args.quiet_timeout > 0:
        cpus = (args.proxy_cpu, args.load_cpu)
        quiet_busy = wait_for_quiet(cpus, args.quiet_threshold, args.quiet_timeout)
        if quiet_busy >= args.quiet_threshold:
            notes.append(f"machine busy before run ({quiet_busy:.0f}%)")
    if kind == "closed":
        label = f"wrk c{conns}"
        if args.warmup > 0:
            run_wrk(args.load_cpu, url, conns, args.warmup)
    else:
        assert rate is not None
        label = f"h2load {rate:g} rps"
    counter_before = read_counter(target)
    handshakes_before = read_handshakes(target)
    sampler = MemSampler(target.pid) if target.pid else contextlib.nullcontext()
    part_samplers = {role: MemSampler(m.pid) for role, m in (target.parts or {}).items()}
    with sampler, contextlib.ExitStack() as stack:
        for part_sampler in part_samplers.values():
            stack.enter_context(part_sampler)
        result: LoadResult
        if kind == "closed":
            result = run_wrk(
                args.load_cpu, url, conns, args.duration, on_start=snap("a"), on_end=snap("b")
            )
        else:
            assert rate is not None
            log_file = ctx.workdir / f"h2load-{ctx.run_counter}.log"
            result = run_h2load(
                args.load_cpu,
                url,
                conns,
                rate,
                args.duration,
                args.warmup,
                log_file,
                on_start=snap("a"),
                on_end=snap("b"),
            )
            with contextlib.suppress(OSError):
                log_file.unlink()
    counter_after = read_counter(target)
    handshakes_after = read_handshakes(target)

    a, b = snaps["a"], snaps["b"]
    wall = max(b.t - a.t, 1e-9)
    done = result.completed
    rec: dict[str, Any] = {
        "rep": rep, "target": target.name, "size": size, "load": label, "kind": kind,
        "conns": conns, "requested_rps": rate, "url": url,
        "completed": done, "rps": result.rps, "wall_s": wall,
        "p50_ms": result.p50_ms, "p90_ms": result.p90_ms, "p99_ms": result.p99_ms,
        "non2xx": result.non2xx, "socket_errors": result.socket_errors,
        "error_detail": result.error_detail,
        "load_core_busy": core_busy(a.cores, b.cores, args.load_cpu),
        "proxy_core_busy": core_busy(a.cores, b.cores, args.proxy_cpu),
        "upstream_cpu_us_per_req": (
            (b.upstream.seconds - a.upstream.seconds) * 1e6 / done if done else None
        ),
        "gen_cpu_us_per_req": (
            result.gen_cpu_s * 1e6 / done if done and kind == "closed" else None
        ),
        "idle_rss_mb": target.idle_rss_mb, "idle_pss_mb": target.idle_pss_mb,
        "proxy_cpu_s": None, "cpu_us_per_req": None, "proxy_core_pct": None,
        "max_rss_mb": None, "max_pss_mb": None,
        "upstream_rq_counter_delta": None, "busy_before_run": quiet_busy,
        "argv": result.argv, "output": result.output,
    }  # fmt: skip
    if a.proxy is not None and b.proxy is not None:
        cpu = b.proxy.seconds - a.proxy.seconds
        rec["proxy_cpu_s"] = cpu
        rec["cpu_us_per_req"] = cpu * 1e6 / done if done else None
        rec["proxy_core_pct"] = 100.0 * cpu / wall
        if a.proxy.pids != b.proxy.pids:
            notes.append("proxy processes changed")
    if isinstance(sampler, MemSampler):
        rss, pss = sampler.max_rss(), sampler.max_pss()
        rec["max_rss_mb"] = rss / MB if rss is not None else None
        rec["max_pss_mb"] = pss / MB if pss is not None else None
    if target.parts:
        parts: dict[str, dict[str, float | None]] = {}
        for role, part_sampler in part_samplers.items():
            rss, pss = part_sampler.max_rss(), part_sampler.max_pss()
            parts[role] = {
                "max_rss_mb": rss / MB if rss is not None else None,
                "max_pss_mb": pss / MB if pss is not None else None,
                **(target.part_idle or {}).get(role, {}),
            }
        rec["parts"] = parts
        # Upper bound of the pair's peak: the two proxies' peaks need not coincide.
        rss_values = [p["max_rss_mb"] for p in parts.values()]
        pss_values = [p["max_pss_mb"] for p in parts.values()]
        rec["max_rss_mb"] = None if None in rss_values else sum(v or 0.0 for v in rss_values)
        rec["max_pss_mb"] = None if None in pss_values else sum(v or 0.0 for v in pss_values)
        # Counted from before the warm-up, in which the outbound pool grows to one connection
        # per h2load client; more than that means the proxies reconnected (keep-alive broke).
        shakes = (
            handshakes_after - handshakes_before
            if handshakes_before is not None and handshakes_after is not None
            else None
        )
        rec["tls_handshakes"] = shakes
        if shakes is not None and shakes > conns:
            notes.append(f"{shakes} TLS handshakes between the proxies (> {conns} clients)")
    if counter_before is not None and counter_after is not None:
        delta = counter_after - counter_before
        rec["upstream_rq_counter_delta"] = delta
        # Requests still in flight when wrk stops reach the proxy but are not counted by wrk.
        if kind == "closed" and not done <= delta <= done + 2 * conns + done // 500:
            notes.append(f"proxy counter {delta} != {done} completed")
    if rate is not None and not 0.95 * rate <= result.rps <= 1.05 * rate:
        notes.append(f"achieved {100 * result.rps / rate:.0f}% of requested")
    if result.non2xx or result.socket_errors:
        notes.append("errors")
    proxy_pct = rec["proxy_core_pct"]
    if kind == "closed":
        if proxy_pct is not None and proxy_pct >= 90:
            notes.append("proxy core saturated")
        if (rec["load_core_busy"] or 0.0) >= 90:
            notes.append("load core saturated")
    if proxy_pct is not None and (rec["proxy_core_busy"] or 0.0) - proxy_pct > 10:
        notes.append("other load on proxy core")
    rec["notes"] = notes
    return rec


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, float | None]]:
    """(size, kind, conns, rate) for every run against one target, in order."""
    steps: list[tuple[str, str, int, float | None]] = []
    for size in args.sizes:
        steps += [(size, "closed", conns, None) for conns in args.wrk_conns]
        steps += [(size, "fixed", args.h2load_conns, rate) for rate in args.rates]
    return steps


def write_outputs(
    outdir: Path,
    args: argparse.Namespace,
    meta: dict[str, Any],
    runs: list[dict[str, Any]],
    targets: list[str],
    workdir: Path,
) -> str:
    outdir.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    sizes = list(args.sizes)
    subject = args.subject
    if args.scenario == "mtls-pair":
        subject = mtls_pair.target_name(subject)
    if args.scenario == "rbac":
        subject = rbac.WITH_RBAC
    if args.scenario == "resilience":
        subject = resilience.WITH_RESILIENCE
    if args.scenario == "telemetry":
        subject = telemetry.FULL
    text = markdown(rows, meta, targets, sizes, subject)
    if args.scenario == "mtls-pair":
        text += "\n" + mtls_pair.pair_section(rows, runs)
    if args.scenario == "rbac":
        text += "\n" + rbac.bar_section(rows)
    if args.scenario == "resilience":
        text += "\n" + resilience.bar_section(rows)
    if args.scenario == "telemetry":
        text += "\n" + telemetry.bar_section(rows, runs, meta.get("corun") or [])
    (outdir / "results.md").write_text(text)
    write_json(outdir / "results.json", {"meta": meta, "summary": rows, "runs": runs})
    if rows:
        try:
            chart(rows, targets, sizes, outdir / "results.png")
        except Exception as exc:  # the numbers matter more than the picture
            print(f"warning: chart failed: {exc}")
    cfgdir = outdir / "configs"
    cfgdir.mkdir(exist_ok=True)
    for pattern in ("*.yaml", "*.conf", "*.cfg", "*.log"):
        for path in workdir.glob(pattern):
            # Access logs of the telemetry scenario run to hundreds of MB: not kept.
            if not path.name.startswith("h2load-") and not path.name.endswith(".access.log"):
                shutil.copy2(path, cfgdir / path.name)
    return text


def raise_fd_limit() -> None:
    """Let every child inherit soft = hard open-file limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = dt.datetime.now()
    outdir = args.results_dir / started.strftime("%Y%m%d-%H%M%S")
    names = list(args.proxies)
    if args.scenario == "mtls-pair":
        names = [mtls_pair.target_name(p) for p in args.proxies]
    if args.scenario == "rbac":
        # The two targets compared with each other; no direct baseline (not what the bar is).
        names = list(rbac.TARGETS)
        args.no_direct = True
    if args.scenario == "resilience":
        names = list(resilience.TARGETS)
        args.no_direct = True
    if args.scenario == "telemetry":
        names = list(telemetry.TARGETS)
        args.no_direct = True
    targets = ([] if args.no_direct else [DIRECT]) + names
    registry = ProcessRegistry()
    workdir = Path(tempfile.mkdtemp(prefix="ubimesh-bench-"))
    workdir.chmod(0o755)  # nginx workers may run as an unprivileged user
    runs: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    status = 1
    try:
        tools = preflight(args)
        meta = {
            "started": started.isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]),
            "host": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.node()}",
            "layout": f"proxy on cpu {args.proxy_cpu}; upstream + load generator on cpu "
                      f"{args.load_cpu}",
            "duration_s": args.duration, "warmup_s": args.warmup, "repeat": args.repeat,
            "sizes": ",".join(args.sizes), "rates": ",".join(f"{r:g}" for r in args.rates),
            "wrk": f"wrk -t1 -c{{{','.join(map(str, args.wrk_conns))}}} -d{args.duration}s "
                   f"--latency (after a {args.warmup}s wrk warm-up run)",
            "h2load": f"h2load --h1 -c {args.h2load_conns} --rps R/{args.h2load_conns} "
                      f"-D {args.duration} --warm-up-time {args.warmup}",
            "versions": collect_versions(tools),
        }  # fmt: skip
        if args.scenario == "rbac":
            meta["scenario"] = (
                "rbac: wrk -> ubimesh (S1) -> upstream, without RBAC and with an RBAC filter of "
                f"{rbac.POLICIES} policies (the request matches the last one)"
            )
        if args.scenario == "telemetry":
            meta["scenario"] = (
                "telemetry: wrk -> ubimesh (S1) -> upstream, with mesh metrics, a file access "
                "log and Zipkin tracing off, then on at 100 % and at 1 % random sampling (spans "
                "to a sink on the upstream)"
            )
        if args.scenario == "mtls-pair":
            meta["scenario"] = (
                "mtls-pair: h2load -> outbound proxy -> mTLS -> inbound proxy -> upstream; "
                f"client {mtls_pair.CLIENT_ID}, server {mtls_pair.SERVER_ID}"
            )
            meta["layout"] = (
                f"both proxies of a pair on cpu {args.proxy_cpu}; upstream + load generator "
                f"on cpu {args.load_cpu}"
            )
        upstream, upstream_port = start_upstream(args, tools, registry, workdir)
        ctx = Context(args, tools, registry, workdir, upstream, upstream_port)
        if args.scenario == "mtls-pair":
            # Minted once per run; the generated keys stay in the work directory.
            ctx.pair_certs = mtls_pair.mint_certs(workdir / "certs")
        speed: dict[str, list[float]] = {}  # ms per try, before and after the run
        if args.speed_tries > 0:
            print(f"machine speed: {args.speed_tries} tries on cpu {args.proxy_cpu}", flush=True)
            speed["before"] = machine_speed.probe(args.proxy_cpu, args.speed_tries)
        steps = plan(args)
        total = args.repeat * len(targets) * len(steps)
        for rep in range(1, args.repeat + 1):
            # Each repetition starts with the next target: on a shared machine whose speed
            # drifts, a fixed order would favour whichever target always runs first.
            shift = (rep - 1) % len(targets)
            for name in [*targets[shift:], *targets[:shift]]:
                with running(ctx, name) as target:
                    for size, kind, conns, rate in steps:
                        for attempt in range(1, args.noise_retries + 2):
                            rec = measure(ctx, target, rep, size, kind, conns, rate)
                            rec["attempt"] = attempt
                            if not any(n.startswith(NOISE_NOTES) for n in rec["notes"]):
                                break
                            print(f"  (noisy, attempt {attempt}: {', '.join(rec['notes'])})")
                        runs.append(rec)
                        cpu = rec["cpu_us_per_req"]
                        print(
                            f"[{len(runs)}/{total}] rep {rep} {name:8} {size:4} "
                            f"{rec['load']:16} {rec['rps']:10.0f} rps  "
                            f"cpu {cpu if cpu is None else round(cpu, 1)} µs/req  "
                            f"p99 {rec['p99_ms']} ms  {' '.join(rec['notes'])}",
                            flush=True,
                        )
        if args.scenario == "telemetry" and args.corun_rounds > 0:
            # All off is paired with a second all-off proxy too: the A/A control.
            meta["corun"] = corun(ctx, [*names, telemetry.CONTROL], args.corun_rounds)
        if args.speed_tries > 0:
            speed["after"] = machine_speed.probe(args.proxy_cpu, args.speed_tries)
            meta["machine speed"] = machine_speed.line(
                args.proxy_cpu, speed["before"] + speed["after"]
            )
            meta["machine_speed"] = speed  # the tries themselves, for results.json
        meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        text = write_outputs(outdir, args, meta, runs, targets, workdir)
        print()
        print(text)
        print(f"results: {outdir}/results.md, results.json, results.png")
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        registry.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if status != 0 and runs:
            meta["partial"] = True
            with contextlib.suppress(Exception):
                write_outputs(outdir, args, meta, runs, targets, workdir)
                print(f"partial results: {outdir}", file=sys.stderr)
        if args.keep_workdir or (status == 1 and not runs):
            print(f"workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
