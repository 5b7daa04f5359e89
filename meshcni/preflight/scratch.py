"""Throwaway targets for the probes: a private cgroup v2 directory and an anonymous network namespace.

A probe attaches its tiny program to one of these, never to the host's root cgroup or the host netns, so
running `meshcni doctor` on a live node cannot change how any of the node's sockets behave. The cgroup is a
fresh child of the unified hierarchy with no process in it, removed on exit. The netns is made with
unshare(2) in a short-lived thread and held only by a file descriptor: it has no name under
/var/run/netns and disappears when that descriptor is closed, so even a killed doctor leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

from meshcni.sys import cgroup as cgroups
from meshcni.sys.errors import CgroupError, SysError

CLONE_NEWNET = 0x40000000
CGROUP_PREFIX = "meshcni-preflight-"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


@contextlib.contextmanager
def cgroup() -> Iterator[tuple[Path, int]]:
    """An empty child cgroup of the unified hierarchy and an open fd on it; both gone afterwards."""
    path = cgroups.unified_root() / f"{CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cgroups.ensure(path)
    try:
        fd = cgroups.open_dir(path)
        try:
            yield path, fd
        finally:
            os.close(fd)
    finally:
        try:
            path.rmdir()  # empty by construction: nothing was ever moved into it
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CgroupError(f"cannot remove the probe cgroup {path}: {exc.strerror}") from exc


def _new_netns_fd() -> int:
    """unshare(CLONE_NEWNET) affects only the calling thread, so do it in a thread that then ends."""
    result: dict[str, object] = {}

    def body() -> None:
        try:
            original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["error"] = f"cannot open this thread's netns: {exc.strerror}"
            return
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                result["error"] = f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
                return
            result["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            # Go back anyway, although the thread is about to end, so nothing else ever runs in the new netns.
            _libc.setns(original, CLONE_NEWNET)
        finally:
            os.close(original)

    t = threading.Thread(target=body, name="meshcni-preflight-netns")
    t.start()
    t.join()
    if "fd" not in result:
        raise SysError(str(result.get("error", "creating a network namespace failed")))
    return int(result["fd"])


@contextlib.contextmanager
def netns() -> Iterator[tuple[str, int]]:
    """An anonymous network namespace: (a path tools like nsenter can open, an fd BPF links can target)."""
    fd = _new_netns_fd()
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}", fd
    finally:
        os.close(fd)
