"""Pure tests of the preflight plan (from synthetic reports) and of masking (no probe runs when masked)."""

from __future__ import annotations

import pytest

from meshcni import preflight
from meshcni.config import Mode
from meshcni.datapath.directions import Direction
from meshcni.preflight.features import FEATURE_IDS, FEATURES
from meshcni.preflight.plan import EXIT_DEGRADED, EXIT_FULL, EXIT_NO_CAPTURE, INBOUND_EBPF, OUTBOUND_EBPF
from meshcni.preflight.report import FeatureResult, Report


def report(*missing: str) -> Report:
    results = tuple(
        FeatureResult(f, f not in missing, "missing on this test kernel" if f in missing else "fine",
                      FEATURES[f].remedy)
        for f in FEATURE_IDS
    )
    return Report(kernel="test", results=results)


def test_everything_present_is_full_ebpf():
    plan = preflight.plan(report())
    assert (plan.outbound, plan.inbound, plan.splice, plan.degraded) == (Mode.EBPF, Mode.EBPF, True, [])
    assert plan.full and plan.exit_code == EXIT_FULL


def test_missing_sk_lookup_moves_only_inbound_to_iptables():
    plan = preflight.plan(report("sk_lookup"))
    assert (plan.outbound, plan.inbound, plan.splice) == (Mode.EBPF, Mode.IPTABLES, True)
    assert plan.degraded == ["inbound by iptables: eBPF needs sk_lookup (missing on this test kernel)"]
    assert plan.exit_code == EXIT_DEGRADED
    assert plan.directions(Mode.EBPF) == {Direction.OUTBOUND}
    assert plan.directions(Mode.IPTABLES) == {Direction.INBOUND}


@pytest.mark.parametrize("feature", ["cgroup_v2", "cgroup_sock_addr", "sockops", "cgroup_getsockopt"])
def test_each_outbound_hook_missing_moves_only_outbound_to_iptables(feature):
    plan = preflight.plan(report(feature))
    assert (plan.outbound, plan.inbound) == (Mode.IPTABLES, Mode.EBPF)
    # splicing rides on eBPF outbound (sockops fills the SOCKHASH), so it goes with it
    assert plan.splice is False
    assert plan.degraded == [f"outbound by iptables: eBPF needs {feature} (missing on this test kernel)"]


@pytest.mark.parametrize("feature", ["bpf_syscall", "bpffs", "bcc", "kernel_headers", "netns_cookie"])
def test_a_common_requirement_missing_moves_both_directions(feature):
    plan = preflight.plan(report(feature))
    assert (plan.outbound, plan.inbound, plan.splice) == (Mode.IPTABLES, Mode.IPTABLES, False)
    assert [r.split(":")[0] for r in plan.degraded] == ["outbound by iptables", "inbound by iptables"]
    assert all(feature in r for r in plan.degraded)


def test_missing_sockhash_only_costs_splicing():
    plan = preflight.plan(report("sk_msg_sockhash"))
    assert (plan.outbound, plan.inbound, plan.splice) == (Mode.EBPF, Mode.EBPF, False)
    assert plan.degraded == ["no same-node splicing: it needs sk_msg_sockhash (missing on this test kernel)"]
    assert not plan.full and plan.exit_code == EXIT_DEGRADED


def test_btf_and_iptables_are_not_needed_for_full_ebpf():
    assert preflight.plan(report("btf", "iptables")).exit_code == EXIT_FULL


def test_no_iptables_either_leaves_the_direction_off_with_a_reason():
    plan = preflight.plan(report("sk_lookup", "iptables"))
    assert (plan.outbound, plan.inbound) == (Mode.EBPF, Mode.OFF)
    assert plan.degraded == [
        "inbound not captured: eBPF needs sk_lookup (missing on this test kernel), "
        "and iptables is unavailable (missing on this test kernel)"
    ]
    assert plan.exit_code == EXIT_DEGRADED  # outbound still captures


