"""Rules for CNI network config files: validation, conversion, our entry, and which file is the primary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshcni.install import conflist
from meshcni.install.conflist import NoConfig, Primary, Refused
from meshcni.install.errors import InvalidConfig

ENTRY = conflist.plugin_entry("/run/agent.sock", "closed", "debug")
BRIDGE_LIST = {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}
BRIDGE_CONF = {"cniVersion": "0.4.0", "name": "net", "type": "bridge", "ipam": {"type": "host-local"}}


def dump(doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize("name,data,reason", [
    ("a.conflist", b"", "empty"),
    ("a.conflist", b"{not json", "not valid JSON"),
    ("a.conflist", b'{"name": "n", "plugins": [{"type": "x", "mtu": NaN}]}', "not valid JSON"),
    ("a.conflist", b"\xff\xfe{}", "not UTF-8"),
    ("a.conflist", b"[]", "not a JSON object"),
    ("a.conflist", dump({"plugins": [{"type": "bridge"}]}), 'missing "name"'),
    ("a.conflist", dump({"name": "n"}), '"plugins"'),
    ("a.conflist", dump({"name": "n", "plugins": []}), '"plugins"'),
    ("a.conflist", dump({"name": "n", "plugins": [{"type": "bridge"}, "x"]}), "plugins[1] is not a JSON object"),
    ("a.conflist", dump({"name": "n", "plugins": [{"mtu": 1}]}), 'plugins[0] has no "type"'),
    ("a.conflist", dump({"name": "n", "cniVersion": 1, "plugins": [{"type": "b"}]}), "cniVersion"),
    ("a.conflist", dump({"name": "n", "plugins": [{"type": "meshcni"}]}), "not a primary network"),
    ("a.conf", dump({"name": "n"}), 'has no "type"'),
    ("a.conf", dump({"type": "bridge"}), 'missing "name"'),
    ("a.json", dump({"name": "n", "plugins": [{"type": "bridge"}]}), 'has no "type"'),
    ("a.conf", dump({"name": "n", "type": "meshcni"}), "not a primary network"),
])
def test_invalid_configs_are_refused_with_the_reason(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        conflist.parse(name, data)
    assert reason in err.value.reason
    assert err.value.path == name


def test_single_plugin_config_is_wrapped_as_a_conflist_keeping_the_plugin_intact() -> None:
    doc = conflist.parse("10-bridge.conf", dump(BRIDGE_CONF))
    assert doc == {"cniVersion": "0.4.0", "name": "net", "plugins": [BRIDGE_CONF]}
    assert list(doc) == ["cniVersion", "name", "plugins"]


def test_entry_goes_last_exactly_once_even_if_already_present_elsewhere() -> None:
    doc = {"name": "n", "plugins": [{"type": "bridge"}, {"type": "meshcni", "old": 1}, {"type": "portmap"},
                                    {"type": "meshcni"}]}
    out = conflist.with_entry(doc, ENTRY)
    assert [p["type"] for p in out["plugins"]] == ["bridge", "portmap", "meshcni"]
    assert out["plugins"][-1] == ENTRY
    assert conflist.has_entry_last_once(out, ENTRY)
    assert conflist.with_entry(out, ENTRY) == out
    assert conflist.without_entry(out) == {"name": "n", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}
    assert doc["plugins"][1] == {"type": "meshcni", "old": 1}, "input must not be mutated"


def test_entry_carries_our_config_keys() -> None:
    assert ENTRY == {"type": "meshcni", "agentSocket": "/run/agent.sock", "failurePolicy": "closed",
                     "logLevel": "debug"}


def test_render_round_trips_and_only_writes_conflists() -> None:
    doc = conflist.with_entry(BRIDGE_LIST, ENTRY)
    data = conflist.render("x.conflist", doc)
    assert json.loads(data) == doc and data.endswith(b"\n")
    with pytest.raises(InvalidConfig):
        conflist.render("x.conf", doc)
    with pytest.raises(InvalidConfig):
        conflist.render("x.conflist", {"name": "n", "plugins": []})


def write(path: Path, doc: object | bytes) -> Path:
    path.write_bytes(doc if isinstance(doc, bytes) else dump(doc))
    return path


def test_primary_is_the_lexically_first_valid_file(tmp_path: Path) -> None:
    write(tmp_path / "20-other.conflist", BRIDGE_LIST)
    write(tmp_path / "10-bridge.conflist", BRIDGE_LIST)
    write(tmp_path / "05-notes.txt", b"ignored: not a config extension")
    (tmp_path / "00-dir.conf").mkdir()
    write(tmp_path / "01-broken.conf", b"{")
    choice = conflist.select_primary(tmp_path)
    assert isinstance(choice, Primary)
    assert choice.source == tmp_path / "10-bridge.conflist" and not choice.converted
    assert [(p.name, "not valid JSON" in why) for p, why in choice.skipped] == [("01-broken.conf", True)]


def test_conf_primary_targets_a_conflist_of_the_same_stem(tmp_path: Path) -> None:
    write(tmp_path / "10-bridge.conf", BRIDGE_CONF).chmod(0o640)
    choice = conflist.select_primary(tmp_path)
    assert isinstance(choice, Primary) and choice.converted
    assert choice.target == tmp_path / "10-bridge.conflist" and choice.mode == 0o640


def test_conversion_refused_when_it_would_overwrite_a_foreign_conflist(tmp_path: Path) -> None:
    write(tmp_path / "10-bridge.conf", BRIDGE_CONF)
    write(tmp_path / "10-bridge.conflist", BRIDGE_LIST)
    refused = conflist.select_primary(tmp_path)
    assert isinstance(refused, Refused) and refused.path.name == "10-bridge.conf"
    assert "would overwrite 10-bridge.conflist" in refused.reason
    ours = tmp_path / "10-bridge.conflist"
    choice = conflist.select_primary(tmp_path, managed_target=ours, managed_source=tmp_path / "10-bridge.conf")
    assert isinstance(choice, Primary) and choice.target == ours


def test_managed_file_turning_invalid_is_refused_not_skipped(tmp_path: Path) -> None:
    managed = write(tmp_path / "10-bridge.conflist", b'{"name": "n", "plugins": [')
    write(tmp_path / "20-other.conflist", BRIDGE_LIST)
    choice = conflist.select_primary(tmp_path, managed_target=managed, managed_source=managed)
    assert isinstance(choice, Refused) and choice.path == managed
    unmanaged = conflist.select_primary(tmp_path)
    assert isinstance(unmanaged, Primary) and unmanaged.source.name == "20-other.conflist"


def test_named_primary(tmp_path: Path) -> None:
    write(tmp_path / "10-bridge.conflist", BRIDGE_LIST)
    write(tmp_path / "50-mine.conf", BRIDGE_CONF)
    choice = conflist.select_primary(tmp_path, "50-mine.conf")
    assert isinstance(choice, Primary) and choice.target == tmp_path / "50-mine.conflist"
    assert isinstance(conflist.select_primary(tmp_path, "99-missing.conflist"), NoConfig)
    write(tmp_path / "60-bad.conflist", b"[]")
    refused = conflist.select_primary(tmp_path, "60-bad.conflist")
    assert isinstance(refused, Refused) and "not a JSON object" in refused.reason


def test_symlinked_config_is_not_edited(tmp_path: Path) -> None:
    real = write(tmp_path / "real.txt", BRIDGE_LIST)
    (tmp_path / "10-link.conflist").symlink_to(real)
    choice = conflist.select_primary(tmp_path, "10-link.conflist")
    assert isinstance(choice, Refused) and "symlink" in choice.reason


def test_missing_dir_means_no_config(tmp_path: Path) -> None:
    assert conflist.select_primary(tmp_path / "absent") == NoConfig()
