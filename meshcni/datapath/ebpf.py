"""The eBPF interceptor: enrol pods into the pinned datapath, read their counters, and unload it all.

`EbpfDatapath.load()` compiles and attaches (idempotently, see loader.py); `EbpfDatapath.open()` re-opens
an already loaded datapath from its pins without compiling, which is what a CLI, a `lab down` or a restarted
agent does. All pod state lives in the pinned maps themselves (netns cookie -> slot -> config), so any
process can release a pod another one captured.

Enrolment writes the pod's policy first and its membership key last, and undoes what it wrote if a later
step fails: a pod is either fully captured or not at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from pathlib import Path

from meshcni.config import Mode, PodConfig
from meshcni.datapath import layout as L
from meshcni.datapath import listeners, loader
from meshcni.datapath.directions import BOTH, Direction
from meshcni.datapath.interceptor import PodNet
from meshcni.sys import bpf, cgroup as cgroups, netns
from meshcni.sys.errors import BpfError, NamespaceNotFound

SO_NETNS_COOKIE = 71  # Linux 5.14+
DEFAULT_PIN_DIR = "/sys/fs/bpf/meshcni"

_MAPS = {
    "mcni_pods_v1": (L.U64, L.U32),
    "mcni_pod_config_v1": (L.U32, L.Pod),
    "mcni_pod_ips_v1": (L.Ip, L.U32),
    "mcni_ports_v1": (L.PortKey, L.U8),
    "mcni_cidrs_v1": (L.CidrKey, L.U8),
    "mcni_pair_origdst_v1": (L.Tuple, L.OrigDst),
    "mcni_socks_v1": (L.Tuple, L.U32),
    "mcni_listeners_v1": (L.U32, L.U64),
    "mcni_proxy_listener_v1": (L.U32, L.U8),  # socket storage: user space keys it by a socket's fd
}


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of a network namespace, read from a socket made inside it."""
    with netns.in_netns(netns_path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    finally:
        s.close()


class EbpfDatapath:
    """One loaded datapath: its pinned maps and programs, attached to one cgroup v2 directory."""

    mode = Mode.EBPF

    def __init__(self, pin_dir: Path, maps: dict[str, bpf.RawMap], counters: bpf.RawMap):
        # sk_msg splicing is on for the sidecar proxies' own sockets (proxy <-> proxy pairs on this node), which
        # are non-blocking event loops; an app's sockets only with its pod's `splice_app`, because a spliced
        # socket can answer EAGAIN to a blocking reader on 6.18 (see "Splicing" in docs/architecture.md).
        # False turns splicing off for every pod enrolled afterwards.
        self.splice = True
        self.pin_dir = Path(pin_dir)
        self.pins = loader.Pins(self.pin_dir)
        self.maps = maps
        self._counters = counters
        self.max_pods = bpf.map_info(maps["mcni_pod_config_v1"].fd).max_entries
        self._slot_hint = 0

    # --- life cycle -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, pin_dir: str | os.PathLike = DEFAULT_PIN_DIR, cgroup: str | os.PathLike | None = None,
             max_pods: int = loader.DEFAULT_MAX_PODS) -> "EbpfDatapath":
        """Compile, pin and attach; safe to call again on a loaded datapath (nothing is attached twice).

        `cgroup` is the cgroup v2 directory the programs see: the hierarchy's root in production, a private
        cgroup in tests and the lab so that no host process is ever captured.
        """
        pin_dir = Path(pin_dir)
        target = Path(cgroup) if cgroup else cgroups.unified_root()
        loader.check_bpffs(pin_dir)
        pins = loader.Pins(pin_dir)
        fresh = not pin_dir.exists()
        pins.make_dirs()
        cg_fd = None
        try:
            cg_fd = cgroups.open_dir(target)
            module, prog_fds = loader.compile_programs(pin_dir, max_pods=max_pods)
        except BaseException:
            if cg_fd is not None:
                os.close(cg_fd)
            if fresh:  # the directory is ours: leave nothing behind, every map bcc pinned before it failed included
                for entry in sorted(pin_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        entry.rmdir() if entry.is_dir() else entry.unlink()
                with contextlib.suppress(OSError):
                    pin_dir.rmdir()
            raise
        try:
            for hook in loader.HOOKS:
                loader.pin_program(pins, hook.name, prog_fds[hook.name])
            dp = cls.open(pin_dir)
            for hook in loader.HOOKS:
                if hook.target == "cgroup":
                    loader.ensure_link(pins.link(hook.name), prog_fds[hook.name], cg_fd, hook.attach_type,
                                       f"{hook.name} to {target}")
                elif hook.target == "sockhash":
                    loader.ensure_link(pins.link(hook.name), prog_fds[hook.name], dp.maps["mcni_socks_v1"].fd,
                                       hook.attach_type, f"{hook.name} to mcni_socks_v1")
            # pods enrolled by an earlier load keep their sk_lookup links; move them to this program
            for link in pins.links.glob("sk_lookup-netns-*"):
                link_fd = bpf.obj_get(str(link))
                try:
                    if bpf.link_prog_id(link_fd) != bpf.prog_info(prog_fds["sk_lookup"]).id:
                        bpf.link_update(link_fd, prog_fds["sk_lookup"], link.name)
                except BpfError as exc:
                    if exc.errno != errno.ENOLINK:
                        raise
                    # the pod's netns is gone, which severs its link: nothing is left to update
                    link.unlink()
                finally:
                    os.close(link_fd)
            for name in loader.RETIRED_MAPS:
                with contextlib.suppress(FileNotFoundError):
                    (pin_dir / name).unlink()
            return dp
        finally:
            os.close(cg_fd)
            module.cleanup()

    @classmethod
    def open(cls, pin_dir: str | os.PathLike = DEFAULT_PIN_DIR) -> "EbpfDatapath":
        """Re-open a loaded datapath from its pins, without compiling anything."""
        pin_dir = Path(pin_dir)
        maps = {}
        try:
            for name, (k, v) in _MAPS.items():
                maps[name] = bpf.RawMap(bpf.obj_get(str(pin_dir / name)), name, k, v)
            counters = bpf.RawMap(bpf.obj_get(str(pin_dir / "mcni_counters_v1")), "mcni_counters_v1", L.U32,
                                  L.percpu_counters_type())
        except BpfError as exc:
            for m in maps.values():
                m.close()
            if exc.errno == errno.ENOENT:
                raise BpfError(f"no meshcni datapath is loaded at {pin_dir}", exc.errno) from exc
            raise
        return cls(pin_dir, maps, counters)

    @staticmethod
    def is_loaded(pin_dir: str | os.PathLike = DEFAULT_PIN_DIR) -> bool:
        return (Path(pin_dir) / "mcni_pods_v1").exists()

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self._counters.close()

    def unload(self) -> None:
        """Detach every link and remove every pin of this datapath (pods are released with it)."""
        for key, _slot in self.maps["mcni_pods_v1"].items():
            self.maps["mcni_pods_v1"].delete(key)
        for link in sorted(self.pins.links.glob("*")) if self.pins.links.exists() else []:
            loader.remove_link(link, link.name)
        self.close()
        for sub in (self.pins.progs, self.pins.links):
            if sub.exists():
                for p in sub.iterdir():
                    p.unlink()
                sub.rmdir()
        for p in list(self.pin_dir.iterdir()) if self.pin_dir.exists() else []:
            p.unlink()
        if self.pin_dir.exists():
            self.pin_dir.rmdir()

    # --- pods ---------------------------------------------------------------------------------------------

    def capture(self, pod: PodNet, listener_fds: dict[int, int] | None = None, directions=BOTH) -> int:
        """Enrol a pod; returns its slot. A pod that is already enrolled keeps its slot and gets `pod.config`.

        `listener_fds` maps address family to the proxy's inbound listening socket; when omitted, the
        listener the proxy bound itself in the pod's netns is found and duplicated. `directions` says which
        side eBPF captures (another backend may own the other): without inbound, no sk_lookup link is
        attached and no listener registered, and ones left by an earlier capture are removed.
        """
        netns.check_netns(pod.netns)
        cookie = netns_cookie(pod.netns)
        pods = self.maps["mcni_pods_v1"]
        existing = pods.lookup(L.U64(cookie))
        slot = existing.value if existing is not None else self._free_slot()
        written: list[tuple[str, object]] = []
        link_created = False
        ips = _ip_keys(pod.ips)
        # a re-capture rewrites in place; keys an earlier config or IP set left are cleared only if there are any
        stale_policy, stale_ips = self._stale_keys(slot, pod.config, ips) if existing is not None else (False, False)
        try:
            policy_keys = self._write_policy(slot, pod.config, written, clear=stale_policy)
            if stale_ips:  # IPs the pod no longer has must not keep naming its slot
                self._clear_ips(slot, keep={bytes(ip) for ip in ips})
            self._write_config(slot, pod.config, directions, policy_keys, len(ips))
            if existing is None:
                self._counters.update(L.U32(slot), L.percpu_counters_type()())
            for ip in ips:
                self.maps["mcni_pod_ips_v1"].update(ip, L.U32(slot))
                written.append(("mcni_pod_ips_v1", ip))
            if Direction.INBOUND in directions:
                link_created = self._attach_sk_lookup(pod.netns, cookie)
                self.register_listener(slot, pod, listener_fds)
            else:
                loader.remove_link(self.pins.netns_link(cookie), "sk_lookup")
                self._clear_listeners(slot)
            pods.update(L.U64(cookie), L.U32(slot))  # last: this is what turns capture on
        except BaseException:
            if existing is None:
                for name, key in written:
                    self.maps[name].delete(key)
                self._clear_policy(slot)
                self._empty_slot(slot)
                if link_created:
                    loader.remove_link(self.pins.netns_link(cookie), "sk_lookup")
            raise
        return slot

    def release(self, pod: PodNet) -> bool:
        """Stop capturing a pod; returns whether it was enrolled. Works after its netns is gone."""
        slot, cookie = self._find(pod)
        if slot is None:
            return False
        if cookie is not None:
            self.maps["mcni_pods_v1"].delete(L.U64(cookie))  # first: outbound capture stops here
            loader.remove_link(self.pins.netns_link(cookie), "sk_lookup")
        if not self._delete_counted_keys(slot, pod):
            self._clear_ips(slot)
            self._clear_policy(slot)
        self._empty_slot(slot)
        return True

    def verify(self, pod: PodNet, directions=BOTH) -> list[str]:
        problems = []
        try:
            cookie = netns_cookie(pod.netns)
        except NamespaceNotFound as exc:
            return [str(exc)]
        slot = self.maps["mcni_pods_v1"].lookup(L.U64(cookie))
        if slot is None:
            return [f"pod {pod.key} (netns {pod.netns}) is not enrolled"]
        cfg = self.maps["mcni_pod_config_v1"].lookup(L.U32(slot.value))
        ports, cidrs = _policy_keys(slot.value, pod.config)
        want = _pod_struct(slot.value, pod.config, self.splice, directions, len(ports) + len(cidrs),
                           len(_ip_keys(pod.ips)))
        if bytes(cfg) != bytes(want):
            problems.append("the pod's settings in mcni_pod_config_v1 differ from its configuration")
        for ip in pod.ips:
            got = self.maps["mcni_pod_ips_v1"].lookup(L.Ip.of(ip))
            if got is None or got.value != slot.value:
                problems.append(f"pod IP {ip} is not mapped to the pod")
        inbound = Direction.INBOUND in directions
        if inbound and not self.pins.netns_link(cookie).exists():
            problems.append("no sk_lookup link is attached to the pod's netns")
        if not inbound and self.pins.netns_link(cookie).exists():
            problems.append("an sk_lookup link is attached although eBPF does not capture the pod's inbound")
        listener = self.maps["mcni_listeners_v1"].lookup(L.U32(slot.value * 2))
        if inbound and pod.config.mode is Mode.EBPF and listener is None:
            problems.append("no inbound proxy listener is registered")
        for hook in loader.HOOKS:
            if hook.target != "netns" and not self.pins.link(hook.name).exists():
                problems.append(f"the {hook.name} program is not attached")
        return problems

    def register_listener(self, slot: int, pod: PodNet, listener_fds: dict[int, int] | None = None) -> int:
        """Put the proxy's inbound listener(s) into the SOCKMAP; returns how many were registered.

        Each is marked as the proxy's listener first (socket storage the kernel clones onto every socket it
        accepts), so that none of its connections is taken for an app's and left unspliced.
        """
        owned = listener_fds is None
        fds = listeners.take_listeners(pod.netns, pod.config.inbound_port) if owned else listener_fds
        try:
            for family, fd in fds.items():
                idx = slot * 2 + (1 if family == socket.AF_INET6 else 0)
                self.maps["mcni_proxy_listener_v1"].update(L.U32(fd), L.U8(1))
                self.maps["mcni_listeners_v1"].update(L.U32(idx), L.U64(fd))
            return len(fds)
        finally:
            if owned:
                for fd in fds.values():
                    os.close(fd)  # the SOCKMAP holds the socket itself, not our descriptor

    def slot_of(self, pod: PodNet) -> int | None:
        return self._find(pod)[0]

    def counters(self, pod: PodNet | int) -> dict[str, int]:
        """Counters of a pod (or a slot), summed over CPUs."""
        slot = pod if isinstance(pod, int) else self.slot_of(pod)
        if slot is None:
            raise BpfError(f"pod {pod.key} is not enrolled", errno.ENOENT)
        per_cpu = self._counters.lookup(L.U32(slot))
        totals = [sum(cpu.v[i] for cpu in per_cpu) for i in range(len(L.COUNTERS))]
        return dict(zip(L.COUNTERS, totals))

    def enrolled(self) -> dict[int, int]:
        """netns cookie -> slot of every enrolled pod."""
        return {k.value: v.value for k, v in self.maps["mcni_pods_v1"].items()}

    def map_entries(self, name: str) -> int:
        return len(self.maps[name].keys())

    # --- internals ------------------------------------------------------------------------------------------

    def _find(self, pod: PodNet) -> tuple[int | None, int | None]:
        cookie = None
        try:
            cookie = netns_cookie(pod.netns)
        except NamespaceNotFound:
            pass
        if cookie is not None:
            slot = self.maps["mcni_pods_v1"].lookup(L.U64(cookie))
            if slot is not None:
                return slot.value, cookie
        for ip in pod.ips:  # the netns is gone: the pod's IPs still name its slot
            slot = self.maps["mcni_pod_ips_v1"].lookup(L.Ip.of(ip))
            if slot is not None:
                for c, s in self.enrolled().items():
                    if s == slot.value:
                        return slot.value, c
                return slot.value, None
        return None, cookie

    def _free_slot(self) -> int:
        """A slot whose config is empty, searched round-robin from the last one handed out.

        An enrolled slot always has a non-zero outbound port (ports are validated 1-65535) and release
        writes an empty config, so one array lookup per candidate tells free from used: enrolment stays
        O(1) on a full node instead of walking every pod's map entries.
        """
        configs = self.maps["mcni_pod_config_v1"]
        for i in range(self.max_pods):
            slot = (self._slot_hint + i) % self.max_pods
            cfg = configs.lookup(L.U32(slot))
            if cfg is None or cfg.outbound_port == 0:
                self._slot_hint = slot + 1
                return slot
        raise BpfError(f"all {self.max_pods} pod slots are in use", errno.ENOSPC)

    def _write_config(self, slot: int, config: PodConfig, directions, policy_keys: int, ip_keys: int) -> None:
        self.maps["mcni_pod_config_v1"].update(
            L.U32(slot), _pod_struct(slot, config, self.splice, directions, policy_keys, ip_keys))

    def _write_policy(self, slot: int, config: PodConfig, written: list, clear: bool = False) -> int:
        """Write the slot's port and CIDR policy; returns how many keys it owns now.

        `clear` first removes every key of the slot (a scan of the maps all pods share), for when an earlier
        config left keys this one does not name. A fresh slot has none (release removes them).
        """
        if clear:
            self._clear_policy(slot)
        ports, cidrs = _policy_keys(slot, config)
        for key, action in ports:
            self.maps["mcni_ports_v1"].update(key, L.U8(action))
            written.append(("mcni_ports_v1", key))
        for key in cidrs:
            self.maps["mcni_cidrs_v1"].update(key, L.U8(key.prefixlen - L.CIDR_KEY_FIXED_BITS))
            written.append(("mcni_cidrs_v1", key))
        return len(ports) + len(cidrs)

    def _stale_keys(self, slot: int, config: PodConfig, ips: list[L.Ip]) -> tuple[bool, bool]:
        """Whether an enrolled slot owns policy keys, and IP keys, beyond those `config` and `ips` name.

        Answered from the counts in its config entry and one lookup per named key; (True, True) when the
        entry has no counts (written by an older meshcni), so that the caller scans.
        """
        cfg = self.maps["mcni_pod_config_v1"].lookup(L.U32(slot))
        if cfg is None or not cfg.flags & L.F_KEYS_COUNTED:
            return True, True
        ports, cidrs = _policy_keys(slot, config)
        held = sum(self.maps["mcni_ports_v1"].lookup(key) is not None for key, _action in ports)
        for key in cidrs:  # a trie lookup finds the longest covering prefix; the value says which one it was
            found = self.maps["mcni_cidrs_v1"].lookup(key)
            held += found is not None and found.value == key.prefixlen - L.CIDR_KEY_FIXED_BITS
        ip_map = self.maps["mcni_pod_ips_v1"]
        held_ips = sum(1 for ip in ips if (owner := ip_map.lookup(ip)) is not None and owner.value == slot)
        return held != cfg.policy_keys, held_ips != cfg.ip_keys

    def _delete_counted_keys(self, slot: int, pod: PodNet) -> bool:
        """Delete the keys the pod's config and IPs name; True when that was every key the slot owned.

        The counts capture recorded in the slot's config entry say how many keys there are. Releasing with
        the config the pod was captured with (what the agent does) accounts for all of them, and a release
        then costs a few deletes whatever the number of pods. A different config, or an entry written
        before the counts existed, returns False and the caller scans.
        """
        cfg = self.maps["mcni_pod_config_v1"].lookup(L.U32(slot))
        if cfg is None or not cfg.flags & L.F_KEYS_COUNTED:
            return False
        ports, cidrs = _policy_keys(slot, pod.config)
        policy = sum(self.maps["mcni_ports_v1"].delete(key) for key, _action in ports)
        policy += sum(self.maps["mcni_cidrs_v1"].delete(key) for key in cidrs)
        ips = 0
        ip_map = self.maps["mcni_pod_ips_v1"]
        for ip in _ip_keys(pod.ips):
            owner = ip_map.lookup(ip)
            if owner is not None and owner.value == slot:  # an IP another pod took over is not ours to delete
                ips += ip_map.delete(ip)
        return policy == cfg.policy_keys and ips == cfg.ip_keys

    def _clear_policy(self, slot: int) -> None:
        slot_bytes = bytes(L.U32(slot))
        for name, key_type in (("mcni_ports_v1", L.PortKey), ("mcni_cidrs_v1", L.CidrKey)):
            at = key_type.slot.offset
            self.maps[name].delete_where(lambda key, _action: key[at:at + 4] == slot_bytes)

    def _clear_ips(self, slot: int, keep: frozenset[bytes] | set[bytes] = frozenset()) -> None:
        slot_bytes = bytes(L.U32(slot))
        self.maps["mcni_pod_ips_v1"].delete_where(lambda ip, owner: owner == slot_bytes and ip not in keep)

    def _empty_slot(self, slot: int) -> None:
        """Hand the slot back: an empty config marks it free (see _free_slot), its listeners go."""
        self.maps["mcni_pod_config_v1"].update(L.U32(slot), L.Pod())
        self._clear_listeners(slot)

    def _clear_listeners(self, slot: int) -> None:
        listeners_map = self.maps["mcni_listeners_v1"]
        for idx in (slot * 2, slot * 2 + 1):
            # a SOCKMAP answers EINVAL, not ENOENT, for an empty slot: look before deleting
            if listeners_map.lookup(L.U32(idx)) is not None:
                listeners_map.delete(L.U32(idx))

    def _attach_sk_lookup(self, netns_path: str, cookie: int) -> bool:
        """Attach the sk_lookup program to the pod's netns once; returns whether a link was created."""
        path = self.pins.netns_link(cookie)
        if path.exists():
            return False
        prog_fd = bpf.obj_get(str(self.pins.prog("sk_lookup")))
        ns_fd = netns.netns_fd(netns_path)
        try:
            loader.ensure_link(path, prog_fd, ns_fd, bpf.ATTACH_SK_LOOKUP, f"sk_lookup to {netns_path}")
        finally:
            os.close(ns_fd)
            os.close(prog_fd)
        return True


def _policy_keys(slot: int, config: PodConfig) -> tuple[list[tuple[L.PortKey, int]], list[L.CidrKey]]:
    """The slot's port keys (with their action) and CIDR keys for a config, each once.

    What capture writes, verify expects and release deletes all come from here.
    """
    ports: dict[bytes, tuple[L.PortKey, int]] = {}
    entries = [(p, L.DIR_INBOUND, L.POLICY_EXCLUDE) for p in config.effective_exclude_inbound_ports]
    entries += [(p, L.DIR_INBOUND, L.POLICY_INCLUDE) for p in config.include_inbound_ports or ()]
    entries += [(p, L.DIR_OUTBOUND, L.POLICY_EXCLUDE) for p in config.exclude_outbound_ports]
    entries += [(p, L.DIR_OUTBOUND, L.POLICY_INCLUDE) for p in config.include_outbound_ports]
    for port, direction, action in entries:
        key = L.PortKey(slot=slot, port=port, dir=direction)
        if direction == L.DIR_INBOUND and action == L.POLICY_INCLUDE and bytes(key) in ports:
            continue  # an exclusion of the same port wins, as in Istio
        ports[bytes(key)] = (key, action)
    cidrs: dict[bytes, L.CidrKey] = {}
    for kind, nets in ((L.POLICY_EXCLUDE, config.exclude_outbound_cidrs),
                       (L.POLICY_INCLUDE, config.include_outbound_cidrs or ())):
        for net in nets:
            key = L.CidrKey.of(slot, kind, net)
            cidrs.setdefault(bytes(key), key)
    return list(ports.values()), list(cidrs.values())


def _ip_keys(ips) -> list[L.Ip]:
    """The pod's IPs as mcni_pod_ips_v1 keys, each once."""
    keys: dict[bytes, L.Ip] = {}
    for ip in ips:
        key = L.Ip.of(ip)
        keys.setdefault(bytes(key), key)
    return list(keys.values())


def _pod_struct(slot: int, config: PodConfig, splice: bool, directions=BOTH, policy_keys: int = 0,
                ip_keys: int = 0) -> L.Pod:
    flags = L.F_SPLICE if splice else 0
    if splice and config.splice_app:
        flags |= L.F_SPLICE_APP
    if config.mode is Mode.EBPF:
        flags |= L.F_CAPTURE_OUTBOUND if Direction.OUTBOUND in directions else 0
        flags |= L.F_CAPTURE_INBOUND if Direction.INBOUND in directions else 0
    if config.include_inbound_ports is None:
        flags |= L.F_INBOUND_ALL_PORTS
    if config.include_outbound_cidrs is None:
        flags |= L.F_OUTBOUND_ALL_CIDRS
    counted = policy_keys <= 0xFFFF and ip_keys <= 0xFFFF  # beyond that a release scans, as before
    if counted:
        flags |= L.F_KEYS_COUNTED
    return L.Pod(slot=slot, flags=flags, proxy_uid=config.proxy_uid, proxy_gid=config.proxy_gid,
                 outbound_port=config.outbound_port, inbound_port=config.inbound_port,
                 policy_keys=policy_keys if counted else 0, ip_keys=ip_keys if counted else 0)
