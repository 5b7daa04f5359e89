"""One real check per feature: each makes the syscall or loads and attaches the tiny program the feature is about.

A probe returns a one-line detail when the feature works and raises when it does not; the runner turns the
exception into a failed result. Attachments go only to the throwaway cgroup and netns of `scratch`, and
every map, program and link is closed before the probe returns (an unpinned link detaches when its last fd
closes, so even an exception leaves nothing attached). Program types and expected attach types are the
ones `meshcni.datapath.loader` loads, so a passing probe means the datapath's own load will be accepted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator

from meshcni.preflight import rawbpf, scratch
from meshcni.sys import bpf
from meshcni.sys import cgroup as cgroups
from meshcni.sys import iptables as ipt

BPFFS_ROOT = Path("/sys/fs/bpf")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
SO_NETNS_COOKIE = 71  # Linux 5.14+
SK_PASS = 1
PROBE_CHAIN = "MESHCNI_PROBE"


class ProbeFailed(Exception):
    """The feature is missing; the message says what was observed."""


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _load(prog_type: int, attach_type: int = 0, calling: int | None = None) -> int:
    return rawbpf.prog_load(prog_type, rawbpf.returning(1, calling=calling), attach_type)


def _attach_and_detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    with _fd(bpf.link_create(prog_fd, target_fd, attach_type, what)) as link:
        bpf.link_detach(link, what)


def _kernel_release() -> str:
    return os.uname().release


# --- probes ---------------------------------------------------------------------------------------------------


def bpf_syscall() -> str:
    with _fd(rawbpf.map_create(rawbpf.MAP_ARRAY, 4, 8, 1)):
        return f"BPF_MAP_CREATE works on Linux {_kernel_release()}"


def bpffs() -> str:
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        bpf_mounts = {line.split()[1] for line in mounts if line.split()[2:3] == ["bpf"]}
    if str(BPFFS_ROOT) not in bpf_mounts:
        raise ProbeFailed(f"{BPFFS_ROOT} is not a bpf filesystem mount")
    # bpffs refuses names with a dot (they are reserved for its own files), hence no hidden-file name
    pin = BPFFS_ROOT / f"meshcni-preflight-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with _fd(rawbpf.map_create(rawbpf.MAP_ARRAY, 4, 8, 1)) as fd:
        bpf.obj_pin(fd, str(pin))
        try:
            with _fd(bpf.obj_get(str(pin))):
                pass
        finally:
            pin.unlink()
    return f"mounted at {BPFFS_ROOT}; pinning and reopening a map works"


def cgroup_v2() -> str:
    root = cgroups.unified_root()
    with scratch.cgroup() as (path, _):
        return f"mounted at {root}; created and removed {path.name}"


def cgroup_sock_addr() -> str:
    with scratch.cgroup() as (path, cg_fd):
        for name, attach in (("connect4", bpf.ATTACH_CGROUP_INET4_CONNECT),
                             ("connect6", bpf.ATTACH_CGROUP_INET6_CONNECT)):
            with _fd(_load(bpf.PROG_CGROUP_SOCK_ADDR, attach)) as prog:
                _attach_and_detach(prog, cg_fd, attach, f"cgroup/{name} probe to {path}")
    return "cgroup/connect4 and connect6 programs load and attach to a scratch cgroup"


def sockops() -> str:
    with scratch.cgroup() as (path, cg_fd), _fd(_load(bpf.PROG_SOCK_OPS)) as prog:
        _attach_and_detach(prog, cg_fd, bpf.ATTACH_CGROUP_SOCK_OPS, f"sockops probe to {path}")
    return "sockops program loads and attaches to a scratch cgroup"


def sk_msg_sockhash() -> str:
    with _fd(rawbpf.map_create(rawbpf.MAP_SOCKHASH, 4, 4, 1)) as sockhash, \
            _fd(_load(bpf.PROG_SK_MSG, bpf.ATTACH_SK_MSG_VERDICT)) as prog:
        _attach_and_detach(prog, sockhash, bpf.ATTACH_SK_MSG_VERDICT, "sk_msg probe to a SOCKHASH")
    return "SOCKHASH created; sk_msg program attached to it by bpf_link"


def sk_lookup() -> str:
    with scratch.netns() as (_, ns_fd), _fd(_load(bpf.PROG_SK_LOOKUP, bpf.ATTACH_SK_LOOKUP)) as prog:
        _attach_and_detach(prog, ns_fd, bpf.ATTACH_SK_LOOKUP, "sk_lookup probe to a scratch netns")
    return "sk_lookup program loads and attaches to a scratch netns"


def netns_cookie() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError as exc:
            raise ProbeFailed(f"getsockopt(SO_NETNS_COOKIE): {exc.strerror}") from None
    if not cookie:
        raise ProbeFailed("getsockopt(SO_NETNS_COOKIE) answered 0")
    # The helper must be allowed in every program type that calls it in bpf/: connect.c and sockops.c
    # (getsockopt.c is covered by the cgroup_getsockopt probe, which loads the same call).
    with _fd(_load(bpf.PROG_CGROUP_SOCK_ADDR, bpf.ATTACH_CGROUP_INET4_CONNECT, rawbpf.FUNC_GET_NETNS_COOKIE)):
        pass
    with _fd(_load(bpf.PROG_SOCK_OPS, calling=rawbpf.FUNC_GET_NETNS_COOKIE)):
        pass
    return "SO_NETNS_COOKIE works; bpf_get_netns_cookie is allowed in cgroup/connect and sockops"


def cgroup_getsockopt() -> str:
    with scratch.cgroup() as (path, cg_fd), \
            _fd(_load(bpf.PROG_CGROUP_SOCKOPT, bpf.ATTACH_CGROUP_GETSOCKOPT, rawbpf.FUNC_GET_NETNS_COOKIE)) as prog:
        _attach_and_detach(prog, cg_fd, bpf.ATTACH_CGROUP_GETSOCKOPT, f"cgroup/getsockopt probe to {path}")
    return "cgroup/getsockopt program (calling bpf_get_netns_cookie) loads and attaches to a scratch cgroup"


def btf() -> str:
    try:
        with open(BTF_VMLINUX, "rb") as f:
            head = f.read(2)
        size = BTF_VMLINUX.stat().st_size
    except FileNotFoundError:
        raise ProbeFailed(f"{BTF_VMLINUX} does not exist") from None
    if len(head) < 2 or int.from_bytes(head, "little") != BTF_MAGIC:
        raise ProbeFailed(f"{BTF_VMLINUX} does not start with the BTF magic")
    return f"{BTF_VMLINUX} present ({size // 1024} KiB)"


def bcc() -> str:
    try:
        import bcc as bcc_module  # deferred: pulls in LLVM
    except ImportError as exc:
        raise ProbeFailed(f"import bcc failed: {exc}") from None
    return f"bcc {getattr(bcc_module, '__version__', '(unknown version)')} importable"


HEADERS_PROBE_C = b"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/socket.h>
int mcni_probe(struct __sk_buff *skb) { return 0; }
"""


