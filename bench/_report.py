"""Turn the throughput bench's per-round runs into medians, ratios, target verdicts and a markdown table.

Rounds are the unit of noise: each (profile, mode) gets one figure per round, and the summary is the median
across rounds (with the range beside it, so a reader sees how stable the figure is). Ratios are taken
between medians. The targets are the ones the issues set; they are reported as met or not met, never used
to change what is measured.
"""

from __future__ import annotations

import statistics

PROFILES = {"keep-alive": False, "close": True}  # profile -> wrk sends "Connection: close"
PROFILE_TITLES = {"keep-alive": "keep-alive", "close": "connection-per-request"}

# (profile, numerator, denominator, metric, minimum ratio): rps ratios must reach the minimum; for p99 the
# ratio is ebpf/iptables latency and must not exceed 1.0 ("no worse").
TARGETS = (
    ("keep-alive", "ebpf", "explicit", "rps", 0.97),
    ("close", "ebpf", "explicit", "rps", 0.97),
    ("keep-alive", "ebpf", "explicit-routed", "rps", 0.97),
    ("close", "ebpf", "explicit-routed", "rps", 0.97),
    ("keep-alive", "ebpf", "iptables", "rps", 1.0),
    ("close", "ebpf", "iptables", "rps", 1.15),
    ("keep-alive", "ebpf", "iptables", "p99", 1.0),
    ("close", "ebpf", "iptables", "p99", 1.0),
)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """profile -> mode -> medians over rounds of req/s, p50 and p99 (ms), with ranges and error totals."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["profile"], run["mode"]), []).append(run)
    out: dict[str, dict[str, dict]] = {}
    for (profile, mode), rs in grouped.items():
        rps = [r["wrk"]["rps"] for r in rs]
        p50 = [r["wrk"]["latency_us"]["percentiles"]["50"] / 1000 for r in rs]
        p99 = [r["wrk"]["latency_us"]["percentiles"]["99"] / 1000 for r in rs]
        out.setdefault(profile, {})[mode] = {
            "rounds": len(rs),
            "rps_median": round(statistics.median(rps), 1),
            "rps_min": round(min(rps), 1),
            "rps_max": round(max(rps), 1),
            "p50_ms_median": round(statistics.median(p50), 3),
            "p99_ms_median": round(statistics.median(p99), 3),
            "p99_ms_max": round(max(p99), 3),
            "requests_total": sum(r["wrk"]["requests"] for r in rs),
            "socket_errors_total": sum(r["faults"]["socket_errors"] for r in rs),
            "non_2xx_total": sum(r["faults"]["non_2xx"] for r in rs),
            "misrouted_sessions_total": sum(r["faults"]["misrouted_sessions"] for r in rs),
            "stalled_sessions_total": sum(r["faults"]["stalled_sessions"] for r in rs),
        }
    return out


def ratios(summary: dict) -> dict[str, dict[str, float]]:
    """Per profile: ebpf/explicit and ebpf/iptables for req/s, and ebpf/iptables for p50 and p99."""
    out: dict[str, dict[str, float]] = {}
    for profile, modes in summary.items():
        r = {}
        ebpf = modes.get("ebpf")
        if ebpf:
            for other in ("explicit", "explicit-routed", "iptables", "direct"):
                if other in modes and modes[other]["rps_median"]:
                    r[f"rps_ebpf_over_{other}"] = round(ebpf["rps_median"] / modes[other]["rps_median"], 3)
            if "iptables" in modes:
                for p in ("p50", "p99"):
                    base = modes["iptables"][f"{p}_ms_median"]
                    if base:
                        r[f"{p}_ebpf_over_iptables"] = round(ebpf[f"{p}_ms_median"] / base, 3)
        out[profile] = r
    return out


def targets(summary: dict) -> list[dict]:
    verdicts = []
    for profile, num, den, metric, bound in TARGETS:
        modes = summary.get(profile, {})
        if num not in modes or den not in modes:
            continue
        if metric == "rps":
            value = modes[num]["rps_median"] / modes[den]["rps_median"]
            met = value >= bound
            text = f"{num} req/s ≥ {bound:g}× {den} ({PROFILE_TITLES[profile]})"
        else:
            value = modes[num]["p99_ms_median"] / modes[den]["p99_ms_median"]
            met = value <= bound
            text = f"{num} p99 no worse than {den} ({PROFILE_TITLES[profile]})"
        verdicts.append({"target": text, "profile": profile, "ratio": round(value, 3), "bound": bound, "met": met})
    return verdicts


def markdown(summary: dict, ratio: dict, verdicts: list[dict], mode_order: list[str]) -> str:
    lines = [
        "| profile | mode | req/s (median) | req/s range | p50 ms | p99 ms | faults: socket / non-2xx / misrouted / stalled |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for profile in PROFILES:
        for mode in mode_order:
            s = summary.get(profile, {}).get(mode)
            if s is None:
                continue
            lines.append(
                f"| {PROFILE_TITLES[profile]} | {mode} | {s['rps_median']:,.0f} | "
                f"{s['rps_min']:,.0f}–{s['rps_max']:,.0f} | {s['p50_ms_median']:.2f} | {s['p99_ms_median']:.2f} | "
                f"{s['socket_errors_total']} / {s['non_2xx_total']} / {s['misrouted_sessions_total']} / "
                f"{s['stalled_sessions_total']} |"
            )
    ratio_rows = [(p, r) for p, r in ratio.items() if r]
    if ratio_rows:
        lines += ["", "| profile | ebpf/explicit req/s | ebpf/explicit-routed req/s | ebpf/iptables req/s | "
                      "ebpf/iptables p99 |", "|---|---:|---:|---:|---:|"]
        for profile in PROFILES:
            r = ratio.get(profile)
            if not r:
                continue
            cells = [r.get(k) for k in ("rps_ebpf_over_explicit", "rps_ebpf_over_explicit-routed",
                                         "rps_ebpf_over_iptables", "p99_ebpf_over_iptables")]
            lines.append(f"| {PROFILE_TITLES[profile]} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells)
                         + " |")
    if verdicts:
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for v in verdicts:
            lines.append(f"| {v['target']} | {v['ratio']:.3f} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines)
