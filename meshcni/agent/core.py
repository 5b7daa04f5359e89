"""The agent's decisions: enrol, release, verify and switch pods, and re-adopt them all after a restart.

Both front doors (gRPC for tools, HTTP for the CNI plugin) call these methods, so the rules live once:
- a request is validated completely before anything changes (`PodSpec.parse`), and a rejected request
  leaves the registry and the maps as they were;
- a pod's mode comes from, most specific first: an override set with `meshcni mode set`, its
  `meshcni.io/mode` / `sidecar.istio.io/inject` annotations, the node default;
- the registry record is written with phase "adding" before the datapath is touched and "captured" after,
  so a crash at any point is repaired by the next start (`recover`);
- switching modes is make-before-break: the new backend captures before the old one releases, and the two
  never fight (eBPF's rewritten connections go to loopback, which Istio's rules leave alone; iptables'
  redirected connections arrive on the proxy's port, which the sk_lookup program never steers);
- every mutation holds one lock: enrolment allocates datapath slots, and a node has tens of pods, not
  thousands of enrolments per second, so simplicity beats parallelism here.
The inbound listener of an eBPF pod is usually not there yet at ADD time (the sidecar starts after the
sandbox); such pods are `listener: pending` and `adopt_listeners` registers the proxy's listener when it
appears — and again when the proxy is replaced and the kernel dropped the old socket from the SOCKMAP.
A pod that leaves iptables mode keeps its netns's conntrack on while a connection the rules redirected is
still open; `drop_conntrack_holds` on the tick ends that once the last such connection has, so a pod moved
to eBPF under load stops paying conntrack's per-packet cost.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from meshcni.agent.policy import NoPolicy, PolicySource
from meshcni.agent.proxies import ProxyManager
from meshcni.agent.registry import PodRecord, Registry, valid_container_id
from meshcni.config import ConfigError, Mode, PodConfig
from meshcni.datapath import layout as L
from meshcni.datapath import listeners
from meshcni.datapath.interceptor import PodNet
from meshcni.handoff.errors import HandoffError
from meshcni.sys import netns as netns_sys
from meshcni.sys.errors import NamespaceNotFound, SysError

log = logging.getLogger("meshcni.agent")

# CNI error codes the HTTP front door reports (meshcni/cni/protocol.py) next to the gRPC status names.
CNI_UNKNOWN_CONTAINER = 3
CNI_INVALID_CONFIG = 7
CNI_TRY_AGAIN = 11
CNI_INTERNAL = 100
CNI_NOT_CAPTURED = 101
# Registered pods whose SOCKMAP entry one tick re-checks, and waiting pods one tick searches a proxy listener
# for (see adopt_listeners): a tick's work, and the GIL time an API call can wait behind, stays flat as the
# node fills up.
SCAN_PER_TICK = 32
SEARCH_PER_TICK = 8
# A proxy's listen() registers its listener itself (sockops, bpf/sockops.c), so the agent's search is only the
# safety net for listeners that existed before enrolment or live outside the attached cgroup: a pod that
# still has none is searched again after 0.5 s, 1 s, 2 s, ... and then every 30 s.
SEARCH_BACKOFF_MAX = 30.0
# A pod that left iptables mode while a connection the rules redirected was open keeps conntrack on until it
# ends (meshcni/datapath/iptables.py); the tick asks again every CONNTRACK_RETRY_S, for at most
# CONNTRACK_PER_TICK pods, each check being two iptables-save runs and a conntrack listing.
CONNTRACK_RETRY_S = 5.0
CONNTRACK_PER_TICK = 4


class AgentError(Exception):
    """A request the agent refuses or could not carry out; `kind` picks the gRPC status and CNI code."""

    KINDS = {
        "invalid": ("INVALID_ARGUMENT", CNI_INVALID_CONFIG),
        "not_found": ("NOT_FOUND", CNI_UNKNOWN_CONTAINER),
        "precondition": ("FAILED_PRECONDITION", CNI_INTERNAL),
        "not_captured": ("FAILED_PRECONDITION", CNI_NOT_CAPTURED),
        "unavailable": ("UNAVAILABLE", CNI_TRY_AGAIN),
        "exhausted": ("RESOURCE_EXHAUSTED", CNI_TRY_AGAIN),
        "internal": ("INTERNAL", CNI_INTERNAL),
    }

    def __init__(self, kind: str, msg: str, details: str = ""):
        super().__init__(msg)
        self.kind = kind
        self.msg = msg
        self.details = details

    @property
    def grpc_code(self) -> str:
        return self.KINDS[self.kind][0]

    @property
    def cni_code(self) -> int:
        return self.KINDS[self.kind][1]


@dataclass(frozen=True)
class PodSpec:
    """A validated AddPod/DelPod/CheckPod request."""

    container_id: str
    netns: str
    ifname: str
    ips: tuple[str, ...]
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""

    @classmethod
    def parse(cls, data: dict, *, need_netns: bool = True) -> "PodSpec":
        cid = data.get("container_id") or ""
        if not isinstance(cid, str) or not valid_container_id(cid):
            raise AgentError("invalid", f"container id {cid!r} is missing or not a valid id")
        ns = data.get("netns") or ""
        if not isinstance(ns, str):
            raise AgentError("invalid", "netns must be a string path")
        if need_netns:
            if not ns:
                raise AgentError("invalid", "netns is required")
            if not ns.startswith("/") or "/../" in ns + "/":
                raise AgentError("invalid", f"netns {ns!r} must be an absolute path without '..'")
        ifname = data.get("ifname") or "eth0"
        if not isinstance(ifname, str) or not 0 < len(ifname) < 16 or "/" in ifname:
            raise AgentError("invalid", f"ifname {ifname!r} is not a valid interface name")
        raw_ips = data.get("ips") or []
        if not isinstance(raw_ips, (list, tuple)):
            raise AgentError("invalid", "ips must be a list of addresses")
        ips = []
        for raw in raw_ips:
            try:
                ips.append(str(ipaddress.ip_interface(str(raw)).ip))
            except ValueError:
                raise AgentError("invalid", f"{raw!r} is not an IP address") from None
        fields = {}
        for key in ("pod_name", "pod_namespace", "pod_uid"):
            value = data.get(key) or ""
            if not isinstance(value, str) or len(value) > 253:
                raise AgentError("invalid", f"{key} must be a string of at most 253 characters")
            fields[key] = value
        return cls(container_id=cid, netns=ns, ifname=ifname, ips=tuple(ips), **fields)


def _ask_about_hold(ask, name: str, pod: PodNet, *, doing: str, failed: bool) -> bool:
    """One question to the iptables interceptor about a pod's conntrack hold; a system error is logged and
    answers `failed` (the hold stays, and the tick asks again)."""
    try:
        return ask(pod)
    except (SysError, OSError) as exc:
        log.warning("pod %s: %s the conntrack hold: %s", name, doing, exc)
        return failed


class AgentCore:
    """The registry plus the interceptors, behind one lock."""

    def __init__(self, registry: Registry, interceptors: dict[Mode, object], *, ebpf=None,
                 node_mode: Mode = Mode.EBPF, policy: PolicySource | None = None,
                 proxies: ProxyManager | None = None, hold_listeners: bool = False):
        self.registry = registry
        self.interceptors = interceptors  # Mode -> Interceptor; OFF has none
        self.ebpf = ebpf  # the EbpfDatapath, when loaded (counters, slots, listeners)
        self.node_mode = node_mode
        self.policy = policy or NoPolicy()
        self.proxies = proxies  # agent-held listeners and upgrades; None: every proxy binds its own
        self.hold_listeners = hold_listeners  # the node default of annotation meshcni.io/listeners
        self.lock = threading.RLock()
        self._next_search: dict[str, tuple[float, float]] = {}  # container id -> (next search time, delay)
        self._scan_cursor = 0
        self._conntrack_due: dict[str, float] = {}  # container id -> when to retry dropping its conntrack hold
        self.enrol_errors: dict[str, int] = {}

    # --- the CNI verbs ------------------------------------------------------------------------------------

    def add_pod(self, spec: PodSpec, *, adopt_from: Mode | None = None) -> PodRecord:
        """Enrol (or re-apply) a pod. `adopt_from` names the mode that already captures a pod we do not know
        yet (the plugin's failurePolicy "iptables" rules): the new mode captures first, then that one is
        released, so the pod is never uncaptured in between."""
        try:
            netns_sys.check_netns(spec.netns)
        except NamespaceNotFound as exc:
            self._count_error("netns")
            raise AgentError("not_found", str(exc)) from exc
        with self.lock:
            existing = self.registry.get(spec.container_id)
            if existing and existing.netns != spec.netns:
                self._count_error("conflict")
                raise AgentError("invalid", f"container {spec.container_id} is already enrolled with netns "
                                            f"{existing.netns}, not {spec.netns}; delete it first")
            record = existing or PodRecord(container_id=spec.container_id, netns=spec.netns)
            record.ifname = spec.ifname
            record.ips = list(spec.ips)
            record.pod_name, record.pod_namespace, record.pod_uid = spec.pod_name, spec.pod_namespace, spec.pod_uid
            try:
                config, source = self._desired_config(record)
            except ConfigError as exc:
                self._count_error("config")
                raise AgentError("invalid", f"pod {record.display_name}: {exc}") from exc
            if existing is None:
                record.phase = "adding"
                record.mode = config.mode.value
                record.config = config.to_dict()
                self._persist(record)
            try:
                self._apply(record, config, source, previous=Mode(existing.mode) if existing else adopt_from)
            except AgentError:
                if existing is None:
                    if self.proxies is not None:
                        self.proxies.drop(record.container_id)
                    self.registry.remove(record.container_id)
                raise
            return record

    def del_pod(self, spec: PodSpec) -> PodRecord | None:
        """Release and forget a pod; a pod we never had is fine (DEL must never block a teardown)."""
        with self.lock:
            record = self.registry.get(spec.container_id)
            if record is None:
                return None
            problems = self._release(record, Mode(record.mode))
            if problems:
                log.warning("pod %s: released with problems: %s", record.display_name, "; ".join(problems))
            if self.proxies is not None:
                self.proxies.drop(record.container_id)
            self.registry.remove(record.container_id)
            if hasattr(self.policy, "forget"):
                self.policy.forget(record.pod_namespace, record.pod_name)
            log.info("pod %s released (%s)", record.display_name, record.mode)
            return record

    def check_pod(self, spec: PodSpec) -> list[str]:
        record = self.registry.get(spec.container_id)
        if record is None:
            raise AgentError("not_found", f"container {spec.container_id} is not enrolled on this node")
        if spec.netns and spec.netns != record.netns:
            return [f"enrolled with netns {record.netns}, CHECK names {spec.netns}"]
        return self.verify(record)

    def verify(self, record: PodRecord) -> list[str]:
        mode = Mode(record.mode)
        problems = []
        if record.phase != "captured":
            problems.append(f"enrolment is in phase {record.phase!r}, not 'captured'")
        interceptor = self.interceptors.get(mode)
        if mode is not Mode.OFF and interceptor is None:
            return problems + [f"mode {mode.value} is not available on this node"]
        if interceptor is not None:
            problems += interceptor.verify(self._pod_net(record, PodConfig.from_dict(record.config)))
        return problems

    def gc(self, valid: set[tuple[str, str]]) -> list[PodRecord]:
        removed = []
        with self.lock:
            for record in self.registry.all():
                if (record.container_id, record.ifname) not in valid:
                    self.del_pod(PodSpec(record.container_id, record.netns, record.ifname, tuple(record.ips)))
                    removed.append(record)
        return removed

    # --- modes --------------------------------------------------------------------------------------------

    def set_pod_mode(self, key: str, mode: str) -> PodRecord:
        """Override one pod's mode ("" clears the override and returns it to annotations/node default)."""
        if mode and mode not in {m.value for m in Mode}:
            raise AgentError("invalid", f"mode {mode!r} is not one of ebpf, iptables, off")
        with self.lock:
            record = self.find(key)
            record.mode_override = mode
            self._reconfigure(record)
            return record

    def set_node_mode(self, mode: str) -> list[PodRecord]:
        try:
            new = Mode(mode)
        except ValueError:
            raise AgentError("invalid", f"mode {mode!r} is not one of ebpf, iptables, off") from None
        if new is not Mode.OFF and new not in self.interceptors:
            raise AgentError("precondition", f"mode {new.value} is not available on this node")
        changed = []
        with self.lock:
            self.node_mode = new
            for record in self.registry.all():
                before = record.mode
                self._reconfigure(record)
                if record.mode != before:
                    changed.append(record)
        return changed

    def on_policy_change(self, namespace: str, name: str, _annotations: dict) -> None:
        """A pod's annotations changed (policy file edit or API-server watch): re-apply its config."""
        with self.lock:
            for record in self.registry.all():
                if record.pod_namespace == namespace and record.pod_name == name:
                    try:
                        self._reconfigure(record)
                    except AgentError as exc:
                        log.error("pod %s: cannot apply its new annotations: %s", record.display_name, exc)

    def _reconfigure(self, record: PodRecord) -> None:
        try:
            config, source = self._desired_config(record)
        except ConfigError as exc:
            raise AgentError("invalid", f"pod {record.display_name}: {exc}") from exc
        if config.to_dict() == record.config and source == record.mode_source and record.phase == "captured":
            return
        self._apply(record, config, source, previous=Mode(record.mode))

    # --- lookups and counters -------------------------------------------------------------------------------

    def find(self, key: str) -> PodRecord:
        record = self.registry.find(key)
        if record is None:
            raise AgentError("not_found", f"no enrolled pod matches {key!r} (container id, namespace/name "
                                          f"or a pod name unique on this node)")
        return record

    def slot_of(self, record: PodRecord) -> int | None:
        if self.ebpf is None or record.mode != Mode.EBPF.value or record.slot < 0:
            return None
        return record.slot

    def counters(self, record: PodRecord) -> dict[str, int]:
        """The pod's capture counters from whatever captures it: the eBPF slot's per-CPU sums, the iptables
        rules' packet counts (see IptablesInterceptor.counters), or both on a hybrid node, where each owns
        its own directions and the two add up. A pod in mode off has none."""
        slot = self.slot_of(record)
        totals = dict(self.ebpf.counters(slot)) if slot is not None else {}
        iptables = self._iptables_capturing(Mode(record.mode))
        if iptables is not None:
            pod = self._pod_net(record, PodConfig.from_dict(record.config))
            for name, value in iptables.counters(pod).items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def _iptables_capturing(self, mode: Mode):
        """The iptables interceptor that captures some direction of a pod in `mode`, if any."""
        if mode is Mode.IPTABLES:
            return self.interceptors.get(Mode.IPTABLES)
        if mode is Mode.EBPF:
            hybrid = self.interceptors.get(Mode.EBPF)
            plan = getattr(hybrid, "plan", None)  # only a HybridInterceptor has a plan
            if plan is not None and plan.directions(Mode.IPTABLES):
                return hybrid.iptables
        return None

    # --- proxies ------------------------------------------------------------------------------------------

    def proxy_status(self, record: PodRecord) -> dict | None:
        held = self.proxies.get(record.container_id) if self.proxies is not None else None
        return None if held is None else self.proxies.status(held)

    def upgrade_proxy(self, key: str, kind: str, *, argv: list[str] | None = None, stop_signal: str = "SIGUSR1",
                      ready_socket: str | None = None, timeout: float = 10.0):
        """`meshcni proxy upgrade`: replace the pod's proxy by `kind` (see meshcni.agent.proxies)."""
        record = self.find(key)
        if self.proxies is None:
            raise AgentError("precondition", "this agent does not manage proxies (no handoff directory)")
        try:
            sig = signal.Signals[stop_signal if stop_signal.startswith("SIG") else "SIG" + stop_signal]
        except KeyError:
            raise AgentError("invalid", f"{stop_signal!r} is not a signal name") from None
        if not 0 < timeout <= 300:
            raise AgentError("invalid", f"timeout {timeout:g}s is outside (0, 300]")
        if ready_socket is not None and not ready_socket.startswith("/"):
            raise AgentError("invalid", f"ready socket {ready_socket!r} must be an absolute path")
        if record.mode == Mode.OFF.value:
            raise AgentError("precondition", f"pod {record.display_name} is not captured (mode off)")
        held = self.proxies.get(record.container_id)
        pod = self._pod_net(record, PodConfig.from_dict(record.config))
        swap = None
        if held is None and kind == "adopt":
            if self.slot_of(record) is None:
                raise AgentError("precondition", f"adoption swaps a SOCKMAP entry; pod {record.display_name} "
                                                 f"is in {record.mode} mode")
            swap = lambda fds: self.swap_listener(record, fds)  # noqa: E731
        stats = held.stats if held is not None else self.proxies.adopt_stats_for(record.container_id)
        try:
            return self.proxies.upgrade(held, pod, kind, argv=argv or None, stop_signal=sig,
                                        ready_socket=ready_socket, timeout=timeout, swap=swap, stats=stats)
        except HandoffError as exc:  # UpgradeError included
            raise AgentError("precondition", f"pod {record.display_name}: {exc}") from exc
        except (SysError, OSError) as exc:
            raise AgentError("internal", f"pod {record.display_name}: upgrade failed: {exc}") from exc

    # --- start-up -----------------------------------------------------------------------------------------

    def recover(self) -> dict:
        """Re-adopt the pods a previous agent enrolled: re-apply those whose netns exists, drop the rest."""
        report = {"readopted": 0, "removed": 0, "failed": 0, "skipped_files": []}
        records = self.registry.load()
        report["skipped_files"] = list(self.registry.skipped)
        with self.lock:
            for record in records:
                try:
                    netns_sys.check_netns(record.netns)
                except NamespaceNotFound:
                    self._release(record, Mode(record.mode))
                    if self.proxies is not None:
                        self.proxies.drop(record.container_id)
                    self.registry.remove(record.container_id)
                    report["removed"] += 1
                    log.info("pod %s: netns %s is gone; released", record.display_name, record.netns)
                    continue
                try:
                    config, source = self._desired_config(record)
                    # the previous agent's capture is still in the kernel: re-applying it is idempotent
                    self._apply(record, config, source, previous=Mode(record.mode))
                    report["readopted"] += 1
                except (AgentError, ConfigError) as exc:
                    report["failed"] += 1
                    log.error("pod %s: could not re-adopt: %s", record.display_name, exc)
                    continue
                if Mode.IPTABLES in self.interceptors and record.mode != Mode.IPTABLES.value:
                    # The retry schedule of a conntrack hold lives in memory: a pod the previous agent moved out
                    # of iptables mode under load may still hold conntrack on. Look once (a pod that never left
                    # iptables mode costs one check); the tick spreads the checks CONNTRACK_PER_TICK at a time.
                    self._conntrack_due.setdefault(record.container_id, time.monotonic())
        return report

    def adopt_listeners(self) -> int:
        """Register the proxy listener of eBPF pods that have none (a proxy just started, or was replaced).

        The kernel drops a closed listener from the SOCKMAP by itself, so "missing from the map" is the one
        signal for both cases. A tick stays cheap however many pods the node has: a pod still waiting for
        its proxy is looked at only when its back-off expires, at most `SEARCH_PER_TICK` of them per tick,
        and registered pods are re-checked `SCAN_PER_TICK` at a time, round robin (a replaced self-binding
        proxy is noticed within pods / SCAN_PER_TICK ticks). Pods whose listeners the agent holds need no
        search at all. The search for a self-binding proxy's socket asks the pod netns's kernel (sock_diag)
        and walks /proc at most once per tick for all pods (only when some pod has a listener to take),
        outside the lock.
        """
        if self.ebpf is None:
            return 0
        listeners_map = self.ebpf.maps["mcni_listeners_v1"]
        now = time.monotonic()
        todo, changed = [], []
        # Snapshot without the lock, so a tick never stalls an AddPod; changes are re-checked under it below.
        captured = sorted((r for r in self.registry.all()
                           if r.mode == Mode.EBPF.value and r.phase == "captured" and r.slot >= 0),
                          key=lambda r: r.slot)
        registered = [r for r in captured if r.listener == "registered"]
        # Waiting pods whose back-off expired, the shortest back-off first: a pod whose proxy is just starting
        # is found within a tick or two even when many pods without a proxy wait at the back-off cap.
        waiting = [(self._next_search.get(r.container_id, (0.0, 0.0)), r) for r in captured
                   if r.listener != "registered"]
        due = sorted(((backoff, at, r) for (at, backoff), r in waiting if now >= at),
                     key=lambda d: (d[0], d[1], d[2].slot))
        look = [r for _, _, r in due[:SEARCH_PER_TICK]]
        if registered:
            start = self._scan_cursor % len(registered)
            batch = (registered[start:] + registered[:start])[:SCAN_PER_TICK]
            self._scan_cursor = start + len(batch)
            look += batch
        for record in look:
            slot = record.slot
            present = listeners_map.lookup(L.U32(slot * 2)) is not None
            state = "registered" if present else "pending"
            if state != record.listener:
                changed.append((record, slot, state))
            if not present:
                todo.append((record, PodConfig.from_dict(record.config)))
        if changed:
            with self.lock:
                for record, slot, state in changed:
                    if self.registry.get(record.container_id) is record and record.slot == slot:
                        record.listener = state
                        self._persist(record)
        if not todo:
            return 0
        index = listeners.ProcessIndex()  # /proc is walked once per tick, and only if some pod has a listener
        adopted = 0
        for record, config in todo:
            pod = self._pod_net(record, config)
            held = self.proxies.get(record.container_id) if self.proxies is not None else None
            fds: dict[int, int] = {}
            try:
                if held is not None:
                    fds = held.listeners.inbound_fds()  # ours: registered again, never closed here
                else:
                    fds = listeners.take_listeners(record.netns, config.inbound_port, index)
            except (SysError, OSError) as exc:
                log.warning("pod %s: looking for the proxy listener: %s", record.display_name, exc)
            if not fds:
                delay = min(max(self._next_search.get(record.container_id, (0.0, 0.25))[1] * 2, 0.5),
                            SEARCH_BACKOFF_MAX)
                self._next_search[record.container_id] = (now + delay, delay)
                continue
            try:
                with self.lock:
                    current = self.registry.get(record.container_id)
                    if current is None or current.slot != record.slot or current.mode != Mode.EBPF.value:
                        continue  # released or switched meanwhile
                    self.ebpf.register_listener(current.slot, pod, fds)
                    current.listener = "registered"
                    self._persist(current)
                    self._next_search.pop(record.container_id, None)
                    adopted += 1
                    log.info("pod %s: proxy listener registered (slot %d)", current.display_name, current.slot)
            except (SysError, OSError) as exc:
                log.warning("pod %s: cannot register the proxy listener: %s", record.display_name, exc)
            finally:
                if held is None:
                    for fd in fds.values():
                        os.close(fd)  # the SOCKMAP holds the socket itself
        return adopted

    def swap_listener(self, record: PodRecord, fds: dict[int, int]) -> None:
        """Point the pod's SOCKMAP slot at `fds` ({family: fd}, the caller keeps them): proxy adoption."""
        with self.lock:
            current = self.registry.get(record.container_id)
            if current is None or self.slot_of(current) is None:
                raise AgentError("precondition", f"pod {record.display_name} is not captured by eBPF; "
                                                 f"there is no SOCKMAP entry to swap")
            self.ebpf.register_listener(current.slot, self._pod_net(current, PodConfig.from_dict(current.config)),
                                        fds)
            current.listener = "registered"
            self._persist(current)

    # --- internals ------------------------------------------------------------------------------------------

    def _desired_config(self, record: PodRecord) -> tuple[PodConfig, str]:
        annotations = self.policy.annotations(record.pod_namespace, record.pod_name) or {}
        config = PodConfig.from_annotations(annotations, PodConfig(mode=self.node_mode,
                                                                   hold_listeners=self.hold_listeners))
        source = "annotation" if config.mode is not self.node_mode else "node"
        if record.mode_override:
            config, source = config.with_mode(record.mode_override), "override"
        return config, source

    def _apply(self, record: PodRecord, config: PodConfig, source: str, previous: Mode | None) -> None:
        """Capture with the new config/mode, then release the old mode (make-before-break)."""
        mode = config.mode
        interceptor = self.interceptors.get(mode)
        if mode is not Mode.OFF and interceptor is None:
            self._count_error("mode_unavailable")
            raise AgentError("precondition", f"pod {record.display_name}: mode {mode.value} is not available "
                                             f"on this node (see `meshcni doctor`)")
        pod = self._pod_net(record, config)
        held = self._hold_listeners(record, pod)
        if interceptor is not None:
            try:
                if mode is Mode.EBPF and interceptor is self.ebpf:
                    fds = held.listeners.inbound_fds() if held is not None else None
                    record.slot = self.ebpf.capture(pod, listener_fds=fds)
                else:
                    interceptor.capture(pod)  # iptables, or a hybrid split on a degraded node
                    if mode is Mode.EBPF and self.ebpf is not None:
                        slot = self.ebpf.slot_of(pod)
                        record.slot = -1 if slot is None else slot
            except NamespaceNotFound as exc:
                self._count_error("netns")
                raise AgentError("not_found", str(exc)) from exc
            except (SysError, OSError) as exc:
                self._count_error("capture")
                raise AgentError("internal", f"pod {record.display_name}: {mode.value} capture failed: {exc}") from exc
        if previous is not None and previous is not mode:
            problems = self._release(record, previous)
            if problems:
                log.warning("pod %s: leaving %s: %s", record.display_name, previous.value, "; ".join(problems))
        record.mode, record.mode_source, record.config = mode.value, source, config.to_dict()
        record.phase = "captured"
        if mode is not Mode.EBPF:
            record.slot = -1
        record.listener = self.listener_state(record) if mode is Mode.EBPF else "none"
        self._persist(record)
        log.info("pod %s captured: mode %s (%s)", record.display_name, mode.value, source)

    def _hold_listeners(self, record: PodRecord, pod: PodNet):
        """The pod's agent-held listeners (created before any capture, so the proxy can fetch them), or None."""
        if self.proxies is None:
            return None
        if not pod.config.hold_listeners:
            self.proxies.drop(record.container_id)
            return None
        try:
            return self.proxies.hold(record.container_id, record.display_name, pod)
        except NamespaceNotFound as exc:
            self._count_error("netns")
            raise AgentError("not_found", str(exc)) from exc
        except (HandoffError, SysError, OSError) as exc:
            self._count_error("listeners")
            raise AgentError("precondition", f"pod {record.display_name}: cannot hold the proxy's listeners: "
                                             f"{exc} (a proxy that binds its own wants meshcni.io/listeners: "
                                             f"proxy)") from exc

    def _release(self, record: PodRecord, mode: Mode) -> list[str]:
        interceptor = self.interceptors.get(mode)
        if interceptor is None:
            return []
        try:
            settled = interceptor.release(self._pod_net(record, PodConfig.from_dict(record.config).with_mode(mode)))
        except (SysError, OSError) as exc:
            return [f"{mode.value} release: {exc}"]
        if mode is Mode.IPTABLES and not settled:
            # a redirected connection still needs the conntrack hold: the tick checks again in a while
            self._conntrack_due[record.container_id] = time.monotonic() + CONNTRACK_RETRY_S
        return []

    def drop_conntrack_holds(self) -> int:
        """Retry dropping the conntrack hold of pods that left iptables mode with a redirected connection
        open; returns how many holds are settled now. A pod back in iptables mode, or gone, is forgotten.

        Whether the hold is still needed is asked outside the core lock: the answer lists the pod netns's
        conntrack table (tens of ms) and is "yes" for as long as a long-lived connection lasts, which must
        not hold up enrolments. Only a "no" takes the lock, and the drop then checks again under it."""
        iptables = self.interceptors.get(Mode.IPTABLES)
        if iptables is None or not self._conntrack_due:
            return 0
        now = time.monotonic()
        due = sorted((at, cid) for cid, at in self._conntrack_due.items() if at <= now)[:CONNTRACK_PER_TICK]
        settled = 0
        for _, cid in due:
            found = self._conntrack_pod(cid)
            if found is None:
                continue
            needed = _ask_about_hold(iptables.conntrack_hold_needed, *found, doing="checking", failed=True)
            with self.lock:
                if not needed:
                    # Under the lock: a switch back to iptables must not interleave with the hold's removal.
                    found = self._conntrack_pod(cid)
                    if found is None:
                        continue
                    if _ask_about_hold(iptables.drop_conntrack_hold, *found, doing="dropping", failed=False):
                        self._conntrack_due.pop(cid, None)
                        settled += 1
                        log.info("pod %s: no redirected connection left; conntrack hold settled", found[0])
                        continue
                self._conntrack_due[cid] = now + CONNTRACK_RETRY_S
        return settled

    def _conntrack_pod(self, cid: str) -> tuple[str, PodNet] | None:
        """The pod whose conntrack hold is scheduled for a retry (its name for the log, and the pod), or None
        (and off the schedule) when it is gone or back in iptables mode, whose capture owns the hold now."""
        with self.lock:
            record = self.registry.get(cid)
            if record is None or record.mode == Mode.IPTABLES.value:
                self._conntrack_due.pop(cid, None)
                return None
            return record.display_name, self._pod_net(record, PodConfig.from_dict(record.config))

    def listener_state(self, record: PodRecord) -> str:
        """Whether the pod's inbound listener is in the SOCKMAP now (the kernel registers a proxy's own
        listen() at once, so the record's copy, refreshed by the tick, can lag behind)."""
        slot = self.slot_of(record)
        if slot is None:
            return "none"
        present = self.ebpf.maps["mcni_listeners_v1"].lookup(L.U32(slot * 2)) is not None
        return "registered" if present else "pending"

    def _persist(self, record: PodRecord) -> None:
        try:
            self.registry.put(record)
        except SysError as exc:
            raise AgentError("internal", str(exc)) from exc

    def _count_error(self, reason: str) -> None:
        self.enrol_errors[reason] = self.enrol_errors.get(reason, 0) + 1

    @staticmethod
    def _pod_net(record: PodRecord, config: PodConfig) -> PodNet:
        return PodNet(key=record.container_id, netns=record.netns,
                      ips=tuple(ipaddress.ip_address(ip) for ip in record.ips), config=config,
                      name=record.pod_name, namespace=record.pod_namespace)