def kernel_headers(compile_with_bcc: bool) -> str:
    build = Path(f"/lib/modules/{_kernel_release()}/build")
    if not (build / "include").is_dir():
        raise ProbeFailed(f"{build}/include does not exist")
    target = build.resolve()
    if not compile_with_bcc:
        return f"{build} -> {target} (not compiled against: bcc is unavailable)"
    from bcc import BPF  # deferred: pulls in LLVM

    try:
        module = BPF(text=HEADERS_PROBE_C)
    except Exception as exc:  # bcc raises a bare Exception; clang's own message went to stderr
        raise ProbeFailed(f"bcc cannot compile against {build} -> {target}: {exc}") from None
    try:
        module.load_func(b"mcni_probe", BPF.SOCKET_FILTER)
    except Exception as exc:
        raise ProbeFailed(f"the program bcc compiled against {target} was refused: {exc}") from None
    finally:
        module.cleanup()
    return f"{build} -> {target}; bcc compiled and loaded a program against it"


def iptables() -> str:
    backend = ipt.detect_backend()
    restore = ipt.tool(backend, ipt.Family.IPV4, "restore")
    if shutil.which(restore) is None:
        raise ProbeFailed(f"{restore} is not installed")
    document = "\n".join([
        "*nat",
        f":{PROBE_CHAIN} - [0:0]",
        f"-A {PROBE_CHAIN} -p tcp -j REDIRECT --to-ports 15006",
        "COMMIT",
        "",
    ])
    with scratch.netns() as (path, _):
        ipt.restore(path, ipt.Family.IPV4, backend, document)
        live = ipt.save(path, ipt.Family.IPV4, backend, "nat")
    if not any("REDIRECT" in rule for rule in live.chain_rules(PROBE_CHAIN)):
        raise ProbeFailed(f"{restore} reported success but the REDIRECT rule is not in the nat table")
    return f"{backend.value} backend; nat REDIRECT rule applied in a scratch netns"


PROBES: dict[str, Callable[..., str]] = {
    "bpf_syscall": bpf_syscall,
    "bpffs": bpffs,
    "cgroup_v2": cgroup_v2,
    "cgroup_sock_addr": cgroup_sock_addr,
    "sockops": sockops,
    "sk_msg_sockhash": sk_msg_sockhash,
    "sk_lookup": sk_lookup,
    "netns_cookie": netns_cookie,
    "cgroup_getsockopt": cgroup_getsockopt,
    "btf": btf,
    "bcc": bcc,
    "kernel_headers": kernel_headers,
    "iptables": iptables,
}
