"""Root tests: the preflight probes run for real on this kernel, and `meshcni doctor` reports them.

This machine (kernel 6.18, bcc 0.26, headers linked by scripts/setup.sh, nft iptables) has every feature,
so every probe must pass; masking one must make the doctor exit 1 and name it. The probes create scratch
cgroups and pins of their own: the tests also check that none survives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcni import preflight
from meshcni.cli.main import main
from meshcni.config import Mode
from meshcni.preflight.features import FEATURE_IDS
from meshcni.sys import cgroup as cgroups

pytestmark = pytest.mark.root


def _leftovers() -> list[str]:
    cgroup_root = cgroups.unified_root()
    found = [str(p) for p in cgroup_root.glob("meshcni-preflight-*")]
    found += [str(p) for p in Path("/sys/fs/bpf").glob("meshcni-preflight-*")]
    return found


@pytest.fixture
def no_leftovers():
    before = set(_leftovers())
    yield
    assert sorted(set(_leftovers()) - before) == []


def test_every_probe_passes_on_this_kernel(no_leftovers):
    report = preflight.probe(env={})
    assert [(r.feature, r.ok) for r in report.results if not r.ok] == []
    assert [r.feature for r in report.results] == list(FEATURE_IDS)
    plan = preflight.plan(report)
    assert (plan.outbound, plan.inbound, plan.splice, plan.degraded) == (Mode.EBPF, Mode.EBPF, True, [])


def test_doctor_json_parses_and_exits_0(no_leftovers):
    result = CliRunner().invoke(main, ["doctor", "-o", "json"], env={preflight.MASK_ENV: ""})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [f["feature"] for f in data["features"]] == list(FEATURE_IDS)
    assert all(f["ok"] and f["remedy"] is None for f in data["features"])
    assert data["plan"] == {"outbound": "ebpf", "inbound": "ebpf", "splice": True, "full": True, "degraded": []}
    assert data["exit_code"] == 0


def test_masked_sk_lookup_exits_1_and_names_it(no_leftovers):
    result = CliRunner().invoke(main, ["doctor", "--mask", "sk_lookup"], env={preflight.MASK_ENV: ""})
    assert result.exit_code == 1, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("sk_lookup "))
    assert row.split()[1:3] == ["FAILED", "masked"]
    assert "remedy: kernel >= 5.9" in result.output
    assert "plan: outbound ebpf, inbound iptables" in result.output
    assert "degraded: inbound by iptables: eBPF needs sk_lookup (masked by configuration)" in result.output


def test_masking_through_the_environment_in_a_real_process(no_leftovers):
    proc = subprocess.run(
        [sys.executable, "-c", "from meshcni.cli.main import main; main()", "doctor", "-o", "json"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", preflight.MASK_ENV: "cgroup_v2"},
    )
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    by_id = {f["feature"]: f for f in data["features"]}
    assert by_id["cgroup_v2"]["masked"] is True
    assert by_id["sockops"]["detail"] == "not probed: needs cgroup_v2"
    assert (data["plan"]["outbound"], data["plan"]["inbound"]) == ("iptables", "ebpf")


def test_nothing_can_capture_exits_2():
    result = CliRunner().invoke(main, ["doctor", "-o", "json", "--mask", "bpf_syscall", "--mask", "iptables"],
                                env={preflight.MASK_ENV: ""})
    assert result.exit_code == 2
    data = json.loads(result.output)
    assert (data["plan"]["outbound"], data["plan"]["inbound"]) == ("off", "off")
    assert data["verdict"] == "nothing can capture"


def test_unknown_mask_is_a_json_error():
    result = CliRunner().invoke(main, ["doctor", "-o", "json", "--mask", "sk-lookup"], env={preflight.MASK_ENV: ""})
    assert result.exit_code == 3
    assert "sk-lookup" in json.loads(result.output)["error"]


def test_doctor_lists_the_hook_programs_and_a_cgroup_it_cannot_read_does_not_change_the_verdict(no_leftovers):
    missing = str(cgroups.unified_root() / "meshcni-no-such-cgroup")
    result = CliRunner().invoke(main, ["doctor", "-o", "json", "--cgroup", missing], env={preflight.MASK_ENV: ""})
    assert result.exit_code == 0, result.output
    hooks = json.loads(result.output)["hooks"]
    assert hooks["programs"] == [] and "cannot open cgroup" in hooks["error"]

    result = CliRunner().invoke(main, ["doctor", "--cgroup", missing], env={preflight.MASK_ENV: ""})
    assert result.exit_code == 0
    assert "programs on meshcni's cgroup hooks: not listed (cannot open cgroup" in result.output


def test_a_netns_doctor_cannot_open_is_reported_without_changing_the_verdict(no_leftovers):
    result = CliRunner().invoke(main, ["doctor", "-o", "json", "--netns", "/var/run/netns/meshcni-no-such-netns"],
                                env={preflight.MASK_ENV: ""})
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.output)["netns_hooks"]
    assert listed["programs"] == [] and "cannot open network namespace" in listed["error"]
