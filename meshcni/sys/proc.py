"""Start processes inside a network namespace, a cgroup v2 and under another uid; stop them cleanly.

`spawn` is how the lab (and tests) play a container runtime: it forks, and in the child — before exec — moves
itself into the target cgroup, enters the target network namespace and drops to the requested uid/gid. The
order matters: the cgroup move and setns need root, so the identity change comes last, and the cgroup move
happens before exec so no socket the program opens is ever created outside the cgroup the eBPF datapath is
attached to. Every process gets its own session (process group), so `stop` can signal the whole group with a
bounded SIGTERM→SIGKILL escalation. `kill_cgroup` empties a cgroup through the kernel's `cgroup.kill`
(Linux 5.14+), which also catches processes that forked away from the ones we recorded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

from meshcni.sys import sockdiag
from meshcni.sys.errors import NamespaceNotFound, SysError
from meshcni.sys.netns import netns_fd as netns_fd_of

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


class ProcessError(SysError):
    """A process could not be started, or did not stop when asked."""


@dataclass(frozen=True)
class ProcessRef:
    """A process recorded by pid and start time, so a later (fresh) process never signals a recycled pid."""

    pid: int
    start_time: int  # field 22 of /proc/<pid>/stat, in clock ticks since boot

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ProcessRef":
        return cls(pid=int(data["pid"]), start_time=int(data["start_time"]))


def setns_net(fd: int) -> None:
    """Enter the network namespace behind `fd` (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def spawn(
    argv: Sequence[str],
    *,
    netns: str | os.PathLike | None = None,
    cgroup: str | os.PathLike | None = None,
    uid: int | None = None,
    gid: int | None = None,
    stdin: int | IO | None = subprocess.DEVNULL,
    stdout: int | IO | str | os.PathLike | None = None,
    stderr: int | IO | str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start `argv` in `netns`, inside `cgroup`, as `uid`/`gid`; stdout/stderr may be file paths (appended).

    Everything that can fail for a reason the caller should hear about (missing netns, missing cgroup, missing
    program) is checked in the parent first, because an exception inside the forked child only surfaces as a
    generic "Exception occurred in preexec_fn".

    The child runs only async-signal-tolerant steps (write, setns, setgroups/setresgid/setresuid) between fork
    and exec; callers with many threads (the agent) should prefer `meshcni.sys.netns.popen_in_netns`.
    """
    if not argv:
        raise ProcessError("spawn: empty argv")
    netns_fd = netns_fd_of(netns) if netns is not None else None
    procs_fd = None
    opened: list[IO] = []
    try:
        if cgroup is not None:
            try:
                # Opened in the parent: cgroup.procs checks permission against the opener's credentials,
                # and the child writes "0" (meaning "the writing process") after fork.
                procs_fd = os.open(Path(cgroup) / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ProcessError(f"cannot open cgroup {cgroup}: {exc.strerror}") from exc
        out = _open_log(stdout, opened)
        err = _open_log(stderr, opened)

        def in_child() -> None:
            if procs_fd is not None:
                os.write(procs_fd, b"0")
            if netns_fd is not None:
                setns_net(netns_fd)
            if gid is not None:
                os.setgroups([gid])
                os.setresgid(gid, gid, gid)
            if uid is not None:
                os.setresuid(uid, uid, uid)

        try:
            return subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                preexec_fn=in_child,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise ProcessError(f"cannot start {argv[0]}: not found") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProcessError(f"cannot start {' '.join(argv)}: {exc}") from exc
    finally:
        for f in opened:
            f.close()
        for fd in (netns_fd, procs_fd):
            if fd is not None:
                os.close(fd)


def run(argv: Sequence[str], *, timeout: float = 30.0, input: bytes | None = None, **spawn_args) -> subprocess.CompletedProcess:
    """`spawn` and wait, capturing stdout and stderr; a timeout kills the process group and raises."""
    proc = spawn(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **spawn_args,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ProcessError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _open_log(target, opened: list[IO]):
    if isinstance(target, (str, os.PathLike)):
        f = open(target, "ab")
        opened.append(f)
        return f
    return target


def start_time(pid: int) -> int | None:
    """The process start time from /proc (None if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses; everything after the last ')' is well-formed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def ref(pid: int) -> ProcessRef:
    st = start_time(pid)
    if st is None:
        raise ProcessError(f"process {pid} exited before it could be recorded")
    return ProcessRef(pid, st)


def state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat ('R', 'S', 'Z', ...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(p: ProcessRef) -> bool:
    """True when the recorded process still runs (same pid AND same start time, and not a zombie)."""
    return start_time(p.pid) == p.start_time and state(p.pid) not in (None, "Z", "X")


def stop(p: ProcessRef | subprocess.Popen, *, grace: float = 5.0, kill_wait: float = 5.0) -> None:
    """SIGTERM the process group, wait up to `grace`, then SIGKILL and wait up to `kill_wait`.

    A process that is already gone is fine. Raises ProcessError only if it survives SIGKILL (which means it is
    stuck in the kernel, and the caller should say so rather than pretend it stopped).
    """
    if isinstance(p, subprocess.Popen):
        pid = p.pid

        def gone() -> bool:
            return p.poll() is not None

    else:
        pid = p.pid

        def gone() -> bool:
            return not is_alive(p)

    if gone():
        return
    _signal_group(pid, signal.SIGTERM)
    if _wait(gone, grace):
        return
    _signal_group(pid, signal.SIGKILL)
    if not _wait(gone, kill_wait):
        raise ProcessError(f"process {pid} did not exit after SIGKILL")


def _signal_group(pid: int, sig: int) -> None:
    # Each spawned process leads its own session, so its pgid is its pid; signalling the group also reaches
    # the workers nginx and HAProxy fork.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait(done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def kill_cgroup(path: str | os.PathLike, *, wait: float = 5.0) -> None:
    """Kill every process in a cgroup v2 (via cgroup.kill) and wait until it is empty; a missing cgroup is fine."""
    p = Path(path)
    if not (p / "cgroup.procs").exists():
        return
    if not _cgroup_pids(p):
        return
    try:
        (p / "cgroup.kill").write_text("1", encoding="ascii")
    except FileNotFoundError:
        if not (p / "cgroup.procs").exists():
            return
        raise ProcessError(f"{p} has no cgroup.kill (needs Linux 5.14+)") from None
    except OSError as exc:
        raise ProcessError(f"cannot kill cgroup {p}: {exc.strerror}") from exc
    if not _wait(lambda: not _cgroup_pids(p), wait):
        raise ProcessError(f"processes {_cgroup_pids(p)} in {p} survived cgroup.kill")


def _cgroup_pids(p: Path) -> list[int]:
    try:
        return [int(x) for x in (p / "cgroup.procs").read_text(encoding="ascii").split()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return []
        raise


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode of the sockets process `pid` has open (empty when it is gone or not ours to look at)."""
    found: dict[int, int] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(n)] = int(target[8:-1])
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` has open."""
    return set(socket_fds(pid).values())


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of `pid` (empty when the process is gone).

    Asked of the kernel over sock_diag: /proc/<pid>/net/tcp would walk the machine-wide established hash,
    milliseconds per read, and readiness loops poll this every few milliseconds."""
    try:
        return {port for _family, port, _inode in sockdiag.listening_in(f"/proc/{pid}/ns/net")}
    except NamespaceNotFound:
        return set()
