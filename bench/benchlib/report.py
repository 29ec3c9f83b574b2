"""Summarising repeated runs, and writing results.md, results.json and results.png."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DIRECT = "direct"

# Fields whose median across repetitions is reported.
_MEDIAN_FIELDS = (
    "rps",
    "completed",
    "cpu_us_per_req",
    "proxy_core_pct",
    "load_core_busy",
    "proxy_core_busy",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_rss_mb",
    "max_pss_mb",
    "idle_rss_mb",
    "idle_pss_mb",
    "upstream_cpu_us_per_req",
    "gen_cpu_us_per_req",
)
_SUM_FIELDS = ("non2xx", "socket_errors")


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _minmax(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else (None, None)


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, size, load): medians over repetitions, errors summed."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["size"], run["load"]), []).append(run)
    rows = []
    for (target, size, load), items in groups.items():
        first = items[0]
        row: dict[str, Any] = {
            "target": target,
            "size": size,
            "load": load,
            "kind": first["kind"],
            "conns": first["conns"],
            "requested_rps": first["requested_rps"],
            "repeats": len(items),
        }
        for key in _MEDIAN_FIELDS:
            row[key] = _median(item.get(key) for item in items)
        for key in _SUM_FIELDS:
            row[key] = sum(int(item.get(key) or 0) for item in items)
        row["rps_min"], row["rps_max"] = _minmax(item["rps"] for item in items)
        row["cpu_min"], row["cpu_max"] = _minmax(item.get("cpu_us_per_req") for item in items)
        row["notes"] = sorted({note for item in items for note in item.get("notes", [])})
        rows.append(row)
    _add_baseline_deltas(rows)
    _add_knee_notes(rows)
    return rows


def _add_baseline_deltas(rows: list[dict[str, Any]]) -> None:
    """Added latency = through-proxy minus direct, for fixed-rate loads only.

    Under a closed loop the direct run goes faster than the proxied runs, so subtracting
    latencies measured at different rates would mean nothing.
    """
    direct = {(r["size"], r["load"]): r for r in rows if r["target"] == DIRECT}
    for row in rows:
        base = direct.get((row["size"], row["load"]))
        for pct in ("p50", "p90", "p99"):
            key = f"added_{pct}_ms"
            row[key] = None
            if row["kind"] != "fixed" or row["target"] == DIRECT or base is None:
                continue
            if row[f"{pct}_ms"] is not None and base[f"{pct}_ms"] is not None:
                row[key] = row[f"{pct}_ms"] - base[f"{pct}_ms"]


def _add_knee_notes(rows: list[dict[str, Any]]) -> None:
    """Flag fixed rates above 50% of the target's closed-loop peak (Envoy: "below the knee")."""
    peaks: dict[tuple[str, str], float] = {}
    for row in rows:
        if row["kind"] == "closed" and row["rps"] is not None:
            key = (row["target"], row["size"])
            peaks[key] = max(peaks.get(key, 0.0), row["rps"])
    for row in rows:
        peak = peaks.get((row["target"], row["size"]))
        if row["kind"] == "fixed" and peak and row["requested_rps"] > 0.5 * peak:
            row["notes"] = sorted({*row["notes"], "rate > 50% of peak"})


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}"


def _range(row: dict[str, Any], key: str, lo: str, hi: str, digits: int) -> str:
    text = _f(row[key], digits)
    if row["repeats"] > 1 and row[lo] is not None:
        text += f" ({_f(row[lo], digits)}..{_f(row[hi], digits)})"
    return text


def _mem(row: dict[str, Any], rss: str, pss: str) -> str:
    if row[rss] is None:
        return "-"
    return f"{_f(row[rss])} / {_f(row[pss])}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _load_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["load"] not in seen:
            seen.append(row["load"])
    return seen


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


#: Meta keys kept out of results.md's header: raw records, or printed in a section of their own.
RAW_META = ("versions", "corun", "machine_speed")


