"""The pod registry's journal: what a restarted agent reads back, whatever state the last one left it in."""

from __future__ import annotations

import json

import pytest

from meshcni.agent import registry as reg
from meshcni.agent.registry import JOURNAL, PodRecord, Registry, read_journal


def record(i: int, **changes) -> PodRecord:
    r = PodRecord(container_id=f"c-{i}", netns=f"/var/run/netns/p{i}", ips=[f"10.0.0.{i}"], pod_name=f"p{i}",
                  pod_namespace="default", config={"mode": "ebpf", "exclude_inbound_ports": [15020]})
    for key, value in changes.items():
        setattr(r, key, value)
    return r


def reopen(tmp_path) -> tuple[Registry, list[PodRecord]]:
    fresh = Registry(tmp_path)
    return fresh, fresh.load()


def test_changes_survive_a_restart(tmp_path):
    r = Registry(tmp_path)
    r.load()
    for i in range(5):
        r.put(record(i))
    r.put(record(2, phase="captured", slot=7))
    r.remove("c-4")
    r.remove("c-never-there")  # a DEL for a pod we never had changes nothing
    r.close()

    fresh, loaded = reopen(tmp_path)
    assert sorted(p.container_id for p in loaded) == ["c-0", "c-1", "c-2", "c-3"]
    assert fresh.get("c-2").to_dict() == record(2, phase="captured", slot=7, added_at=fresh.get("c-2").added_at).to_dict()
    assert fresh.skipped == []


def test_a_record_is_on_disk_as_soon_as_put_returns(tmp_path):
    r = Registry(tmp_path)
    r.load()
    r.put(record(1))
    records, _, problems = read_journal(tmp_path / JOURNAL)  # another reader, the agent still running
    assert list(records) == ["c-1"] and problems == []
    r.remove("c-1")
    assert read_journal(tmp_path / JOURNAL)[0] == {}
    r.close()


def test_a_torn_last_line_is_dropped_and_reported(tmp_path):
    r = Registry(tmp_path)
    r.load()
    r.put(record(1))
    r.put(record(2))
    r.close()
    with open(tmp_path / JOURNAL, "ab") as f:
        f.write(b'{"container_id":"c-3","netns":"/var/ru')  # the agent died inside a write
    fresh, loaded = reopen(tmp_path)
    assert sorted(p.container_id for p in loaded) == ["c-1", "c-2"]
    assert len(fresh.skipped) == 1 and "torn" in fresh.skipped[0]
    assert not (tmp_path / (JOURNAL + ".corrupt")).exists()
    fresh.put(record(3))  # appends after the clean compacted journal, not onto the torn bytes
    assert sorted(reopen(tmp_path)[0].all(), key=lambda p: p.container_id)[-1].container_id == "c-3"


def test_a_corrupt_line_is_reported_and_its_journal_kept_aside(tmp_path):
    good = json.dumps(record(1).to_dict())
    later = json.dumps(record(2).to_dict())
    (tmp_path / JOURNAL).write_text(f"{good}\nnot json at all\n{later}\n")
    fresh, loaded = reopen(tmp_path)
    assert sorted(p.container_id for p in loaded) == ["c-1", "c-2"]
    assert len(fresh.skipped) == 1 and "line 2" in fresh.skipped[0]
    assert "not json at all" in (tmp_path / (JOURNAL + ".corrupt")).read_text()  # kept for a human
    assert read_journal(tmp_path / JOURNAL)[2] == []  # the journal in use is clean again


def test_the_journal_stays_bounded_under_churn(tmp_path, monkeypatch):
    monkeypatch.setattr(reg, "COMPACT_FLOOR", 16)
    r = Registry(tmp_path)
    r.load()
    for i in range(3):
        r.put(record(i))
    for n in range(500):  # a pod added and deleted over and over, plus updates to the steady ones
        r.put(record(99, phase="adding"))
        r.put(record(99, phase="captured"))
        r.remove("c-99")
        r.put(record(n % 3, slot=n))
        _, lines, _ = read_journal(tmp_path / JOURNAL)
        assert lines <= reg.COMPACT_FLOOR + reg.COMPACT_RATIO * 4 + 1
    r.close()
    fresh, loaded = reopen(tmp_path)
    assert sorted(p.container_id for p in loaded) == ["c-0", "c-1", "c-2"]
    assert [fresh.get(f"c-{i}").slot for i in range(3)] == [498, 499, 497]


def test_records_of_the_file_per_pod_layout_are_folded_in(tmp_path):
    legacy = tmp_path / "pods"
    legacy.mkdir()
    (legacy / "c-1.json").write_text(json.dumps(record(1).to_dict()))
    (legacy / "c-2.json").write_text(json.dumps(record(2, slot=3).to_dict()))
    (legacy / "c-9.json").write_text("{broken")
    (legacy / ".c-5.tmp").write_text("half")  # a write that died before its rename
    fresh, loaded = reopen(tmp_path)
    assert sorted(p.container_id for p in loaded) == ["c-1", "c-2"]
    assert fresh.get("c-2").slot == 3
    assert len(fresh.skipped) == 1 and "c-9.json" in fresh.skipped[0]
    assert sorted(p.name for p in legacy.iterdir()) == ["c-9.corrupt"]  # the unreadable one is kept
    assert sorted(read_journal(tmp_path / JOURNAL)[0]) == ["c-1", "c-2"]


def test_a_failed_write_names_the_pod_and_changes_nothing(tmp_path):
    r = Registry(tmp_path)
    r.load()
    r.put(record(1))
    r.close()
    (tmp_path / JOURNAL).rename(tmp_path / "elsewhere")
    (tmp_path / JOURNAL).mkdir()  # the journal path is unusable: open fails
    with pytest.raises(reg.SysError, match="c-2"):
        r.put(record(2))
    assert r.get("c-2") is None
