"""The installer end to end on real files and real threads: insert, idempotence, conversion, refusal, waiting,
drift repair under a running watcher, and uninstall (byte-for-byte restore, or keeping the owner's changes).

The plugin installed here is a small fake executable script created in tmp; the real plugin bundle is a
PyInstaller build made elsewhere. No test asserts on time: each waits (bounded) for a state, then asserts it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from meshcni.install import Installer, InstallError, InstallOptions
from meshcni.install.conflist import plugin_entry
from meshcni.install.log import LOGGER_NAME

ENTRY = plugin_entry("/var/run/meshcni/cni.sock", "closed", "info")  # the defaults
# Deliberately not how json.dumps would write it (tabs, key order, no final newline): a byte-for-byte
# restore must give back exactly this.
BRIDGE_CONFLIST = (b'{\n\t"name": "k8s-pod-network",\t"cniVersion": "0.3.1",\n\t"plugins": [\n'
                   b'\t\t{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", '
                   b'"ranges": [[{"subnet": "10.85.0.0/16"}]]}},\n\t\t{"type": "portmap", '
                   b'"capabilities": {"portMappings": true}}\n\t]\n}')
BRIDGE_CONF = b'{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"}\n'


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> object:
    """Poll until `predicate()` is truthy; fail naming `what` if it never is within the (generous) bound."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A fake node layout: conf dir, bin dir (with someone else's plugin), state dir, and a fake plugin."""
    (tmp_path / "net.d").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "bridge").write_text("someone else's plugin")
    plugin = tmp_path / "fake-meshcni"
    plugin.write_text("#!/bin/sh\necho fake meshcni plugin\n")
    plugin.chmod(0o755)
    return tmp_path


def options(node: Path, **overrides) -> InstallOptions:
    base = dict(conf_dir=node / "net.d", bin_dir=node / "bin", state_dir=node / "state",
                plugin_source=node / "fake-meshcni")
    base.update(overrides)
    return InstallOptions(**base)


def read_doc(path: Path) -> dict:
    return json.loads(path.read_bytes())


def plugin_types(path: Path) -> list[str]:
    return [p["type"] for p in read_doc(path)["plugins"]]


def has_entry_once_last(path: Path) -> bool:
    try:
        plugins = read_doc(path)["plugins"]
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return sum(p.get("type") == "meshcni" for p in plugins) == 1 and plugins[-1] == ENTRY


@pytest.fixture
def watching(node: Path) -> Iterator[Callable[..., Installer]]:
    """Start `Installer.run(watch=True)` in a thread; always stopped (and so uninstalled) at teardown."""
    started: list[tuple[Installer, threading.Thread, list]] = []

    def start(**overrides) -> Installer:
        installer = Installer(options(node, **overrides))
        failures: list[BaseException] = []

        def target() -> None:
            try:
                installer.run(watch=True)
            except BaseException as exc:  # reported at teardown
                failures.append(exc)

        thread = threading.Thread(target=target, name="installer", daemon=True)
        thread.start()
        started.append((installer, thread, failures))
        return installer

    yield start
    for installer, thread, failures in started:
        installer.stop()
        thread.join(30)
        assert not thread.is_alive(), "installer did not stop"
        assert not failures, failures


@pytest.fixture
def install_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    return caplog


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- install -----------------------------------------------------------------------------------------------