def markdown(
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    targets: Sequence[str],
    sizes: Sequence[str],
    subject: str,
) -> str:
    out = ["# ubimesh proxy benchmark", ""]
    # Raw records (the co-run's rounds, the speed probe's tries) are in results.json only.
    out += [f"- {key}: {value}" for key, value in meta.items() if key not in RAW_META]
    out += ["- versions:"]
    out += [f"  - {name}: `{text}`" for name, text in meta.get("versions", {}).items()]
    out += [
        "",
        "CPU µs/req = utime+stime of the proxy's processes over the measured window, divided "
        "by completed requests (vCPU per 1000 rps = µs/req ÷ 1000). Memory is "
        "RSS / PSS in MB, summed over the proxy's processes. `proxy core %` is the proxy's "
        "CPU time over wall time; `load core %` is how busy the core shared by the load "
        "generator and the upstream was. Medians over repetitions; (min..max) when repeated.",
        "",
    ]
    by_key = {(r["target"], r["size"], r["load"]): r for r in rows}
    loads = _load_order(rows)
    for size in sizes:
        out += [f"## {size} responses", ""]
        for load in loads:
            sample = next((r for r in rows if r["size"] == size and r["load"] == load), None)
            if sample is None:
                continue
            present = [t for t in targets if (t, size, load) in by_key]
            if sample["kind"] == "closed":
                out += [f"### Closed loop, {load} (peak)", ""]
                header = [
                    "target", "rps", "CPU µs/req", "proxy core %", "load core %", "p50 ms",
                    "p99 ms", "max mem MB", "idle mem MB", "non-2xx", "sock err", "notes",
                ]  # fmt: skip
                lines = []
                for t in present:
                    r = by_key[(t, size, load)]
                    lines.append([
                        t, _range(r, "rps", "rps_min", "rps_max", 0),
                        _range(r, "cpu_us_per_req", "cpu_min", "cpu_max", 1),
                        _f(r["proxy_core_pct"], 0), _f(r["load_core_busy"], 0),
                        _f(r["p50_ms"], 3), _f(r["p99_ms"], 3),
                        _mem(r, "max_rss_mb", "max_pss_mb"),
                        _mem(r, "idle_rss_mb", "idle_pss_mb"),
                        str(r["non2xx"]), str(r["socket_errors"]), ", ".join(r["notes"]),
                    ])  # fmt: skip
            else:
                out += [f"### Fixed rate, {load}", ""]
                header = [
                    "target", "achieved rps", "CPU µs/req", "vCPU/1k rps", "p50 ms", "p90 ms",
                    "p99 ms", "+p50 ms", "+p99 ms", "max mem MB", "non-2xx", "sock err",
                    "notes",
                ]  # fmt: skip
                lines = []
                for t in present:
                    r = by_key[(t, size, load)]
                    cpu = r["cpu_us_per_req"]
                    lines.append([
                        t, _f(r["rps"], 0),
                        _range(r, "cpu_us_per_req", "cpu_min", "cpu_max", 1),
                        _f(cpu / 1000 if cpu is not None else None, 3),
                        _f(r["p50_ms"], 3), _f(r["p90_ms"], 3), _f(r["p99_ms"], 3),
                        _signed(r["added_p50_ms"]), _signed(r["added_p99_ms"]),
                        _mem(r, "max_rss_mb", "max_pss_mb"),
                        str(r["non2xx"]), str(r["socket_errors"]), ", ".join(r["notes"]),
                    ])  # fmt: skip
            out += [*_table(header, lines), ""]
    out += ratio_section(rows, targets, sizes, subject)
    return "\n".join(out).rstrip() + "\n"


