"""Scenario ``telemetry``: what metrics, an access log and tracing cost on the request path
(issue 6 bars: with 100 % trace sampling at most 25 % of throughput against all off, with 1 %
at most 12 %).

Three targets, all ubimesh with one worker on the S1 setup (``configs.ubimesh_bootstrap``:
plain HTTP/1.1, one route, the nginx upstream), measured closed-loop with wrk in one run:

* ``ubimesh``: the S1 bootstrap with the HCM's default ``generate_request_id`` (on, as in
  Envoy; S1 turns it off to match nginx and HAProxy, but it is not one of the features
  measured here): no mesh metrics, no access log, no tracing (Envoy's own stats are always
  kept, as in Envoy);
* ``ubimesh-telemetry``: the listener marked for Istio's mesh metrics (reporter
  ``destination``), a file access log in Envoy's default format, and Zipkin tracing with
  ``random_sampling`` 100 %: every request a span, batched to the upstream's span sink (nginx
  answers ``POST /api/v2/spans`` with 202 and drops the body, so a collector's own cost is not
  counted);
* ``ubimesh-telemetry-1pct``: the same with ``random_sampling`` 1 %.

The report adds the bars (``bar_section``). The verdict is the co-run's: after the
repetitions, each telemetry target runs at once with all off on the proxy core, so the
machine's drift between the moments that sequential runs are measured in cancels out of the
ratio; an A/A control (``CONTROL``, a second all-off proxy) checks that pairing itself is fair.
The sequential repetitions' ratios are shown beside it.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

from benchlib import configs

PRODUCTS = ("ubimesh",)
PLAIN = "ubimesh"
FULL = "ubimesh-telemetry"
SAMPLED = "ubimesh-telemetry-1pct"
TARGETS = (PLAIN, FULL, SAMPLED)
#: A second all-off proxy, co-run against the first: the A/A control of the co-run verdict.
CONTROL = "ubimesh-control"
#: How far from 1 the A/A control's median ratio may be for the co-run to give a verdict.
CONTROL_TOLERANCE = 0.03
#: target -> (random sampling percent, the bar: least throughput ratio to PLAIN)
BARS = {FULL: (100.0, 0.75), SAMPLED: (1.0, 0.88)}
COLLECTOR = "span_sink"
ZIPKIN_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
#: What the control plane writes on a sidecar's inbound listener (docs/telemetry.md, Metrics).
MESH_METADATA = {
    "reporter": "destination",
    "workload": "upstream-v1",
    "namespace": "bench",
    "principal": "spiffe://bench.local/ns/bench/sa/upstream",
    "app": "upstream",
    "version": "v1",
    "service": "upstream.bench.svc.cluster.local",
    "service_name": "upstream",
    "service_namespace": "bench",
}


def telemetry_bootstrap(
    listen_port: int, admin_port: int, upstream_port: int, sampling: float, log_path: Path
) -> dict[str, Any]:
    """The S1 bootstrap with mesh metrics, a file access log and Zipkin tracing at
    ``sampling`` percent."""
    cfg = plain_bootstrap(listen_port, admin_port, upstream_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["metadata"] = {"filter_metadata": {"ubimesh.telemetry": dict(MESH_METADATA)}}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE_LOG_TYPE, "path": str(log_path)},
        }
    ]
    hcm["tracing"] = {
        "random_sampling": {"value": sampling},
        "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": ZIPKIN_TYPE,
                "collector_cluster": COLLECTOR,
                "collector_endpoint": configs.SPANS_PATH,
                "collector_endpoint_version": "HTTP_JSON",
            },
        },
    }
    sink = copy.deepcopy(cfg["static_resources"]["clusters"][0])
    sink["name"] = COLLECTOR
    sink["load_assignment"]["cluster_name"] = COLLECTOR
    cfg["static_resources"]["clusters"].append(sink)
    return cfg


def plain_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The all-off target: S1 with the HCM's default request ids."""
    cfg = configs.ubimesh_bootstrap(listen_port, admin_port, upstream_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["filter_chains"][0]["filters"][0]["typed_config"]["generate_request_id"] = True
    return cfg


def bootstrap(target: str, listen: int, admin: int, upstream: int, workdir: Path) -> dict[str, Any]:
    if target in (PLAIN, CONTROL):
        return plain_bootstrap(listen, admin, upstream)
    if target in BARS:
        sampling = BARS[target][0]
        return telemetry_bootstrap(
            listen, admin, upstream, sampling, workdir / f"{target}.access.log"
        )
    raise ValueError(f"unknown target {target!r} for --scenario telemetry")


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _paired_ratio(runs: list[dict[str, Any]], target: str, size: str, load: str) -> float | None:
    """The median over repetitions of (``target``'s rps / all-off rps in that repetition).

    Repetitions run back to back, so a pair shares the machine's speed of the moment: on a
    shared VM whose speed drifts by tens of percent between minutes, this is steadier than
    the ratio of the two medians (which pairs runs from different moments)."""
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["size"] == size and r["load"] == load and r["kind"] == "closed" and r["rps"]:
            by_rep.setdefault(r["rep"], {})[r["target"]] = r["rps"]
    ratios = sorted(
        got[target] / got[PLAIN] for got in by_rep.values() if target in got and PLAIN in got
    )
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _corun_row(name: str, pairs: list[dict[str, Any]]) -> tuple[str, float, list[float]] | None:
    """The co-run figures of ``name`` against all off: a table's first cells (rounds, median
    rps of both sides, CPU shares), the median ratio and every round's ratio; None without
    rounds."""
    mine = [p for p in pairs if p["target"] == name and p["plain"]["rps"]]
    if not mine:
        return None
    ratios = [p["with"]["rps"] / p["plain"]["rps"] for p in mine]
    plain_rps = statistics.median(p["plain"]["rps"] for p in mine)
    with_rps = statistics.median(p["with"]["rps"] for p in mine)
    shares = (
        f"{statistics.median(p['plain']['cpu_share'] for p in mine):.0%} / "
        f"{statistics.median(p['with']['cpu_share'] for p in mine):.0%}"
    )
    cells = f"{len(mine)} | {_f(plain_rps)} | {_f(with_rps)} | {shares}"
    return cells, statistics.median(ratios), ratios


def corun_verdict(ratio: float | None, bar: float, control: float | None) -> str:
    """PASS or FAIL from the co-run's median ratio, or why there is no verdict: no rounds, no
    A/A control, or a control further than ``CONTROL_TOLERANCE`` from 1 (then the co-run is
    not fair to both sides on this machine, and its ratios say nothing)."""
    if ratio is None:
        return "n/a (no co-run rounds: --corun-rounds 0)"
    if control is None:
        return "n/a (no A/A control round)"
    if abs(control - 1.0) > CONTROL_TOLERANCE:
        return f"n/a (A/A control {control:.3f}, more than {CONTROL_TOLERANCE:.0%} from 1)"
    return f"{'PASS' if ratio >= bar else 'FAIL'} (≥ {bar:.2f})"


def bar_section(
    rows: list[dict[str, Any]], runs: list[dict[str, Any]], pairs: list[dict[str, Any]]
) -> str:
    """Markdown: the bars' verdicts from the co-run (``pairs``, run.py ``corun``), with its
    A/A control, then the same ratios from the sequential repetitions (``rows``, ``runs``),
    shown beside them and not judged.

    Why the co-run decides: the two proxies share the proxy core in the same seconds, so the
    machine's drift, which moves one target's sequential repetitions by up to 2x within a
    run (the report's machine speed line), slows both alike and leaves their ratio alone.
    Sharing a core also means sharing its caches; the A/A control (all off against a second
    all-off proxy) shows what the pairing itself does to a ratio, and the verdict is withheld
    when that is more than ``CONTROL_TOLERANCE``."""
    out = [
        "## Telemetry: the bars",
        "",
        "Bars (issue 6): with metrics, an access log and tracing, throughput is at least "
        f"{BARS[FULL][1]:.0%} of all-off at 100 % sampling and at least {BARS[SAMPLED][1]:.0%} "
        "at 1 % (closed loop, same proxy, same run).",
        "",
        "**Verdict: the co-run.** Each telemetry target runs at once with all off, both pinned "
        "to the proxy core, each driven by its own wrk; the ratio is the median over rounds "
        "of the target's rps over all-off's in the same seconds, so the machine's drift slows "
        "both alike. The A/A control pairs all off with a second all-off proxy: its ratio is "
        "the method's own bias, and no verdict is given when it is more than "
        f"{CONTROL_TOLERANCE:.0%} from 1.",
        "",
        "| target | sampling | rounds | rps all off | rps with telemetry | CPU shares | "
        "ratio (median) | min..max | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    control_row = _corun_row(CONTROL, pairs)
    control = None if control_row is None else control_row[1]
    if control_row is not None:
        cells, ratio, ratios = control_row
        out.append(
            f"| {CONTROL} (A/A control) | - | {cells} | {ratio:.3f} | "
            f"{min(ratios):.3f}..{max(ratios):.3f} | - |"
        )
    for name in (FULL, SAMPLED):
        sampling, bar = BARS[name]
        got = _corun_row(name, pairs)
        if got is None:
            out.append(
                f"| {name} | {sampling:g} % | 0 | - | - | - | - | - | "
                f"{corun_verdict(None, bar, control)} |"
            )
            continue
        cells, ratio, ratios = got
        out.append(
            f"| {name} | {sampling:g} % | {cells} | {ratio:.3f} | "
            f"{min(ratios):.3f}..{max(ratios):.3f} | {corun_verdict(ratio, bar, control)} |"
        )
    out += [
        "",
        "Sequential repetitions, each target alone, one after another (the tables above): "
        "the same ratios with the machine's drift in them, shown for comparison and not "
        "judged. Ratio: of the medians over repetitions; paired: the median of each "
        "repetition's own ratio.",
        "",
        "| size | load | target | sampling | rps all off | rps with telemetry | ratio | "
        "paired | CPU µs/req off | CPU µs/req on | bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["target"], r["size"], r["load"]): r for r in rows}
    for (target, size, load), row in by_key.items():
        if target not in BARS or row["kind"] != "closed":
            continue
        plain = by_key.get((PLAIN, size, load))
        if plain is None or not plain["rps"]:
            continue
        sampling, bar = BARS[target]
        ratio = row["rps"] / plain["rps"]
        paired = _paired_ratio(runs, target, size, load)
        out.append(
            f"| {size} | {load} | {target} | {sampling:g} % | {_f(plain['rps'])} | "
            f"{_f(row['rps'])} | {ratio:.3f} | {'-' if paired is None else f'{paired:.3f}'} | "
            f"{_f(plain['cpu_us_per_req'], 1)} | {_f(row['cpu_us_per_req'], 1)} | "
            f"{'meets' if ratio >= bar else 'below'} {bar:.2f} |"
        )
    return "\n".join(out) + "\n"
