"""Wake the installer when the CNI conf dir changes: inotify through ctypes, or polling when that is unavailable.

inotify (Linux 2.6.13) reports a rewrite within milliseconds and costs nothing while idle. It can be missing in
practice: `fs.inotify.max_user_instances` (128 by default) is often exhausted on busy nodes, and some filesystems
do not deliver events. The polling watcher compares (name, inode, size, mtime) of the config files every
quarter second instead. Both only say "something changed, look again"; the installer's reconcile pass is
idempotent, so an extra wake-up (including the ones our own writes cause) costs one directory read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from pathlib import Path
from typing import Protocol

from meshcni.install.conflist import is_config_name

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
# No IN_MODIFY/IN_CREATE: a file being written in place fires them before it is complete, and looking then
# would only find a half-written config. IN_CLOSE_WRITE (in-place writers) and IN_MOVED_TO (rename writers)
# fire when the content is final.
WATCH_MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
              | IN_ONLYDIR)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then name[len])
_COALESCE_SECONDS = 0.005  # events already queued with the first one are handled in the same pass
_DIR_RETRY_SECONDS = 0.25  # how often to look for a conf dir that does not exist yet
POLL_INTERVAL_SECONDS = 0.25


class Watcher(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until the dir may have changed (True), `timeout` passes or `wake()` is called (False)."""

    def wake(self) -> None:
        """Make a pending or the next `wait` return at once (thread- and signal-handler-safe)."""

    def close(self) -> None: ...


class InotifyUnavailable(OSError):
    pass


_libc = ctypes.CDLL(None, use_errno=True)


class _WakePipe:
    """A self-pipe: `wake()` only writes a byte, so it is safe from a signal handler (no lock is taken)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so a wake-up is already pending

    def clear(self) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class InotifyWatcher:
    """inotify on one directory; re-arms itself if the directory is created, deleted or replaced."""

    kind = "inotify"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._wd: int | None = None
        self._waker = _WakePipe()
        self._wake_r = self._waker.read_fd
        self._arm()  # now, so a change between construction and the first wait is queued, not missed

    def _arm(self) -> bool:
        if self._wd is not None:
            return True
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(self.directory), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise OSError(err, f"inotify_add_watch {self.directory}: {os.strerror(err)}")
        self._wd = wd
        return True

    def _drain(self) -> bool:
        """Read all queued events; True if any concerns a config file or the directory itself."""
        relevant = False
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return relevant
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
                raw = buf[offset + _EVENT_HEADER.size: offset + _EVENT_HEADER.size + length]
                offset += _EVENT_HEADER.size + length
                name = raw.split(b"\0", 1)[0].decode(errors="replace")
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    # The directory went away or was replaced: watch whatever carries its name next.
                    if wd == self._wd:
                        if not mask & IN_IGNORED:
                            _libc.inotify_rm_watch(self._fd, wd)
                        self._wd = None
                    relevant = True
                elif mask & IN_Q_OVERFLOW or is_config_name(name):
                    relevant = True

    def wait(self, timeout: float) -> bool:
        if self._wd is None:
            if self._arm():
                return True  # the dir appeared (or came back): look at it
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ready, _, _ = select.select([self._wake_r], [], [], min(_DIR_RETRY_SECONDS, timeout))
                if ready:
                    self._clear_wake()
                    return False
                if self._arm():
                    return True
            return False
        ready, _, _ = select.select([self._fd, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            self._clear_wake()
            return False
        if not ready:
            return False
        relevant = self._drain()
        if relevant:
            # Let the rest of the writer's burst arrive so one pass sees its final state.
            more, _, _ = select.select([self._fd], [], [], _COALESCE_SECONDS)
            if more:
                self._drain()
        if self._wd is None:
            self._arm()
        return relevant

    def _clear_wake(self) -> None:
        self._waker.clear()

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        self._waker.close()
        os.close(self._fd)


def _dir_fingerprint(directory: Path) -> tuple | None:
    try:
        names = sorted(n for n in os.listdir(directory) if is_config_name(n))
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries = []
    for name in names:
        try:
            st = os.lstat(directory / name)
        except FileNotFoundError:
            continue
        entries.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(entries)


class PollingWatcher:
    """Compares a fingerprint of the config files every POLL_INTERVAL_SECONDS."""

    kind = "poll"

    def __init__(self, directory: Path, interval: float = POLL_INTERVAL_SECONDS):
        self.directory = Path(directory)
        self.interval = interval
        self._waker = _WakePipe()
        self._last = _dir_fingerprint(self.directory)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self._waker.read_fd], [], [], min(self.interval, remaining))
            if ready:
                self._waker.clear()
                return False
            now = _dir_fingerprint(self.directory)
            if now != self._last:
                self._last = now
                return True

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        self._waker.close()


def make_watcher(directory: Path, mode: str = "auto") -> Watcher:
    """`mode` is "inotify", "poll" or "auto" (inotify, falling back to polling if it cannot be set up)."""
    if mode == "poll":
        return PollingWatcher(directory)
    try:
        return InotifyWatcher(directory)
    except InotifyUnavailable:
        if mode == "inotify":
            raise
        return PollingWatcher(directory)
