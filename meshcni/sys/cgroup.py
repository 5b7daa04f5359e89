"""cgroup v2 helpers: find the unified hierarchy, create a private cgroup, move processes into it.

The datapath attaches its cgroup programs to one cgroup v2 directory. In production that is the root of the
unified hierarchy; tests and the lab create their own child cgroup and start every pod process inside it, so
that nothing they attach can ever see the host's own sockets.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshcni.sys.errors import CgroupError

CGROUP2_SUPER_MAGIC = 0x63677270


def unified_root() -> Path:
    """The cgroup v2 mount point: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def ensure(path: str | os.PathLike) -> Path:
    """Create the cgroup directory (and parents) if needed and check it is on cgroup v2."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {p}: {exc.strerror}") from exc
    if not (p / "cgroup.procs").exists() or not _is_cgroup2(p):
        raise CgroupError(f"{p} is not a cgroup v2 directory")
    return p


def _is_cgroup2(p: Path) -> bool:
    # statfs is not in the os module; the presence of cgroup v2-only files is a faithful proxy.
    return (p / "cgroup.type").exists() or (p / "cgroup.controllers").exists()


def move(pid: int, path: str | os.PathLike) -> None:
    """Move a process (all its threads) into the cgroup."""
    try:
        with open(Path(path) / "cgroup.procs", "w", encoding="ascii") as procs:
            procs.write(str(pid))
    except OSError as exc:
        raise CgroupError(f"cannot move pid {pid} into {path}: {exc.strerror}") from exc


def pids(path: str | os.PathLike) -> list[int]:
    try:
        text = (Path(path) / "cgroup.procs").read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def remove(path: str | os.PathLike) -> None:
    """Remove an (empty) cgroup; a missing one is fine. Live processes are moved to the parent first."""
    p = Path(path)
    if not p.exists():
        return
    parent = p.parent
    for pid in pids(p):
        try:
            move(pid, parent)
        except CgroupError:
            pass  # the process exited meanwhile
    try:
        p.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot remove cgroup {p}: {exc.strerror}") from exc


def open_dir(path: str | os.PathLike) -> int:
    """An O_RDONLY directory fd on the cgroup, the target fd BPF cgroup attachments take."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"cannot open cgroup {path}: {exc.strerror}") from exc
