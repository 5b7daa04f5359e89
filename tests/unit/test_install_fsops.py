"""Atomic, lossless file replacement: modes kept, nothing written when unchanged, concurrent writers never lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from meshcni.install import fsops
from meshcni.install.errors import InvalidConfig


def test_update_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "a.conflist"
    path.write_bytes(b"one")
    path.chmod(0o640)
    assert fsops.update_file(path, lambda cur: cur + b"+two") == b"one+two"
    assert path.read_bytes() == b"one+two"
    assert (path.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["a.conflist"]


def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "a.conflist"
    path.write_bytes(b"same")
    before = path.stat()
    assert fsops.update_file(path, lambda cur: cur) is None
    assert fsops.update_file(path, lambda cur: None) is None
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_refusal_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "a.conflist"
    path.write_bytes(b"{bad")

    def refuse(cur: bytes | None) -> bytes:
        raise InvalidConfig(str(path), "bad")

    with pytest.raises(InvalidConfig):
        fsops.update_file(path, refuse)
    assert path.read_bytes() == b"{bad"


def test_create_uses_the_given_mode(tmp_path: Path) -> None:
    path = tmp_path / "new.conflist"
    assert fsops.update_file(path, lambda cur: b"x" if cur is None else None, create_mode=0o600) == b"x"
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_writer_landing_between_our_read_and_our_swap_is_merged_not_lost(tmp_path: Path) -> None:
    """The other writer renames its version in while `compute` runs (i.e. after our read, before our swap)."""
    path = tmp_path / "a.conflist"
    path.write_bytes(b"v1")
    seen: list[bytes | None] = []

    def compute(cur: bytes | None) -> bytes:
        seen.append(cur)
        if len(seen) == 1:
            other = tmp_path / "other.tmp"
            other.write_bytes(b"v2")
            os.rename(other, path)  # their atomic rewrite, racing ours
        return cur + b"+ours"

    assert fsops.update_file(path, compute) == b"v2+ours"
    assert seen == [b"v1", b"v2"]
    assert path.read_bytes() == b"v2+ours"
    assert sorted(os.listdir(tmp_path)) == ["a.conflist"]


def test_their_racing_version_is_put_back_verbatim_when_we_decline_it(tmp_path: Path) -> None:
    path = tmp_path / "a.conflist"
    path.write_bytes(b"v1")
    calls = []

    def compute(cur: bytes | None) -> bytes | None:
        calls.append(cur)
        if len(calls) == 1:
            other = tmp_path / "other.tmp"
            other.write_bytes(b"v2-already-fine")
            os.rename(other, path)
            return b"v1+ours"
        return None  # their new version needs nothing from us

    assert fsops.update_file(path, compute) is None
    assert path.read_bytes() == b"v2-already-fine"


def test_remove_if_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "x.conf"
    path.write_bytes(b"A")
    assert not fsops.remove_if_unchanged(path, b"B")
    assert path.read_bytes() == b"A"
    assert fsops.remove_if_unchanged(path, b"A")
    assert not path.exists()
    assert fsops.remove_if_unchanged(path, b"A")  # already gone
    assert os.listdir(tmp_path) == []


def test_an_older_version_never_replaces_a_newer_one_under_a_racing_writer(tmp_path: Path) -> None:
    """A writer renames in versions 1..N while another thread keeps appending our marker via update_file.

    Whatever the interleaving, the file must end as the writer's LAST version (with or without our marker,
    depending on who finished last): a stale read-modify-rename would resurrect an older version.
    """
    path = tmp_path / "a.conflist"
    path.write_bytes(b"v0")
    versions = 300
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(1, versions + 1):
                tmp = tmp_path / f"w{i}.tmp"
                tmp.write_bytes(b"v%d" % i)
                os.rename(tmp, path)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            done.set()

    def mark(cur: bytes | None) -> bytes | None:
        if cur is None or cur.endswith(b"+ours"):
            return None
        return cur + b"+ours"

    thread = threading.Thread(target=writer)
    thread.start()
    passes = 0
    while not done.is_set():
        fsops.update_file(path, mark)
        passes += 1
    thread.join()
    assert not errors
    assert passes > 0
    assert path.read_bytes() in (b"v%d" % versions, b"v%d+ours" % versions)
    assert fsops.update_file(path, mark) in (None, b"v%d+ours" % versions)
    assert path.read_bytes() == b"v%d+ours" % versions
    assert sorted(os.listdir(tmp_path)) == ["a.conflist"]


def test_write_atomic_skips_identical_content(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert fsops.write_atomic(path, b"x", 0o600)
    mtime = path.stat().st_mtime_ns
    assert not fsops.write_atomic(path, b"x", 0o600)
    assert path.stat().st_mtime_ns == mtime
    assert fsops.write_atomic(path, b"x", 0o644)  # a mode change is a change
    assert (path.stat().st_mode & 0o777) == 0o644


def test_their_racing_version_is_put_back_when_compute_fails_on_it(tmp_path: Path) -> None:
    path = tmp_path / "a.conflist"
    path.write_bytes(b"v1")
    calls = []

    def compute(cur: bytes | None) -> bytes:
        calls.append(cur)
        if len(calls) == 1:
            other = tmp_path / "other.tmp"
            other.write_bytes(b"v2")
            os.rename(other, path)
            return b"v1+ours"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        fsops.update_file(path, compute)
    assert path.read_bytes() == b"v2"
    assert sorted(os.listdir(tmp_path)) == ["a.conflist"]
