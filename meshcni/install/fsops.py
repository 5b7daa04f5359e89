"""Crash-safe, race-safe file replacement for files other programs write too (CNI configs, the bin dir).

Every write goes to a temp file in the same directory, is fsync'ed, given the original mode and owner, and
renamed into place; the directory is fsync'ed after. Temp names end in `.tmp`, an extension no runtime loads
(libcni reads only .conf/.conflist/.json), so a half-written temp file is never mistaken for a network config.

The primary CNI may rewrite its config at the very moment we update it. A plain read-modify-rename would then
silently drop their write. `update_file` instead swaps our file in with renameat2(RENAME_EXCHANGE) (Linux 3.15,
glibc 2.28): the old file comes back under the temp name, and if it is not the one we read, its bytes are merged
and swapped in again. No writer's bytes are lost. Filesystems without RENAME_EXCHANGE get a stat-checked
rename instead, which leaves a window of microseconds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meshcni.install.errors import FileVanished, InvalidConfig

TEMP_SUFFIX = ".tmp"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1 << 0
_RENAME_EXCHANGE = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2_fn = getattr(_libc, "renameat2", None)
if _renameat2_fn is not None:
    _renameat2_fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2_fn.restype = ctypes.c_int


class _FlagsUnsupported(Exception):
    """renameat2 flags not available (old glibc, or a filesystem that returns EINVAL for them)."""


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    if _renameat2_fn is None:
        raise _FlagsUnsupported()
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise _FlagsUnsupported()
    raise OSError(err, os.strerror(err), str(dst))


def temp_name(directory: Path, hint: str = "meshcni") -> Path:
    return directory / f".{hint}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> Path:
    """Write `data` to a new temp file in `directory`, fsync'ed, with `mode` (and owner when given)."""
    path = temp_name(directory)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


@dataclass(frozen=True)
class Snapshot:
    """What a path held when read: bytes (None if absent), inode, mode and owner."""

    data: bytes | None
    ino: int | None = None
    mode: int = 0o644
    owner: tuple[int, int] | None = None


def snapshot(path: Path) -> Snapshot:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return Snapshot(None)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink: we edit regular files only
            raise InvalidConfig(str(path), "is a symlink; meshcni edits regular files only") from None
        raise
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return Snapshot(b"".join(chunks), st.st_ino, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))


def _same(a: Snapshot, b: Snapshot) -> bool:
    # Content is compared as well as the inode: an in-place writer keeps the inode and may keep size and mtime
    # (timestamps are jiffy-coarse), but cannot keep the bytes and still have changed something.
    return a.ino == b.ino and a.data == b.data


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace `path` with `data` unless it already holds exactly that (same bytes and mode). True if written.

    For files only we write (state, binaries); no concurrent-writer merge is needed there.
    """
    if not os.path.islink(path):  # a symlink is simply replaced by the file
        current = snapshot(path)
        if current.data == data and current.mode == mode:
            return False
    tmp = write_temp(path.parent, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class _Lost:
    """A swap found a file not ours: `theirs` is it; `ours_placed` says whether our file went in anyway."""

    theirs: Snapshot
    ours_placed: bool


def _swap_in(tmp: Path, path: Path, expected: Snapshot) -> _Lost | None:
    """Move `tmp` to `path`; None if what was there is `expected` (or, for a create, nothing), else `_Lost`."""
    if expected.data is None:
        try:
            _renameat2(tmp, path, _RENAME_NOREPLACE)
            return None
        except FileExistsError:
            pass
        except _FlagsUnsupported:
            if not os.path.lexists(path):
                os.rename(tmp, path)
                return None
        _unlink_quietly(tmp)
        return _Lost(snapshot(path), ours_placed=False)
    try:
        _renameat2(tmp, path, _RENAME_EXCHANGE)
    except FileNotFoundError:
        _unlink_quietly(tmp)
        raise FileVanished(f"{path} was deleted while meshcni was updating it") from None
    except _FlagsUnsupported:
        now = snapshot(path)
        if not _same(now, expected):
            _unlink_quietly(tmp)
            return _Lost(now, ours_placed=False)
        os.rename(tmp, path)  # a writer landing between the check above and here is lost: see module doc
        return None
    # The exchange put the previous occupant at `tmp`: read it to know whose it was, then drop the name.
    displaced = snapshot(tmp)
    _unlink_quietly(tmp)
    return None if _same(displaced, expected) else _Lost(displaced, ours_placed=True)


def update_file(path: Path, compute: Callable[[bytes | None], bytes | None],
                create_mode: int = 0o644, create_owner: tuple[int, int] | None = None) -> bytes | None:
    """Atomically replace `path` with `compute(current bytes)`, never losing a concurrent writer's bytes.

    `compute` gets the current bytes (None if the file is absent) and returns the new bytes, or None to leave
    the file as it is; it may raise (InvalidConfig to refuse). If another writer replaced the file between our
    read and our swap, their version comes back to us, `compute` runs on it, and the result is swapped in
    again; if `compute` then declines or raises, their bytes are put back verbatim (and the error re-raised).
    Returns the bytes we left in place, or None if the file ends up unchanged by us.
    """
    basis = snapshot(path)   # the content `compute` transforms: always someone else's latest version
    occupant = basis         # what the next swap expects to displace
    while True:
        refusal: Exception | None = None
        try:
            new = compute(basis.data)
        except Exception as exc:  # a refusal (InvalidConfig) or a failure: either way their bytes go back
            new, refusal = None, exc
        restoring = new is None or new == basis.data
        if restoring:
            if occupant is basis:  # nothing of ours in place: leave their file alone
                if refusal is not None:
                    raise refusal
                return None
            new = basis.data  # our earlier swap displaced their newer file: put it back verbatim
        assert new is not None
        if basis.data is not None:
            mode, owner = basis.mode, basis.owner
        else:
            mode, owner = create_mode, create_owner
        tmp = write_temp(path.parent, new, mode, owner)
        placed = os.stat(tmp).st_ino
        lost = _swap_in(tmp, path, occupant)
        if lost is None:
            fsync_dir(path.parent)
            if restoring:
                if refusal is not None:
                    raise refusal
                return None
            return new
        basis = lost.theirs
        occupant = Snapshot(new, placed) if lost.ours_placed else lost.theirs


def remove_if_unchanged(path: Path, expected: bytes) -> bool:
    """Delete `path` only if it still holds `expected`; True if deleted (or already gone).

    The file is first renamed aside (atomic), then checked, so a concurrent rewrite is either seen or lands
    after us; a changed file is put back, unless a newer one has already taken its place.
    """
    aside = temp_name(path.parent, "meshcni-remove")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    taken = snapshot(aside)
    if taken.data == expected:
        os.unlink(aside)
        fsync_dir(path.parent)
        return True
    try:
        _renameat2(aside, path, _RENAME_NOREPLACE)
    except FileExistsError:
        os.unlink(aside)  # a newer version was written meanwhile; ours-to-restore is older than it
    except _FlagsUnsupported:
        if os.path.lexists(path):
            os.unlink(aside)
        else:
            os.rename(aside, path)
    fsync_dir(path.parent)
    return False