def test_insert_appends_our_entry_last_and_installs_the_binary(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    assert Installer(options(node)).run(watch=False) == "inserted"
    assert plugin_types(primary) == ["bridge", "portmap", "meshcni"]
    assert read_doc(primary)["plugins"][-1] == ENTRY
    original = json.loads(BRIDGE_CONFLIST)
    assert {k: v for k, v in read_doc(primary).items() if k != "plugins"} == \
        {k: v for k, v in original.items() if k != "plugins"}
    assert (node / "bin" / "meshcni").read_bytes() == (node / "fake-meshcni").read_bytes()
    assert os.access(node / "bin" / "meshcni", os.X_OK)


def test_rerun_changes_no_byte_and_no_mtime(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    watched = [primary, node / "bin" / "meshcni", node / "state" / "state.json", node / "state" / "primary.orig"]
    before = {p: (p.read_bytes(), os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in watched}
    listing = sorted(os.listdir(node / "net.d")), sorted(os.listdir(node / "bin"))
    assert Installer(options(node)).run(watch=False) == "unchanged"
    assert {p: (p.read_bytes(), os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in watched} == before
    assert (sorted(os.listdir(node / "net.d")), sorted(os.listdir(node / "bin"))) == listing


def test_changed_flags_update_our_entry_in_place(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    Installer(options(node, failure_policy="closed", agent_socket="/run/x.sock")).run(watch=False)
    assert plugin_types(primary) == ["bridge", "portmap", "meshcni"]
    assert read_doc(primary)["plugins"][-1] == plugin_entry("/run/x.sock", "closed", "info")
    Installer(options(node)).uninstall()
    assert primary.read_bytes() == BRIDGE_CONFLIST  # the backup is still the owner's first version


def test_conf_is_converted_to_a_conflist(node: Path) -> None:
    conf = node / "net.d" / "10-bridge.conf"
    conf.write_bytes(BRIDGE_CONF)
    conf.chmod(0o600)
    Installer(options(node)).run(watch=False)
    converted = node / "net.d" / "10-bridge.conflist"
    assert os.listdir(node / "net.d") == ["10-bridge.conflist"]
    assert read_doc(converted) == {"cniVersion": "0.4.0", "name": "bridge-net",
                                   "plugins": [json.loads(BRIDGE_CONF), ENTRY]}
    assert (converted.stat().st_mode & 0o777) == 0o600
    assert Installer(options(node)).run(watch=False) == "unchanged"


def test_invalid_primary_is_refused_and_left_untouched(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    bad = b'{"name": "k8s", "plugins": [{"bridge": "cni0"}]}'
    primary.write_bytes(bad)
    mtime = primary.stat().st_mtime_ns
    with pytest.raises(InstallError, match="no valid CNI network config"):
        Installer(options(node)).run(watch=False)
    assert primary.read_bytes() == bad and primary.stat().st_mtime_ns == mtime
    with pytest.raises(InstallError, match="invalid; not edited"):
        Installer(options(node, conf_name="10-bridge.conflist")).run(watch=False)
    assert primary.read_bytes() == bad and primary.stat().st_mtime_ns == mtime


def test_watcher_refuses_invalid_primary_says_why_and_inserts_once_fixed(
        node: Path, watching, install_logs) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(b'{"name": "k8s", "plugins": [')
    installer = watching(conf_name="10-bridge.conflist")
    wait_for(lambda: messages(install_logs, "refusing to edit invalid CNI config"), "refusal log")
    [refusal] = messages(install_logs, "refusing to edit invalid CNI config")
    assert "not valid JSON" in refusal.fields["reason"]
    assert primary.read_bytes() == b'{"name": "k8s", "plugins": ['
    tmp = node / "net.d" / "fix.tmp"
    tmp.write_bytes(BRIDGE_CONFLIST)
    os.rename(tmp, primary)
    wait_for(lambda: has_entry_once_last(primary), "entry after the fix")
    assert installer.reinsertions == 0  # the first insertion is not a repair
    assert len(messages(install_logs, "refusing to edit invalid CNI config")) == 1  # said once, not per pass


def test_waits_for_a_config_that_appears_later(node: Path, watching, install_logs) -> None:
    conf_dir = node / "late" / "net.d"  # does not even exist yet
    watching(conf_dir=conf_dir)
    wait_for(lambda: messages(install_logs, "waiting for a valid CNI network config"), "waiting log")
    wait_for(lambda: (node / "bin" / "meshcni").exists(), "binary installed while waiting")
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    converted = conf_dir / "10-bridge.conflist"
    wait_for(lambda: has_entry_once_last(converted) and not (conf_dir / "10-bridge.conf").exists(),
             "converted conflist with our entry")
    assert len(messages(install_logs, "waiting for a valid CNI network config")) == 1


def test_failed_binary_install_never_inserts_the_entry(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    with pytest.raises(InstallError, match="does not exist"):
        Installer(options(node, plugin_source=node / "missing")).run(watch=False)
    assert primary.read_bytes() == BRIDGE_CONFLIST


# -- drift -------------------------------------------------------------------------------------------------


def rewrite_atomically(path: Path, doc: dict, tag: str) -> None:
    """How a primary CNI rewrites its config: write a temp file, rename it over (like most CNIs do)."""
    tmp = path.parent / f".{tag}.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.rename(tmp, path)


def their_doc(rev: str) -> dict:
    return {"cniVersion": "0.3.1", "name": "k8s-pod-network",
            "plugins": [{"type": "bridge", "rev": rev}, {"type": "portmap"}]}


class ValidityReader(threading.Thread):
    """Reads the primary in a loop and records every read that is not a valid conflist."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop, self.reads, self.bad = path, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                self.bad.append(b"<missing>")
                continue
            try:
                doc = json.loads(data)
                assert isinstance(doc["plugins"], list) and doc["plugins"]
            except (ValueError, KeyError, AssertionError):
                self.bad.append(data)
            self.reads += 1


@pytest.mark.parametrize("watch_mode", ["inotify", "poll"])
def test_drift_is_repaired_every_time_and_the_file_is_always_valid(
        node: Path, watching, install_logs, watch_mode: str) -> None:
    primary = node / "net.d" / "10-calico.conflist"
    primary.write_bytes(json.dumps(their_doc("initial")).encode())
    installer = watching(watch_mode=watch_mode)
    wait_for(lambda: has_entry_once_last(primary), "initial insertion")
    reader = ValidityReader(primary)
    reader.start()
    try:
        # 20 rewrites one after the other: each one repaired exactly once, their content kept.
        for i in range(20):
            rewrite_atomically(primary, their_doc(f"seq-{i}"), "seq")
            wait_for(lambda: has_entry_once_last(primary), f"re-insertion after rewrite {i}")
            assert read_doc(primary)["plugins"][:-1] == their_doc(f"seq-{i}")["plugins"]
        # The counter moves just after the repaired file becomes visible, so wait for it, then pin it.
        wait_for(lambda: installer.reinsertions >= 20, "20 re-insertions counted")
        assert installer.reinsertions == 20
        assert len(messages(install_logs, "re-inserted meshcni entry")) == 20

        # Then two threads rewrite concurrently, 10 times each; renames are serialized only so the test
        # knows which version landed last.
        last_lock = threading.Lock()
        landed: list[str] = []
        errors: list[BaseException] = []

        def rewriter(name: str) -> None:
            try:
                for i in range(10):
                    with last_lock:
                        rewrite_atomically(primary, their_doc(f"{name}-{i}"), name)
                        landed.append(f"{name}-{i}")
                    wait_for(lambda: has_entry_once_last(primary), f"entry back after {name}-{i}")
                    rev = read_doc(primary)["plugins"][0].get("rev", "")
                    assert rev.startswith(("a-", "b-")), rev  # never an older sequential version
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=rewriter, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        # The last rewrite must win. (A repair racing a rewrite may show an older version with our entry for
        # the microseconds between its two swaps; it is then merged with the newer one, never left in place.)
        wait_for(lambda: has_entry_once_last(primary)
                 and read_doc(primary)["plugins"][:-1] == their_doc(landed[-1])["plugins"],
                 f"final state: last rewrite {landed[-1]} plus our entry")
        wait_for(lambda: len(messages(install_logs, "re-inserted meshcni entry")) == installer.reinsertions > 20,
                 "re-insertions of the concurrent phase counted and logged")
        assert 20 < installer.reinsertions <= 40  # at most one repair per rewrite
    finally:
        reader.stop.set()
        reader.join(10)
    assert reader.reads > 0
    assert reader.bad == []
    assert sorted(os.listdir(node / "net.d")) == ["10-calico.conflist"]  # no temp files left behind


def test_in_place_rewrites_are_repaired_too(node: Path, watching) -> None:
    """Some tools truncate and rewrite the file itself (no rename); IN_CLOSE_WRITE catches those."""
    primary = node / "net.d" / "10-calico.conflist"
    primary.write_bytes(json.dumps(their_doc("initial")).encode())
    installer = watching(watch_mode="inotify")
    wait_for(lambda: has_entry_once_last(primary), "initial insertion")
    for i in range(10):
        with open(primary, "w") as f:
            f.write(json.dumps(their_doc(f"inplace-{i}")))
        wait_for(lambda: has_entry_once_last(primary)
                 and read_doc(primary)["plugins"][0]["rev"] == f"inplace-{i}", f"repair {i}")
    wait_for(lambda: installer.reinsertions >= 10, "10 re-insertions counted")
    assert installer.reinsertions == 10


def test_rewritten_conf_is_converted_again(node: Path, watching) -> None:
    conf = node / "net.d" / "10-flannel.conf"
    conf.write_bytes(BRIDGE_CONF)
    installer = watching()
    converted = node / "net.d" / "10-flannel.conflist"
    wait_for(lambda: has_entry_once_last(converted) and not conf.exists(), "first conversion")
    newer = BRIDGE_CONF.replace(b"cni0", b"cni1")
    conf.write_bytes(newer)  # the owner writes its .conf again; it sorts before our .conflist
    wait_for(lambda: not conf.exists() and has_entry_once_last(converted)
             and read_doc(converted)["plugins"][0]["bridge"] == "cni1", "re-conversion")
    wait_for(lambda: installer.reinsertions >= 1, "re-conversion counted")
    assert installer.reinsertions == 1
    installer.stop()
    wait_for(lambda: conf.exists() and not converted.exists(), "uninstall on stop")
    assert conf.read_bytes() == newer  # their latest version comes back, not the first one


def test_entry_moves_when_a_new_primary_sorts_first(node: Path, watching) -> None:
    old = node / "net.d" / "20-bridge.conflist"
    old.write_bytes(BRIDGE_CONFLIST)
    watching()
    wait_for(lambda: has_entry_once_last(old), "insertion into the first primary")
    new = node / "net.d" / "05-cilium.conflist"
    rewrite_atomically(new, their_doc("cilium"), "cilium")
    wait_for(lambda: has_entry_once_last(new) and old.read_bytes() == BRIDGE_CONFLIST, "entry moved")


# -- uninstall ---------------------------------------------------------------------------------------------


def test_uninstall_restores_the_primary_byte_for_byte(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    primary.chmod(0o640)
    Installer(options(node)).run(watch=False)
    assert primary.read_bytes() != BRIDGE_CONFLIST
    Installer(options(node)).uninstall()
    assert primary.read_bytes() == BRIDGE_CONFLIST
    assert (primary.stat().st_mode & 0o777) == 0o640
    assert os.listdir(node / "bin") == ["bridge"]
    assert os.listdir(node / "state") == []
    Installer(options(node)).uninstall()  # a second uninstall is a no-op
    assert primary.read_bytes() == BRIDGE_CONFLIST


def test_uninstall_keeps_changes_made_after_us(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    doc = read_doc(primary)
    doc["plugins"].insert(2, {"type": "bandwidth", "capabilities": {"bandwidth": True}})
    doc["cniVersion"] = "1.0.0"
    primary.write_text(json.dumps(doc))
    Installer(options(node)).uninstall()
    after = read_doc(primary)
    assert [p["type"] for p in after["plugins"]] == ["bridge", "portmap", "bandwidth"]
    assert after["cniVersion"] == "1.0.0"
    assert os.listdir(node / "bin") == ["bridge"]


def test_uninstall_restores_a_converted_conf(node: Path) -> None:
    conf = node / "net.d" / "10-bridge.conf"
    conf.write_bytes(BRIDGE_CONF)
    conf.chmod(0o640)
    Installer(options(node)).run(watch=False)
    Installer(options(node)).uninstall()
    assert os.listdir(node / "net.d") == ["10-bridge.conf"]
    assert conf.read_bytes() == BRIDGE_CONF and (conf.stat().st_mode & 0o777) == 0o640


def test_uninstall_without_a_record_still_removes_our_entry(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    for name in os.listdir(node / "state"):
        os.unlink(node / "state" / name)  # the record is lost (e.g. state dir not on a hostPath)
    Installer(options(node)).uninstall()
    assert plugin_types(primary) == ["bridge", "portmap"]


def test_entry_that_cannot_be_removed_keeps_the_binary(node: Path) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    broken = primary.read_bytes()[:-20]  # someone leaves the file half-written, our entry still in it
    primary.write_bytes(broken)
    with pytest.raises(InstallError, match="left in place"):
        Installer(options(node)).uninstall()
    assert primary.read_bytes() == broken
    assert (node / "bin" / "meshcni").exists()


def test_unreadable_install_record_is_moved_aside_not_fatal(node: Path, install_logs) -> None:
    primary = node / "net.d" / "10-bridge.conflist"
    primary.write_bytes(BRIDGE_CONFLIST)
    Installer(options(node)).run(watch=False)
    (node / "state" / "state.json").write_text("{truncated")
    installer = Installer(options(node))
    assert messages(install_logs, "ignoring unreadable install record")
    assert any(n.startswith("state.json.unreadable-") for n in os.listdir(node / "state"))
    installer.uninstall()
    assert plugin_types(primary) == ["bridge", "portmap"]  # entry found and removed without the record
