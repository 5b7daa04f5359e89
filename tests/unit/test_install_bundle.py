"""Installing the plugin into the bin dir: single file or one-dir bundle, atomic, idempotent, upgradable.

The real bundle is a PyInstaller one-dir build made elsewhere (dist/meshcni-cni/); these tests use small fake
bundles created in tmp: a shell script `meshcni` that reads a data file from its own `_internal/` (located
through its resolved path, as PyInstaller's bootloader does), so running `<bin-dir>/meshcni` proves the link
leads into a complete copy of the bundle.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from meshcni.install import bundle
from meshcni.install.errors import PluginSourceError

SCRIPT = """#!/bin/sh
here="$(dirname "$(readlink -f "$0")")"
echo "plugin $(cat "$here/_internal/version") args=$*"
"""


def make_bundle(root: Path, version: str) -> Path:
    (root / "_internal").mkdir(parents=True)
    (root / "_internal" / "version").write_text(version)
    (root / "_internal" / "libpython.so.1.0").write_bytes(b"\x7fELF fake")
    (root / "_internal" / "libpython.so").symlink_to("libpython.so.1.0")
    exe = root / "meshcni"
    exe.write_text(SCRIPT)
    exe.chmod(0o755)
    return root


def run_plugin(bin_dir: Path) -> str:
    return subprocess.run([str(bin_dir / "meshcni"), "ADD"], capture_output=True, text=True, check=True).stdout


def bundle_dirs(bin_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(bin_dir) if n.startswith(bundle.BUNDLE_PREFIX))


def test_bundle_is_copied_and_linked_relatively(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "dist" / "meshcni-cni", "1")
    bin_dir = tmp_path / "bin"
    record, changed = bundle.install(src, bin_dir)
    assert changed and record.kind == "bundle"
    entry = bin_dir / "meshcni"
    assert entry.is_symlink() and not os.readlink(entry).startswith("/")
    assert run_plugin(bin_dir) == "plugin 1 args=ADD\n"
    [copied] = bundle_dirs(bin_dir)
    assert (bin_dir / copied / "_internal" / "libpython.so").is_symlink()
    assert bundle.tree_digest(bin_dir / copied) == bundle.tree_digest(src) == record.digest
    # The link still works when the bin dir is seen at another path (the DaemonSet's /host/opt/cni/bin).
    moved = tmp_path / "host" / "opt-cni-bin"
    moved.parent.mkdir()
    os.rename(bin_dir, moved)
    assert run_plugin(moved) == "plugin 1 args=ADD\n"


def test_reinstall_of_the_same_bundle_changes_nothing(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "b", "1")
    bin_dir = tmp_path / "bin"
    bundle.install(src, bin_dir)
    [copied] = bundle_dirs(bin_dir)
    before = {p: os.lstat(p) for p in [bin_dir / "meshcni", bin_dir / copied, bin_dir / copied / "meshcni"]}
    _record, changed = bundle.install(src, bin_dir)
    assert not changed
    for p, st in before.items():
        now = os.lstat(p)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), p


def test_upgrade_swaps_the_link_and_keeps_only_the_previous_bundle(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    digests = []
    for version in ("1", "2", "3"):
        record, changed = bundle.install(make_bundle(tmp_path / f"v{version}", version), bin_dir)
        assert changed
        digests.append(record.digest[: bundle.DIGEST_CHARS])
        assert run_plugin(bin_dir) == f"plugin {version} args=ADD\n"
    # v1 is gone; v2 stays for a pod ADD that may still be running from it; v3 is current.
    assert bundle_dirs(bin_dir) == sorted(bundle.BUNDLE_PREFIX + d for d in digests[1:])


def test_damaged_copy_is_replaced(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "b", "1")
    bin_dir = tmp_path / "bin"
    bundle.install(src, bin_dir)
    [copied] = bundle_dirs(bin_dir)
    (bin_dir / copied / "_internal" / "version").write_text("corrupt")
    _record, changed = bundle.install(src, bin_dir)
    assert changed and run_plugin(bin_dir) == "plugin 1 args=ADD\n"
    assert bundle_dirs(bin_dir) == [copied]


def test_single_file_plugin(tmp_path: Path) -> None:
    src = tmp_path / "meshcni-plugin"
    src.write_text("#!/bin/sh\necho single\n")
    src.chmod(0o700)
    bin_dir = tmp_path / "bin"
    record, changed = bundle.install(src, bin_dir)
    entry = bin_dir / "meshcni"
    assert changed and record.kind == "file" and not entry.is_symlink()
    assert entry.read_bytes() == src.read_bytes() and (entry.stat().st_mode & 0o777) == 0o755
    mtime = entry.stat().st_mtime_ns
    assert bundle.install(src, bin_dir)[1] is False
    assert entry.stat().st_mtime_ns == mtime
    assert os.listdir(bin_dir) == ["meshcni"]


def test_switch_from_bundle_to_file_and_remove(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bundle.install(make_bundle(tmp_path / "b", "1"), bin_dir)
    src = tmp_path / "single"
    src.write_text("#!/bin/sh\necho single\n")
    src.chmod(0o755)
    record, _ = bundle.install(src, bin_dir)
    assert not (bin_dir / "meshcni").is_symlink()
    assert subprocess.run([str(bin_dir / "meshcni")], capture_output=True, text=True).stdout == "single\n"
    (bin_dir / "bridge").write_text("someone else's plugin")
    removed = bundle.remove(record)
    assert str(bin_dir / "meshcni") in removed
    assert os.listdir(bin_dir) == ["bridge"]


def test_file_replaced_by_someone_else_is_not_removed(tmp_path: Path) -> None:
    src = tmp_path / "single"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o755)
    record, _ = bundle.install(src, tmp_path / "bin")
    (tmp_path / "bin" / "meshcni").write_text("not ours any more")
    assert bundle.remove(record) == []
    assert (tmp_path / "bin" / "meshcni").read_text() == "not ours any more"


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no executable 'meshcni'"),
    (lambda p: p.write_text("data"), "not an executable file"),
])
def test_bad_sources_are_rejected(tmp_path: Path, setup, message: str) -> None:
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(PluginSourceError, match=message):
        bundle.install(src, tmp_path / "bin")
    assert not (tmp_path / "bin" / "meshcni").exists()
