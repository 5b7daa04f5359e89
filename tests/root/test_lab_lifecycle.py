"""Root tests: `lab down` leaves the host exactly as `lab up` found it, is idempotent, and a failed or
interrupted `up` is rolled back (or fully removable by `down`).

"Nothing left" is checked against the host itself, not the lab's own bookkeeping: netns list, links,
processes by pid, the cgroup directory, the state directory, host iptables-save and ip_forward.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcni.cli.main import main as cli
from meshcni.lab import host
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabError, LabState, default_state_dir
from meshcni.sys import cgroup, proc

pytestmark = pytest.mark.root


def _iptables() -> list[str]:
    # Drop comments and packet counters; everything else (tables, chains, policies, rules) must be identical.
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        text = subprocess.run([cmd], capture_output=True, text=True, check=True).stdout
        out += [re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines() if not ln.startswith("#")]
    return out


def _host_snapshot() -> dict:
    return {"iptables": _iptables(), "ip_forward": host.read_ip_forward()}


def _assert_nothing_left(name: str, state: LabState | None, before: dict, pids: list[int] = ()) -> None:
    assert [n for n in host.netns_names() if n.startswith(f"mcni-lab-{name}-")] == []
    if state is not None:
        assert not host.link_exists(state.bridge), f"bridge {state.bridge} left behind"
    assert not (cgroup.unified_root() / f"meshcni-lab-{name}").exists()
    assert not default_state_dir(name).exists()
    for pid in pids:
        assert proc.state(pid) in (None, "Z"), f"process {pid} still runs"
    assert _iptables() == before["iptables"]
    assert host.read_ip_forward() == before["ip_forward"]


@pytest.fixture
def lab_name(unique_id):
    name = f"t-{unique_id}"
    yield name
    # Safety net for a failing test: whatever it left, remove it (down is idempotent).
    try:
        lab_core.down(name)
    except LabError:
        pass


def _pids(state: LabState) -> list[int]:
    return [ref.pid for pod in state.pods for ref in pod.processes.values()]


def test_down_removes_everything_up_created(lab_name):
    before = _host_snapshot()
    res = CliRunner().invoke(cli, ["lab", "up", "--name", lab_name, "--no-capture", "-o", "json"])
    assert res.exit_code == 0, res.output
    up = json.loads(res.output)
    state = LabState.load(up["state_dir"])
    pids = _pids(state)
    assert len(pids) == 6 and all(proc.state(p) not in (None, "Z") for p in pids)
    assert host.link_exists(state.bridge)
    assert list((Path(state.state_dir) / "ipam").rglob("10.233.*")), "host-local recorded no lease"
    # The lab's only host-side iptables change would be ipMasq, which is off.
    assert _iptables() == before["iptables"]

    res = CliRunner().invoke(cli, ["lab", "down", "--name", lab_name, "-o", "json"])
    assert res.exit_code == 0, res.output
    down = json.loads(res.output)
    assert down["errors"] == []
    assert f"bridge {state.bridge}" in down["removed"]
    _assert_nothing_left(lab_name, state, before, pids)


def test_down_twice_and_down_of_a_lab_that_never_existed_are_fine(lab_name):
    before = _host_snapshot()
    state = lab_core.up(lab_core.LabOptions(name=lab_name, pods=1, capture=False))
    first = lab_core.down(lab_name)
    assert first.errors == [] and first.removed
    second = lab_core.down(lab_name)
    assert second.to_dict() == {"removed": [], "notes": [], "errors": []}
    res = CliRunner().invoke(cli, ["lab", "down", "--name", lab_name])
    assert res.exit_code == 0 and "nothing to remove" in res.output
    _assert_nothing_left(lab_name, state, before)


def test_up_refuses_an_existing_lab_and_changes_nothing(lab_name):
    state = lab_core.up(lab_core.LabOptions(name=lab_name, pods=1, capture=False))
    with pytest.raises(LabError, match="already exists"):
        lab_core.up(lab_core.LabOptions(name=lab_name, pods=1, capture=False))
    assert lab_core.status(LabState.load(state.state_dir))["healthy"] is True


def test_failed_cni_add_on_a_missing_chained_plugin_rolls_back(lab_name):
    before = _host_snapshot()
    bridges_before = set(host.lab_bridges())
    res = CliRunner().invoke(
        cli, ["lab", "up", "--name", lab_name, "--no-capture", "--chain-plugin", "mcni-no-such-plugin", "-o", "json"]
    )
    assert res.exit_code == 1
    err = json.loads(res.output)["error"]
    assert "mcni-no-such-plugin" in err and "rolled back" in err
    # The bridge plugin had already succeeded for pod a (veth, IP lease, bridge): all of it must be gone.
    _assert_nothing_left(lab_name, None, before)
    assert set(host.lab_bridges()) <= bridges_before


def test_failure_after_processes_started_rolls_back(lab_name, monkeypatch):
    before = _host_snapshot()
    started: list[int] = []
    real_start = podproc.start

    def start_then_fail(state, pod, peer, timeout):
        if pod.index == 1:
            raise LabError("injected failure while starting pod b")
        real_start(state, pod, peer, timeout)
        started.extend(ref.pid for ref in pod.processes.values())
        bridges.append(state.bridge)

    bridges: list[str] = []
    monkeypatch.setattr(podproc, "start", start_then_fail)
    with pytest.raises(LabError, match="injected failure.*rolled back"):
        lab_core.up(lab_core.LabOptions(name=lab_name, capture=False))
    assert len(started) == 3
    assert not host.link_exists(bridges[0])
    _assert_nothing_left(lab_name, None, before, started)


def test_down_cleans_up_after_an_up_that_died_half_way(lab_name, monkeypatch):
    """An `up` killed mid-way never rolls back; a later `down` must still find and remove everything."""
    before = _host_snapshot()
    real_start = podproc.start

    def start_then_die(state, pod, peer, timeout):
        real_start(state, pod, peer, timeout)
        raise KeyboardInterrupt  # as if the operator hit Ctrl-C right after pod a's processes started

    monkeypatch.setattr(podproc, "start", start_then_die)
    monkeypatch.setattr(lab_core, "teardown", lambda state: lab_core.DownReport())  # the process "died"
    with pytest.raises(KeyboardInterrupt):
        lab_core.up(lab_core.LabOptions(name=lab_name, capture=False))
    monkeypatch.undo()

    state = LabState.load(default_state_dir(lab_name))
    assert state is not None and state.phase == "creating"
    pids = _pids(state)
    assert len(pids) == 3 and host.link_exists(state.bridge)
    res = CliRunner().invoke(cli, ["lab", "status", "--name", lab_name, "-o", "json"])
    assert res.exit_code == 1 and json.loads(res.output)["healthy"] is False

    report = lab_core.down(lab_name)
    assert report.errors == []
    _assert_nothing_left(lab_name, state, before, pids)


def test_bad_options_are_clean_errors_not_tracebacks(lab_name):
    for args, fragment in (
        (["--pods", "0"], "--pods"),
        (["--proxy-http-ports", "80,x"], "--proxy-http-ports"),
        (["--chain-plugin", "{not json"], "--chain-plugin"),
    ):
        res = CliRunner().invoke(cli, ["lab", "up", "--name", lab_name, "--no-capture", *args])
        assert res.exit_code == 1, res.output
        assert fragment in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["lab", "up", "--name", "Bad_Name", "--no-capture"])
    assert res.exit_code == 1 and "lab name" in res.output
    assert not default_state_dir(lab_name).exists()
