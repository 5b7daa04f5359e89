"""Compile bpf/ with bcc, pin the programs, and attach them idempotently through pinned bpf_links.

Constants reach the C code as -D cflags (pin directory, table sizes); runtime values go through maps. Every
attachment is a bpf_link pinned under `<pin_dir>/links/`, so it outlives the loading process and a second
load finds it: an identical program is left alone, a changed one is swapped with BPF_LINK_UPDATE (atomic:
there is never a moment with no program attached), and nothing is ever attached twice.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from meshcni.sys import bpf
from meshcni.sys.errors import BpfError, FeatureMissing

BPF_DIR = Path(os.environ.get("MESHCNI_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
SOURCES = ("common.c", "connect.c", "sockops.c", "redir.c", "getsockopt.c", "sk_lookup.c")
DEFAULT_MAX_PODS = 1024
DEFAULT_MAX_CONNS = 65536
# Maps an older meshcni pinned that no program uses any more; a load over its pin directory removes them once
# every attachment runs the new programs (a map changes its name, not its type, when its kind changes).
RETIRED_MAPS = (
    "mcni_nosplice_v1",  # a tuple-keyed LRU hash, now the socket storage mcni_stays_on_tcp_v1
    "mcni_proxy_ends_v1",  # sk_lookup's tuple records of accepted proxy ends, now mcni_proxy_listener_v1
)


@dataclass(frozen=True)
class Hook:
    name: str
    function: str
    prog_type: int
    attach_type: int
    target: str  # "cgroup", "sockhash" or "netns" (one link per enrolled pod)
    feature: str  # what the kernel must support, for error messages


HOOKS = (
    Hook("connect4", "mcni_connect4", bpf.PROG_CGROUP_SOCK_ADDR, bpf.ATTACH_CGROUP_INET4_CONNECT, "cgroup",
         "cgroup/connect4 programs (Linux 4.17+) with bpf_get_netns_cookie (5.7+)"),
    Hook("connect6", "mcni_connect6", bpf.PROG_CGROUP_SOCK_ADDR, bpf.ATTACH_CGROUP_INET6_CONNECT, "cgroup",
         "cgroup/connect6 programs (Linux 4.17+)"),
    Hook("sockops", "mcni_sockops", bpf.PROG_SOCK_OPS, bpf.ATTACH_CGROUP_SOCK_OPS, "cgroup",
         "sockops programs and SOCKHASH (Linux 4.18+), netns cookie in sockops (5.15+)"),
    Hook("getsockopt", "mcni_getsockopt", bpf.PROG_CGROUP_SOCKOPT, bpf.ATTACH_CGROUP_GETSOCKOPT, "cgroup",
         "cgroup/getsockopt programs (Linux 5.3+)"),
    Hook("redir", "mcni_redir", bpf.PROG_SK_MSG, bpf.ATTACH_SK_MSG_VERDICT, "sockhash",
         "sk_msg programs (Linux 4.17+) attached by bpf_link (6.10+)"),
    Hook("sk_lookup", "mcni_sk_lookup", bpf.PROG_SK_LOOKUP, bpf.ATTACH_SK_LOOKUP, "netns",
         "sk_lookup programs (Linux 5.9+)"),
)


def check_bpffs(pin_dir: Path) -> None:
    """The pin directory must be on a mounted bpffs, or pins would silently be ordinary files."""
    probe = pin_dir
    while not probe.exists():
        probe = probe.parent
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        bpf_mounts = [line.split()[1] for line in mounts if line.split()[2:3] == ["bpf"]]
    if not any(str(pin_dir).startswith(m.rstrip("/") + "/") or str(pin_dir) == m for m in bpf_mounts):
        raise FeatureMissing(f"{pin_dir} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")


def compile_programs(pin_dir: Path, max_pods: int = DEFAULT_MAX_PODS, max_conns: int = DEFAULT_MAX_CONNS):
    """Compile and load every hook; returns (bcc module, {hook name: program fd}).

    Maps are created (or re-opened) pinned in `pin_dir` by bcc itself, as declared in meshcni.h.
    """
    try:
        from bcc import BPF  # deferred: bcc pulls in LLVM, only the loader needs it
    except ImportError as exc:
        raise FeatureMissing("bcc is not importable: install Debian's python3-bpfcc and use a venv made with "
                             "--system-site-packages") from exc
    kbuild = Path(f"/lib/modules/{os.uname().release}/build")
    if not (kbuild / "include").exists():
        raise FeatureMissing(f"kernel headers for bcc are missing at {kbuild} (scripts/setup.sh links Debian's "
                             "linux-headers-amd64 there)")
    text = b"\n".join((BPF_DIR / name).read_bytes() for name in SOURCES)
    cflags = [
        f"-I{BPF_DIR / 'include'}",
        f'-DMCNI_PIN_DIR="{pin_dir}"',
        f"-DMCNI_MAX_PODS={int(max_pods)}",
        f"-DMCNI_MAX_CONNS={int(max_conns)}",
        "-Wno-macro-redefined",
    ]
    try:
        module = BPF(text=text, cflags=cflags)
    except Exception as exc:  # bcc raises bare Exception with clang's output on stderr
        raise BpfError(f"compiling {BPF_DIR} failed: {exc}") from exc
    fds = {}
    for hook in HOOKS:
        try:
            fn = module.load_func(hook.function.encode(), hook.prog_type, None, hook.attach_type)
        except Exception as exc:
            module.cleanup()
            raise FeatureMissing(f"the kernel refused the {hook.name} program: it needs {hook.feature} ({exc})") \
                from exc
        fds[hook.name] = fn.fd
    return module, fds


class Pins:
    """Paths of everything pinned for one datapath instance."""

    def __init__(self, pin_dir: Path):
        self.root = pin_dir
        self.progs = pin_dir / "progs"
        self.links = pin_dir / "links"

    def prog(self, hook: str) -> Path:
        return self.progs / hook

    def link(self, hook: str) -> Path:
        return self.links / hook

    def netns_link(self, cookie: int) -> Path:
        return self.links / f"sk_lookup-netns-{cookie}"

    def make_dirs(self) -> None:
        for d in (self.root, self.progs, self.links):
            d.mkdir(parents=True, exist_ok=True)


def pin_program(pins: Pins, hook: str, prog_fd: int) -> None:
    """Pin (or re-pin) a program so later processes can attach it without compiling."""
    path = pins.prog(hook)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    bpf.obj_pin(prog_fd, str(path))


def ensure_link(path: Path, prog_fd: int, target_fd: int, attach_type: int, what: str) -> str:
    """Make `path` a pinned link running `prog_fd` on the target; returns "kept", "updated" or "created"."""
    try:
        link_fd = bpf.obj_get(str(path))
    except BpfError as exc:
        if exc.errno != errno.ENOENT:
            raise
        link_fd = bpf.link_create(prog_fd, target_fd, attach_type, what)
        try:
            bpf.obj_pin(link_fd, str(path))
        except BpfError:
            bpf.link_detach(link_fd, what)
            raise
        finally:
            os.close(link_fd)
        return "created"
    try:
        current = bpf.link_prog_id(link_fd)
        if current == bpf.prog_info(prog_fd).id:
            return "kept"
        cur_fd = bpf.prog_fd_by_id(current)
        try:
            same = bpf.prog_tag(cur_fd) == bpf.prog_tag(prog_fd)
        finally:
            os.close(cur_fd)
        if same:
            return "kept"
        bpf.link_update(link_fd, prog_fd, what)
        return "updated"
    finally:
        os.close(link_fd)


def remove_link(path: Path, what: str) -> bool:
    """Detach and unpin a link; a missing pin is fine. Returns whether something was removed."""
    try:
        link_fd = bpf.obj_get(str(path))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    try:
        bpf.link_detach(link_fd, what)
    finally:
        os.close(link_fd)
    path.unlink(missing_ok=True)
    return True
