"""Find a proxy's listening socket inside a pod netns and take a duplicate of it with pidfd_getfd(2).

Until the agent creates and holds the proxy's listeners itself, enrolment registers the listener the proxy
bound on its own. The search asks the cheap question first: the netns's own listening sockets (one
sock_diag query made from inside the netns, see meshcni.sys.sockdiag) say whether anything listens on the
port at all, and which socket inodes do. Only then is /proc walked for the process holding one of those inodes,
whose file descriptor is duplicated into our process (Linux 5.6+), which is all the SOCKMAP needs. At CNI
ADD time, and for every pod still waiting for its sidecar, nothing listens yet: the walk of every process on
the node (the costly part: ~0.6 ms here, however many pods there are) is skipped.
"""

from __future__ import annotations

import ctypes
import os

from meshcni.sys import proc, sockdiag
from meshcni.sys.errors import SysError

_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate, in this process, of file descriptor `target_fd` of process `pid`."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise SysError(f"pidfd_getfd(pid {pid}, fd {target_fd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


def listening_inodes(netns_path: str | os.PathLike, port: int | None = None) -> dict[int, int]:
    """inode -> address family of the TCP sockets listening in the netns at `netns_path` (on `port` only,
    when given): no process of the pod has to be known, or even to exist."""
    return {inode: family for family, _port, inode in sockdiag.listening_in(netns_path, port)}


def listening_inodes_of(pid: int, port: int | None = None) -> dict[int, int]:
    """Like `listening_inodes`, for the netns process `pid` is in."""
    return listening_inodes(f"/proc/{pid}/ns/net", port)


class ProcessIndex:
    """Every process grouped by network namespace, from one walk of /proc made on first use.

    A caller looking at many pods (the agent's tick, re-acquiring listeners after a restart) shares one
    index, so /proc is walked at most once per pass, and not at all when no pod has a listener to find.
    """

    def __init__(self):
        self._groups: dict[tuple[int, int], list[int]] | None = None
        self.walks = 0  # how many times /proc was walked (0 or 1): what the shortcut saves is countable

    def pids_in(self, netns_path: str | os.PathLike) -> list[int]:
        st = os.stat(netns_path)
        if self._groups is None:
            self._groups = self._walk()
        return self._groups.get((st.st_dev, st.st_ino), [])

    def _walk(self) -> dict[tuple[int, int], list[int]]:
        self.walks += 1
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


def take_from_pid(pid: int, inodes: dict[int, int]) -> dict[int, int]:
    """Duplicates of the fds process `pid` holds on `inodes` (inode -> family), as {family: fd}.

    One socket per family; the caller owns the returned fds. A process that exits or closes the fd meanwhile
    simply yields fewer (another process of the pod may hold the same socket).
    """
    taken: dict[int, int] = {}
    for fd, inode in proc.socket_fds(pid).items():
        family = inodes.get(inode)
        if family is None or family in taken:
            continue
        try:
            taken[family] = pidfd_getfd(pid, fd)
        except (SysError, ProcessLookupError):
            continue
    return taken


def take_listeners(netns_path: str, port: int, index: ProcessIndex | None = None) -> dict[int, int]:
    """Duplicates of the sockets listening on `port` in the netns, as {address family: fd}.

    The caller owns the returned fds. An empty dict means nothing in the netns listens there (yet), and
    costs one sock_diag query in the netns. `index` lets a caller looking at many pods walk /proc once.
    """
    inodes = listening_inodes(netns_path, port)
    if not inodes:
        return {}
    for pid in (index or ProcessIndex()).pids_in(netns_path):
        taken = take_from_pid(pid, inodes)
        if taken:
            return taken
    return {}