def test_nothing_can_capture():
    plan = preflight.plan(report("bpf_syscall", "iptables"))
    assert (plan.outbound, plan.inbound, plan.captures) == (Mode.OFF, Mode.OFF, False)
    assert plan.exit_code == EXIT_NO_CAPTURE


def test_every_requirement_is_a_known_feature():
    assert set(OUTBOUND_EBPF) | set(INBOUND_EBPF) <= set(FEATURE_IDS)


def test_plan_to_dict_is_plain_json():
    assert preflight.plan(report("sk_lookup")).to_dict() == {
        "outbound": "ebpf", "inbound": "iptables", "splice": True, "full": False,
        "degraded": ["inbound by iptables: eBPF needs sk_lookup (missing on this test kernel)"],
    }


# --- masking ----------------------------------------------------------------------------------------------


def test_masks_come_from_arguments_and_the_environment_together():
    env = {preflight.MASK_ENV: " sk_lookup, btf ,"}
    assert preflight.masked_features(["bcc", "iptables,sockops"], env) == {
        "sk_lookup", "btf", "bcc", "iptables", "sockops"}
    assert preflight.masked_features((), {}) == frozenset()


def test_an_unknown_mask_is_an_error_naming_it():
    with pytest.raises(preflight.PreflightError, match="unknown feature.*sk-lookup"):
        preflight.masked_features(["sk-lookup"], {})
    with pytest.raises(preflight.PreflightError, match="nope"):
        preflight.probe((), {preflight.MASK_ENV: "nope"})


def test_masked_features_are_failed_without_probing(monkeypatch):
    from meshcni.preflight import probes

    def must_not_run(*_args):
        raise AssertionError("a masked feature was probed")

    for fid in FEATURE_IDS:
        monkeypatch.setitem(probes.PROBES, fid, must_not_run)
    rep = preflight.probe(FEATURE_IDS, env={})
    assert [(r.feature, r.ok, r.masked, r.detail) for r in rep.results] == [
        (f, False, True, "masked by configuration") for f in FEATURE_IDS
    ]
    assert all(r.remedy == FEATURES[r.feature].remedy for r in rep.results)
    assert preflight.plan(rep).exit_code == EXIT_NO_CAPTURE


def test_a_feature_whose_need_failed_is_not_probed(monkeypatch):
    from meshcni.preflight import probes

    ran = []
    for fid in FEATURE_IDS:
        monkeypatch.setitem(probes.PROBES, fid, lambda *_a, fid=fid: ran.append(fid) or f"{fid} fine")
    rep = preflight.probe(["cgroup_v2"], env={})
    for dependent in ("cgroup_sock_addr", "sockops", "cgroup_getsockopt"):
        r = rep.result(dependent)
        assert (r.ok, r.masked, r.detail) == (False, False, "not probed: needs cgroup_v2")
        assert r.remedy == FEATURES["cgroup_v2"].remedy  # fix the need first
        assert dependent not in ran
    assert rep.ok("sk_lookup") and "sk_lookup" in ran
    assert (preflight.plan(rep).outbound, preflight.plan(rep).inbound) == (Mode.IPTABLES, Mode.EBPF)


def test_a_probe_that_raises_becomes_a_failed_result_with_the_remedy(monkeypatch):
    from meshcni.preflight import probes
    from meshcni.sys.errors import BpfError

    for fid in FEATURE_IDS:
        monkeypatch.setitem(probes.PROBES, fid, lambda *_a: "fine")

    def refused():
        raise BpfError("loading a program of type 30: Invalid argument", 22)

    monkeypatch.setitem(probes.PROBES, "sk_lookup", refused)
    r = preflight.probe((), env={}).result("sk_lookup")
    assert (r.ok, r.detail, r.remedy) == (False, "loading a program of type 30: Invalid argument",
                                          FEATURES["sk_lookup"].remedy)
