"""Find a proxy's listening socket inside a pod netns and take a duplicate of it with pidfd_getfd(2).

Until the agent creates and holds the proxy's listeners itself, enrolment registers the listener the proxy
bound on its own: the process is found by its network namespace, the socket by its inode in that
namespace's /proc/<pid>/net/tcp{,6}, and the file descriptor is duplicated into our process (Linux 5.6+),
which is all the SOCKMAP needs.
"""

from __future__ import annotations

import ctypes
import os

from meshcni.sys.errors import SysError

_SYS_PIDFD_GETFD = 438
_TCP_LISTEN = "0A"


def _pidfd_getfd(pid: int, target_fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise SysError(f"pidfd_getfd(pid {pid}, fd {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def _listening_inodes(pid: int, port: int) -> dict[int, int]:
    """inode -> address family of sockets listening on `port` in the netns of `pid`."""
    found = {}
    for name, family in (("tcp", 2), ("tcp6", 10)):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], int(fields[9])
                    if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port and inode:
                        found[inode] = family
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return found


def pids_by_netns() -> dict[tuple[int, int], list[int]]:
    """Every process grouped by network namespace (st_dev, st_ino): one /proc walk serves many pods."""
    groups: dict[tuple[int, int], list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        groups.setdefault((ns.st_dev, ns.st_ino), []).append(int(entry))
    return groups


def _pids_in_netns(netns_path: str, groups: dict[tuple[int, int], list[int]] | None = None) -> list[int]:
    st = os.stat(netns_path)
    return (groups if groups is not None else pids_by_netns()).get((st.st_dev, st.st_ino), [])


def take_listeners(netns_path: str, port: int, groups: dict[tuple[int, int], list[int]] | None = None) -> dict[int, int]:
    """Duplicates of the sockets listening on `port` in the netns, as {address family: fd}.

    The caller owns the returned fds. An empty dict means no process in the netns listens there (yet).
    `groups` (from `pids_by_netns`) lets a caller looking at many pods walk /proc once.
    """
    taken: dict[int, int] = {}
    for pid in _pids_in_netns(netns_path, groups):
        inodes = _listening_inodes(pid, port)
        if not inodes:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd_name in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd_name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            family = inodes.get(inode)
            if family is None or family in taken:
                continue
            try:
                taken[family] = _pidfd_getfd(pid, int(fd_name))
            except (SysError, ProcessLookupError):
                continue  # the process exited or closed the fd meanwhile; another may hold it too
        if taken:
            break
    return taken
