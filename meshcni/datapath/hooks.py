"""Every program on the hooks meshcni uses, in the order the kernel runs them, meshcni's own marked.

Other BPF users attach to the same hooks: a CNI's socket load balancer rewrites connect() as well (Cilium's
socket LB translates a service address to a backend there). Programs attached by bpf_link coexist, and the
kernel runs every one of them on the same context, in a fixed order: a cgroup's own programs before those of
its ancestors, and one cgroup's programs in the order they were attached. So a destination another program
rewrites before meshcni's connect4 runs is the destination meshcni captures and the proxy is told; one it
rewrites after is applied to the proxy's loopback address. When capture surprises you, the order is the first
thing to look at. BPF_PROG_QUERY with BPF_F_QUERY_EFFECTIVE answers exactly the array the kernel runs for a
cgroup, so asking from a pod's own cgroup shows what that pod's sockets go through. A pod's network namespace
has its own sk_lookup programs, also run in attach order; there the first program to assign a socket wins (a
later bpf_sk_assign fails without BPF_SK_LOOKUP_F_REPLACE), so another one ahead of meshcni's can take the
pod's inbound SYNs before meshcni steers them. meshcni's programs are the ones behind the bpf_links pinned in
its pin directory; it never detaches anything else.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from meshcni.datapath import loader
from meshcni.sys import bpf
from meshcni.sys import cgroup as cgroups
from meshcni.sys.errors import BpfError, NamespaceNotFound

# the hooks attached to a cgroup (the hierarchy's root in production), where a neighbour can change what meshcni sees
CGROUP_HOOKS = tuple(h for h in loader.HOOKS if h.target == "cgroup")
SK_LOOKUP = next(h for h in loader.HOOKS if h.name == "sk_lookup")
# hooks whose earlier neighbours decide what meshcni captures: a rewritten destination, an assigned socket
DECIDING_HOOKS = ("connect4", "connect6", "sk_lookup")


@dataclass(frozen=True)
class HookProgram:
    hook: str       # loader.Hook.name
    position: int   # 1 = runs first
    prog_id: int
    name: str       # the program's name as the kernel has it (16 bytes at most)
    ours: bool      # attached by the meshcni datapath pinned in the pin directory

    def to_dict(self) -> dict:
        return asdict(self)


def our_program_ids(pin_dir: str | os.PathLike) -> set[int]:
    """Ids of the programs behind meshcni's pinned cgroup links, and of its pinned sk_lookup program, which every
    pod's netns link runs (empty when no datapath is pinned there)."""
    # The cgroup links, not the pinned programs: a reload re-pins freshly loaded programs but leaves a link whose
    # program has the same tag alone (loader.ensure_link), so the two ids differ after an idempotent load. The
    # netns links are always moved to the pinned sk_lookup program (EbpfDatapath.load).
    pins = loader.Pins(Path(pin_dir))
    ids = set()
    for hook in CGROUP_HOOKS:
        try:
            fd = bpf.obj_get(str(pins.link(hook.name)))
        except BpfError:
            continue  # not loaded, or this hook fell back to iptables
        try:
            ids.add(bpf.link_prog_id(fd))
        finally:
            os.close(fd)
    try:
        fd = bpf.obj_get(str(pins.prog(SK_LOOKUP.name)))
    except BpfError:
        return ids
    try:
        ids.add(bpf.prog_info(fd).id)
    finally:
        os.close(fd)
    return ids


def _name(prog_id: int) -> str:
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except BpfError:
        return "?"  # detached and freed between the query and now
    try:
        return bpf.prog_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)


def on_cgroup(cgroup: str | os.PathLike, pin_dir: str | os.PathLike) -> list[HookProgram]:
    """The programs each of meshcni's cgroup hooks runs for sockets of `cgroup`, in run order."""
    ours = our_program_ids(pin_dir)
    fd = cgroups.open_dir(Path(cgroup))
    try:
        found = []
        for hook in CGROUP_HOOKS:
            ids = bpf.prog_query(fd, hook.attach_type, f"{hook.name} programs of {cgroup}")
            found += [HookProgram(hook.name, i, pid, _name(pid), pid in ours) for i, pid in enumerate(ids, 1)]
        return found
    finally:
        os.close(fd)


def on_netns(netns: str | os.PathLike, pin_dir: str | os.PathLike) -> list[HookProgram]:
    """The sk_lookup programs of a network namespace (a pod's), in run order."""
    ours = our_program_ids(pin_dir)
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceNotFound(f"cannot open network namespace {netns}: {exc.strerror}") from exc
    try:
        # a netns has no ancestors to inherit from; the kernel refuses the "effective" flag there
        ids = bpf.prog_query(fd, SK_LOOKUP.attach_type, f"sk_lookup programs of {netns}", effective=False)
        return [HookProgram(SK_LOOKUP.name, i, pid, _name(pid), pid in ours) for i, pid in enumerate(ids, 1)]
    finally:
        os.close(fd)


def ahead_of_meshcni(programs: list[HookProgram]) -> dict[str, list[HookProgram]]:
    """Per hook that decides what meshcni captures, the other programs that run before meshcni's (only where
    meshcni has one)."""
    ahead = {}
    for hook in DECIDING_HOOKS:
        on_hook = [p for p in programs if p.hook == hook]
        first_ours = next((p.position for p in on_hook if p.ours), None)
        if first_ours is not None:
            before = [p for p in on_hook if p.position < first_ours]
            if before:
                ahead[hook] = before
    return ahead
