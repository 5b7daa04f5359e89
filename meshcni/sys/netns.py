"""Network namespaces by path: check one, enter one for the duration of a call, run a program inside one.

A pod's netns is named by a path (`/var/run/netns/x`, `/proc/<pid>/ns/net`). `setns(2)` moves only the
calling *thread*, so `in_netns` is a context manager that switches the current thread and always switches it
back; sockets created inside keep the namespace they were created in after the block ends, which is how the
agent makes listeners in a pod. Programs are started with util-linux `nsenter --net=PATH` rather than a
`preexec_fn` setns, because `preexec_fn` is unsafe in a threaded process (the agent is one) and nsenter can
also drop to another uid/gid *after* entering, which a plain `subprocess(user=...)` cannot do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import subprocess
from typing import Iterator, Sequence

from meshcni.sys.errors import NamespaceNotFound, SysError

# linux/nsfs.h: _IO(0xb7, 0x3), answers the CLONE_NEW* type of the namespace behind an nsfs fd (Linux 4.11+).
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def netns_fd(path: str | os.PathLike) -> int:
    """An O_RDONLY|O_CLOEXEC fd on the network namespace at `path`; the caller closes it.

    Raises NamespaceNotFound when the path is missing or names something that is not a network namespace
    (a regular file, a mount namespace, a netns file whose bind mount was already removed).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NamespaceNotFound(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        # ENOTTY: not an nsfs file at all (e.g. an unmounted placeholder under /var/run/netns).
        reason = "is not a namespace file" if exc.errno in (errno.ENOTTY, errno.EINVAL) else exc.strerror
        raise NamespaceNotFound(f"{path} {reason}") from None
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise NamespaceNotFound(f"{path} is a namespace, but not a network namespace (type {nstype:#x})")
    return fd


def check_netns(path: str | os.PathLike) -> None:
    """Raise NamespaceNotFound unless `path` is a live network namespace."""
    os.close(netns_fd(path))


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SysError(f"setns into {what} failed: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(path: str | os.PathLike) -> Iterator[None]:
    """Run the block with the *current thread* inside the network namespace at `path`.

    Threads already running stay where they are; a thread *started* inside the block inherits the pod's
    namespace (clone(2) copies the creating thread's). The thread's original namespace is restored on exit,
    even when the block raises; if restoring itself fails the thread would silently keep talking in the pod's namespace,
    so that is raised as SysError rather than ignored.
    """
    target = netns_fd(path)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(target)
        raise SysError(f"cannot open this thread's network namespace: {exc.strerror}") from exc
    try:
        _setns(target, str(path))
        try:
            yield
        finally:
            _setns(original, "the thread's original network namespace")
    finally:
        os.close(target)
        os.close(original)


def nsenter_argv(
    path: str | os.PathLike, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None
) -> list[str]:
    """The argv that runs `argv` inside the netns at `path`, optionally as uid/gid (set after entering)."""
    cmd = ["nsenter", f"--net={os.fspath(path)}"]
    if gid is not None:
        cmd.append(f"--setgid={gid}")  # nsenter also drops supplementary groups here
    if uid is not None:
        cmd.append(f"--setuid={uid}")
    cmd.append("--")
    cmd.extend(argv)
    return cmd


def run_in_netns(
    path: str | os.PathLike,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    gid: int | None = None,
    **subprocess_kwargs,
) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, **subprocess_kwargs)` inside the netns at `path`.

    The namespace is checked first so a missing one is a NamespaceNotFound, not an nsenter message.
    """
    check_netns(path)
    return subprocess.run(nsenter_argv(path, argv, uid=uid, gid=gid), **subprocess_kwargs)


def popen_in_netns(
    path: str | os.PathLike,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    gid: int | None = None,
    **subprocess_kwargs,
) -> subprocess.Popen:
    """`subprocess.Popen` counterpart of `run_in_netns`, for long-lived processes (proxies, apps)."""
    check_netns(path)
    return subprocess.Popen(nsenter_argv(path, argv, uid=uid, gid=gid), **subprocess_kwargs)
