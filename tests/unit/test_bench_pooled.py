"""bench/pooled.py: rounds from several throughput reports are paired within their round, only rounds that ran
both modes (and recorded the CPU, for the per-CPU figure) count, and the verdict follows where the interval
lies — so a pooled figure in the README cannot come from mismatched rounds or a misread bound."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import pooled  # noqa: E402


def _run(rnd: int, mode: str, rps: float, p99_ms: float = 5.0, per_cpu: float | None = None,
         profile: str = "close") -> dict:
    run = {"round": rnd, "mode": mode, "profile": profile,
           "wrk": {"rps": rps, "latency_us": {"percentiles": {"99": int(p99_ms * 1000)}}}}
    if per_cpu is not None:
        run["cpu"] = {"requests_per_busy_cpu_s": per_cpu}
    return run


def _report(pairs: list[tuple[float, float]], *, num: str = "ebpf", den: str = "iptables",
            cpu: bool = True) -> list[dict]:
    runs = []
    for rnd, (n, d) in enumerate(pairs, start=1):
        runs.append(_run(rnd, num, n, per_cpu=n / 2 if cpu else None))
        runs.append(_run(rnd, den, d, per_cpu=d / 2 if cpu else None))
    return runs


def test_ratios_pair_modes_within_a_round_across_reports():
    fast_hour = _report([(1200.0, 1000.0), (1260.0, 1000.0)])
    slow_hour = _report([(600.0, 500.0)])  # half the speed, the same ratio: pooling ratios cancels the drift
    slow_hour.append(_run(2, "ebpf", 9999.0))  # a round whose other mode is missing does not count
    ratios, used = pooled.paired_ratios([fast_hour, slow_hour], "close", "ebpf", "iptables", "rps")
    assert sorted(ratios) == pytest.approx([1.2, 1.2, 1.26]) and used == 2


def test_the_per_cpu_figure_needs_both_modes_to_have_recorded_the_cpu():
    with_cpu = _report([(1200.0, 1000.0)])
    without = _report([(1300.0, 1000.0)], cpu=False)
    ratios, used = pooled.paired_ratios([with_cpu, without], "close", "ebpf", "iptables", "req_per_cpu_s")
    assert ratios == pytest.approx([1.2]) and used == 1


def test_steady_ratios_meet_or_miss_a_bound_and_a_spread_one_is_within_noise():
    def verdict(values: list[float], metric: str = "rps", bound: float = 1.15) -> str:
        iv = pooled.interval(values)
        return pooled.Pooled("close", "ebpf", "iptables", metric, bound, len(values), 1, 0.0, iv).verdict()

    assert verdict([1.20, 1.21, 1.19, 1.22, 1.20]) == "met"
    assert verdict([1.10, 1.11, 1.09, 1.10, 1.12]) == "not met"
    assert verdict([1.00, 1.30, 1.10, 1.25, 1.05, 1.20]) == "within noise"
    # p99: lower is better, so a steady 0.9 is met against "no worse" and a steady 1.1 is not
    assert verdict([0.90, 0.91, 0.89, 0.90], metric="p99", bound=1.0) == "met"
    assert verdict([1.10, 1.11, 1.09, 1.10], metric="p99", bound=1.0) == "not met"
    assert pooled.interval([1.0, 1.1]) is None  # too few rounds to resample


def test_pool_covers_the_targets_present_and_the_ceilings_without_a_verdict():
    reports = [_report([(1100.0, 1000.0)] * 4),
               _report([(900.0, 1000.0)] * 4, num="explicit-routed", den="explicit"),
               _report([(1160.0, 1000.0)] * 4, num="explicit-routed", den="iptables")]
    rows = {(r.num, r.den, r.metric): r for r in pooled.pool(reports)}
    assert set(rows) == {("ebpf", "iptables", "rps"), ("ebpf", "iptables", "req_per_cpu_s"),
                         ("ebpf", "iptables", "p99"), ("explicit-routed", "explicit", "rps"),
                         ("explicit-routed", "explicit", "req_per_cpu_s"), ("explicit-routed", "iptables", "rps"),
                         ("explicit-routed", "iptables", "req_per_cpu_s")}
    assert rows["ebpf", "iptables", "rps"].median == 1.1 and rows["ebpf", "iptables", "rps"].verdict() == "not met"
    for den, median in (("explicit", 0.9), ("iptables", 1.16)):
        ceiling = rows["explicit-routed", den, "rps"]
        assert ceiling.median == median and ceiling.bound is None and ceiling.verdict() == "–"
    assert "| connection-per-request | ebpf/iptables | req/s | ≥ 1.15 | 4 (1) | 1.100 |" in pooled.markdown(
        list(rows.values()))


def test_a_file_that_is_not_a_throughput_report_is_refused(tmp_path, capsys):
    not_json = tmp_path / "a.json"
    not_json.write_text("{")
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"config": {}}))
    for path in (not_json, other, tmp_path / "missing.json"):
        assert pooled.main([str(path)]) == 2
        assert f"pooled: {path}" in capsys.readouterr().err


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    report = tmp_path / "throughput-x.json"
    report.write_text(json.dumps({"runs": _report([(1200.0, 1000.0)] * 3)}))
    out = tmp_path / "pooled.json"
    assert pooled.main([str(report), "--output", str(out)]) == 0
    assert "ebpf/iptables" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["reports"] == [str(report)]
    assert {r["verdict"] for r in data["pooled"] if r["metric"] != "p99"} == {"met"}


def test_reports_without_any_pair_of_modes_are_an_error(tmp_path, capsys):
    report = tmp_path / "throughput-y.json"
    report.write_text(json.dumps({"runs": [_run(1, "direct", 100.0)]}))
    assert pooled.main([str(report)]) == 2
    assert "no round" in capsys.readouterr().err
