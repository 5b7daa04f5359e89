"""Put the meshcni plugin into the CNI bin dir as `<bin-dir>/meshcni`, atomically and idempotently.

The plugin ships either as one executable file, copied to `<bin-dir>/meshcni` through a temp file and a rename,
or as a PyInstaller one-dir bundle (a directory with an executable `meshcni` and its `_internal/`). A bundle is
copied to `<bin-dir>/.meshcni-bundle-<digest>/` (digest of the whole tree, so a new build gets a new directory
and a half-copied one never has the final name), and `<bin-dir>/meshcni` becomes a *relative* symlink into it,
swapped with a rename. We chose the symlink over a launcher script because it needs nothing on the host (no
/bin/sh: some node OSes have none), costs no extra exec on every pod ADD, stays correct however the bin dir is
mounted (the DaemonSet sees it as /host/opt/cni/bin), and PyInstaller's bootloader (6.22, the one in our venv)
resolves the link to find `_internal/`: a symlinked one-dir build ran with sys.executable = its real path.

The bundle the link pointed to before an upgrade is kept until the next upgrade, because a pod ADD started a
moment earlier may still be loading modules from it; older ones are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from meshcni.install import fsops
from meshcni.install.errors import PluginSourceError
from meshcni.install.state import BinaryRecord, sha256

ENTRY_NAME = "meshcni"
BUNDLE_PREFIX = ".meshcni-bundle-"
BUNDLE_EXECUTABLE = "meshcni"
DIGEST_CHARS = 16


def tree_digest(root: Path) -> str:
    """SHA-256 over every path, type, permission bits, file content and link target under `root`."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                h.update(f"l {rel} {os.readlink(full)}\n".encode())
            elif stat.S_ISDIR(st.st_mode):
                h.update(f"d {rel}\n".encode())
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
                h.update(f"f {rel} {stat.S_IMODE(st.st_mode):o} {content}\n".encode())
            else:
                raise PluginSourceError(f"plugin bundle {root} contains {rel}, which is not a file, dir or link")
        # os.walk does not descend into symlinked dirs; they are recorded as links above, which is what we copy.
    return h.hexdigest()


def _is_executable_file(path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def check_source(source: Path) -> str:
    """Return "bundle" or "file" for a usable plugin source, or raise PluginSourceError saying what is wrong."""
    if not source.exists():
        raise PluginSourceError(f"plugin source {source} does not exist")
    if source.is_dir():
        if not _is_executable_file(source / BUNDLE_EXECUTABLE):
            raise PluginSourceError(
                f"plugin bundle {source} has no executable {BUNDLE_EXECUTABLE!r} at its top level")
        return "bundle"
    if not _is_executable_file(source):
        raise PluginSourceError(f"plugin source {source} is not an executable file")
    return "file"


def _current_link_target(entry: Path) -> str | None:
    try:
        return os.readlink(entry)
    except (FileNotFoundError, OSError):
        return None


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsops.fsync_dir(Path(dirpath))


def _place_bundle(source: Path, bin_dir: Path, digest: str) -> tuple[Path, bool]:
    final = bin_dir / f"{BUNDLE_PREFIX}{digest[:DIGEST_CHARS]}"
    if final.is_dir() and not final.is_symlink() and tree_digest(final) == digest:
        return final, False
    staging = fsops.temp_name(bin_dir, "meshcni-bundle")
    try:
        shutil.copytree(source, staging, symlinks=True)
        _fsync_tree(staging)
        if final.exists() or final.is_symlink():
            # Same name, different content: a damaged earlier copy. Move it off the final name first.
            damaged = fsops.temp_name(bin_dir, "meshcni-damaged")
            os.rename(final, damaged)
            shutil.rmtree(damaged, ignore_errors=True)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsops.fsync_dir(bin_dir)
    return final, True


def _point_entry_at(entry: Path, link_target: str) -> bool:
    if _current_link_target(entry) == link_target:
        return False
    tmp = fsops.temp_name(entry.parent, "meshcni-link")
    os.symlink(link_target, tmp)
    try:
        os.replace(tmp, entry)  # rename(2) swaps the link atomically; a runtime sees the old or the new one
    except BaseException:
        os.unlink(tmp)
        raise
    fsops.fsync_dir(entry.parent)
    return True


def _remove_bundles(bin_dir: Path, keep: set[str]) -> None:
    for name in os.listdir(bin_dir):
        if name.startswith(BUNDLE_PREFIX) and name not in keep:
            shutil.rmtree(bin_dir / name, ignore_errors=True)


def install(source: Path, bin_dir: Path) -> tuple[BinaryRecord, bool]:
    """Install the plugin; return the record of what is in place and whether anything on disk changed."""
    kind = check_source(source)
    try:
        bin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PluginSourceError(f"cannot create bin dir {bin_dir}: {exc.strerror}") from exc
    entry = bin_dir / ENTRY_NAME
    if entry.is_dir() and not entry.is_symlink():
        raise PluginSourceError(f"{entry} is a directory; refusing to replace it")
    previous = _current_link_target(entry)
    previous_bundle = previous.split("/", 1)[0] if previous and previous.startswith(BUNDLE_PREFIX) else None
    if kind == "bundle":
        digest = tree_digest(source)
        final, copied = _place_bundle(source, bin_dir, digest)
        relinked = _point_entry_at(entry, f"{final.name}/{BUNDLE_EXECUTABLE}")
        _remove_bundles(bin_dir, {final.name} | ({previous_bundle} if previous_bundle else set()))
        return BinaryRecord(str(entry), "bundle", digest, str(final)), copied or relinked
    data = source.read_bytes()
    written = fsops.write_atomic(entry, data, 0o755)
    _remove_bundles(bin_dir, {previous_bundle} if previous_bundle else set())
    return BinaryRecord(str(entry), "file", sha256(data)), written


def remove(record: BinaryRecord) -> list[str]:
    """Remove what `install` put in place (the entry only if it is still ours); return what was removed."""
    entry = Path(record.entry)
    bin_dir = entry.parent
    removed: list[str] = []
    if record.kind == "bundle":
        target = _current_link_target(entry)
        if target is not None and target.startswith(BUNDLE_PREFIX):
            os.unlink(entry)
            removed.append(str(entry))
    else:
        try:
            if not entry.is_symlink() and sha256(entry.read_bytes()) == record.digest:
                os.unlink(entry)
                removed.append(str(entry))
        except FileNotFoundError:
            pass
    if bin_dir.is_dir():
        for name in sorted(os.listdir(bin_dir)):
            if name.startswith(BUNDLE_PREFIX):
                shutil.rmtree(bin_dir / name, ignore_errors=True)
                removed.append(str(bin_dir / name))
        fsops.fsync_dir(bin_dir)
    return removed