def ratio_section(
    rows: Sequence[dict[str, Any]], targets: Sequence[str], sizes: Sequence[str], subject: str
) -> list[str]:
    peers = [t for t in targets if t not in (DIRECT, subject)]
    out = [f"## Ratios: {subject} / peer", ""]
    if subject not in targets or not peers:
        return [*out, f"{subject} was not run together with a peer; no ratios.", ""]
    out += [
        "rps > 1 means the subject served more requests per second; CPU/req < 1 means it "
        "spent less CPU per request. Fixed-rate rps ratios are ~1 by construction unless a "
        "proxy could not keep up.",
        "",
    ]
    by_key = {(r["target"], r["size"], r["load"]): r for r in rows}
    header = ["size", "load"]
    for peer in peers:
        header += [f"{subject}/{peer} rps", f"{subject}/{peer} CPU/req"]
    lines = []
    for size in sizes:
        for load in _load_order(rows):
            me = by_key.get((subject, size, load))
            if me is None:
                continue
            line = [size, load]
            for peer in peers:
                other = by_key.get((peer, size, load))
                if other is None:
                    line += ["-", "-"]
                    continue
                line += [
                    _f(ratio(me["rps"], other["rps"]), 2),
                    _f(ratio(me["cpu_us_per_req"], other["cpu_us_per_req"]), 2),
                ]
            lines.append(line)
    return [*out, *_table(header, lines), ""]


# --------------------------------------------------------------------------------------
# JSON and chart
# --------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def chart(
    rows: Sequence[dict[str, Any]], targets: Sequence[str], sizes: Sequence[str], path: Path
) -> None:
    """Bar charts: closed-loop rps per target, and CPU µs/request per proxy and load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["target"], r["size"], r["load"]): r for r in rows}
    targets = [t for t in targets if any(r["target"] == t for r in rows)]
    loads = _load_order(rows)
    closed = [ld for ld in loads if any(r["load"] == ld and r["kind"] == "closed" for r in rows)]
    proxies = [t for t in targets if t != DIRECT]
    colors = {t: f"C{i}" for i, t in enumerate(targets)}
    fig, axes = plt.subplots(
        2, len(sizes), figsize=(6.5 * len(sizes), 8), squeeze=False, constrained_layout=True
    )
    for col, size in enumerate(sizes):
        ax = axes[0][col]
        width = 0.8 / max(len(targets), 1)
        for i, target in enumerate(targets):
            values = [(by_key.get((target, size, ld)) or {}).get("rps") or 0 for ld in closed]
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(closed))]
            bars = ax.bar(xs, values, width, label=target, color=colors[target])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(closed)), closed)
        ax.set_title(f"{size}: closed-loop requests/s (higher is better)")
        ax.set_ylabel("requests/s")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)

        ax = axes[1][col]
        width = 0.8 / max(len(proxies), 1)
        for i, target in enumerate(proxies):
            values = [
                (by_key.get((target, size, ld)) or {}).get("cpu_us_per_req") or 0 for ld in loads
            ]
            xs = [j + (i - (len(proxies) - 1) / 2) * width for j in range(len(loads))]
            bars = ax.bar(xs, values, width, label=target, color=colors[target])
            ax.bar_label(bars, fmt="%.1f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(loads)), loads, fontsize=8)
        ax.set_title(f"{size}: proxy CPU µs per request (lower is better)")
        ax.set_ylabel("CPU µs / request")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio_bar_section(
    rows: list[dict[str, Any]],
    *,
    heading: str,
    bar_text: str,
    plain: str,
    subject: str,
    bar: float,
    without: str = "without",
    with_: str = "with",
) -> str:
    """Markdown for a "same proxy with and without a feature" bar: per size and closed-loop
    load, the rps of ``plain`` and ``subject``, their ratio, CPU per request, and PASS when
    the ratio is at least ``bar``."""
    out = [
        f"## {heading}",
        "",
        bar_text,
        "",
        f"| size | load | rps {without} | rps {with_} | ratio | CPU µs/req without | "
        "CPU µs/req with | bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["target"], r["size"], r["load"]): r for r in rows}
    for (target, size, load), row in by_key.items():
        if target != subject or row["kind"] != "closed":
            continue
        base = by_key.get((plain, size, load))
        if base is None or not base["rps"]:
            continue
        ratio = row["rps"] / base["rps"]
        verdict = "PASS" if ratio >= bar else "FAIL"
        out.append(
            f"| {size} | {load} | {_num(base['rps'])} | {_num(row['rps'])} | {ratio:.3f} | "
            f"{_num(base['cpu_us_per_req'], 1)} | {_num(row['cpu_us_per_req'], 1)} | {verdict} |"
        )
    return "\n".join(out) + "\n"
