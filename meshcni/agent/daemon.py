"""The agent process: start-up order, the background loop, and shutdown.

Start-up is ordered so traffic never notices an agent restart: (1) take the state dir's lock so two agents
never share a node; (2) load the datapath — on a node where it is already pinned this replaces programs in
place through their bpf_links (BPF_LINK_UPDATE), so there is no detach/attach window; (3) re-adopt the
registry's pods (idempotent re-capture; pods whose netns is gone are released); (4) open the CNI and gRPC
sockets and the metrics port; (5) replay the ADDs the plugin recorded while the agent was away
(failurePolicy "open"). Stopping (SIGTERM) closes the sockets and leaves every capture in place: the
datapath lives in the kernel and pinned objects, not in this process. Removing it is an explicit act
(`lab down`, uninstall).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshcni.agent.cni_http import CniHttpServer
from meshcni.agent.core import AgentCore, AgentError, PodSpec
from meshcni.agent.events import EventHub
from meshcni.agent.grpc_api import AgentService, serve
from meshcni.agent.metrics import AgentCollector, MetricsServer
from meshcni.agent.policy import LocalPolicyFile, NoPolicy, PolicyError
from meshcni.agent.proxies import DEFAULT_HANDOFF_DIR, ProxyManager
from meshcni.agent.registry import Registry
from meshcni.cni import protocol
from meshcni.config import Mode

log = logging.getLogger("meshcni.agent")

DEFAULT_STATE_DIR = "/var/lib/meshcni"
DEFAULT_SOCKET = "/var/run/meshcni/agent.sock"
DEFAULT_METRICS = "127.0.0.1:9464"


class AgentStartError(RuntimeError):
    """The agent cannot start; the message says why and what to do."""


@dataclass
class AgentOptions:
    pin_dir: str = "/sys/fs/bpf/meshcni"
    cgroup: str | None = None  # None: the cgroup v2 root
    state_dir: str = DEFAULT_STATE_DIR
    socket: str = DEFAULT_SOCKET
    cni_socket: str = protocol.DEFAULT_SOCKET
    pending_dir: str = protocol.DEFAULT_PENDING_DIR
    metrics_address: str = DEFAULT_METRICS  # "" disables
    node_mode: str = Mode.EBPF.value
    policy_file: str | None = None
    node_name: str | None = None  # with kube=True: watch this node's pods on the API server
    kube: bool = False
    kubeconfig: str | None = None
    reconcile_interval: float = 0.5
    masked_features: tuple[str, ...] = field(default_factory=tuple)
    handoff_dir: str = DEFAULT_HANDOFF_DIR  # per-pod handoff sockets of agent-held listeners
    hold_listeners: bool = False  # node default of meshcni.io/listeners: agent


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.started_at = time.time()
        self.stop_event = threading.Event()
        self.datapath = None
        self.events = None
        self.degraded: list[str] = []
        self.features: dict[str, bool] = {}
        self.pending_replayed = 0
        self._lock_fd: int | None = None
        self._grpc = None
        self._cni: CniHttpServer | None = None
        self._metrics: MetricsServer | None = None
        self.core: AgentCore | None = None
        self.policy = None

    # --- start / stop -------------------------------------------------------------------------------------

    def start(self) -> None:
        opts = self.opts
        try:
            node_mode = Mode(opts.node_mode)
        except ValueError:
            raise AgentStartError(f"--mode {opts.node_mode!r} is not one of ebpf, iptables, off") from None
        state = Path(opts.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock(state / "agent.lock")
        interceptors = self._load_interceptors()
        if node_mode is not Mode.OFF and node_mode not in interceptors:
            fallback = Mode.IPTABLES if Mode.IPTABLES in interceptors else Mode.OFF
            log.warning("node mode %s is unavailable; falling back to %s", node_mode.value, fallback.value)
            self.degraded.append(f"node mode {node_mode.value} unavailable: using {fallback.value}")
            node_mode = fallback
        proxies = ProxyManager(opts.handoff_dir, log_dir=state / "proxy-logs", attach_cgroup=opts.cgroup)
        self.core = AgentCore(Registry(state), interceptors, ebpf=self.datapath, node_mode=node_mode,
                              proxies=proxies, hold_listeners=opts.hold_listeners)
        try:
            self.policy = self._policy_source()
            self.core.policy = self.policy
            self.policy.start()
        except (PolicyError, RuntimeError) as exc:  # KubeSourceError is a RuntimeError: bad kubeconfig, no API
            raise AgentStartError(f"cannot read pod annotations: {exc}") from exc
        report = self.core.recover()
        log.info("re-adopted %d pod(s), released %d whose netns is gone, %d failed", report["readopted"],
                 report["removed"], report["failed"])
        self._serve()
        self.replay_pending()
        log.info("agent ready: mode %s, datapath %s, cni %s, api %s", node_mode.value,
                 "loaded" if self.datapath else "not loaded", opts.cni_socket, opts.socket)

    def run(self) -> None:
        """The background loop until SIGTERM/SIGINT: adopt proxy listeners, follow the policy file."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        # This loop walks every pod each tick; with CPython's default 5 ms GIL switch interval an API call
        # arriving meanwhile would wait for it. A 0.5 ms interval bounds that wait for CNI ADDs.
        sys.setswitchinterval(0.0005)
        while not self.stop_event.wait(self.opts.reconcile_interval):
            self.tick()
        self.stop()

    def tick(self) -> None:
        try:
            if isinstance(self.policy, LocalPolicyFile):
                self.policy.refresh()
        except PolicyError as exc:
            log.error("%s (keeping the last good policy)", exc)
        try:
            self.core.adopt_listeners()
        except Exception:  # noqa: BLE001 - the loop must survive anything one pod throws
            log.exception("listener adoption failed")
        try:
            self.core.drop_conntrack_holds()
        except Exception:  # noqa: BLE001
            log.exception("dropping conntrack holds failed")
        self.core.proxies.reap()

    def stop(self) -> None:
        for server in (self._cni, self._metrics):
            if server:
                server.stop()
        if self.events is not None:
            self.events.close()  # ends the watchers' streams' source and turns events off in the kernel
        if self._grpc:
            self._grpc.stop(grace=1.0).wait()
            Path(self.opts.socket).unlink(missing_ok=True)
        if self.policy:
            self.policy.close()
        if self.core is not None and self.core.proxies is not None:
            self.core.proxies.close()  # our copies only: the proxies keep serving, the next agent re-acquires
        if self.core is not None:
            self.core.registry.close()
        if self.datapath:
            self.datapath.close()  # closes our fds only; programs, links and maps stay pinned
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("agent stopped; captures stay in place")

    # --- pieces ---------------------------------------------------------------------------------------------

    def _take_lock(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AgentStartError(f"another meshcni agent is running with state dir {path.parent}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _load_interceptors(self) -> dict:
        """Probe the kernel, plan each direction, and build the interceptors the plan allows.

        Probing and compiling run in a child process (datapath/load_child.py) so this long-lived process
        never maps LLVM. Full eBPF gives the datapath itself as the eBPF interceptor; a plan that gives
        one direction to iptables (a missing or masked kernel feature) gives a HybridInterceptor, and the
        degraded features are reported in `status` and the metrics.
        """
        from meshcni.datapath.hybrid import HybridInterceptor
        from meshcni.datapath.iptables import IptablesInterceptor
        from meshcni.datapath.load_child import load_error, probe_and_load
        from meshcni.preflight.plan import CapturePlan

        reply = probe_and_load(self.opts.pin_dir, self.opts.cgroup, self.opts.masked_features)
        if reply.get("kind") == "PreflightError":
            raise AgentStartError(reply["error"])
        self.features = dict(reply.get("features", {}))
        p = reply["plan"]
        plan = CapturePlan(outbound=Mode(p["outbound"]), inbound=Mode(p["inbound"]), splice=p["splice"],
                           degraded=list(p["degraded"]))
        self.degraded.extend(plan.degraded)
        interceptors: dict = {}
        iptables = IptablesInterceptor() if self.features.get("iptables") else None
        if iptables is not None:
            interceptors[Mode.IPTABLES] = iptables
        if not reply.get("loaded"):
            if Mode.EBPF in (plan.outbound, plan.inbound):
                exc = load_error(reply)
                log.error("eBPF datapath unavailable: %s", exc)
                self.degraded.append(f"ebpf: {exc}")
            return interceptors
        from meshcni.datapath.ebpf import EbpfDatapath

        self.datapath = EbpfDatapath.open(self.opts.pin_dir)
        self.datapath.splice = plan.splice
        self._warn_of_programs_ahead()
        if plan.outbound is Mode.EBPF and plan.inbound is Mode.EBPF:
            interceptors[Mode.EBPF] = self.datapath
        else:
            interceptors[Mode.EBPF] = HybridInterceptor(self.datapath, iptables, plan)
            log.warning("degraded capture: outbound by %s, inbound by %s", plan.outbound.value, plan.inbound.value)
        return interceptors

    def _warn_of_programs_ahead(self) -> None:
        """Another BPF user's connect program that runs before ours decides what the pods' proxies are told as
        the original destination (a socket load balancer's backend instead of the service): say so at start."""
        from meshcni.datapath import hooks
        from meshcni.sys import cgroup as cgroups
        from meshcni.sys.errors import SysError

        cgroup = self.opts.cgroup or str(cgroups.unified_root())
        try:
            ahead = hooks.ahead_of_meshcni(hooks.on_cgroup(cgroup, self.opts.pin_dir))
        except SysError as exc:
            log.warning("cannot list the programs on meshcni's hooks of %s: %s", cgroup, exc)
            return
        for hook, programs in ahead.items():
            log.warning("%s: %s run(s) before meshcni's program for sockets of %s; a destination rewritten there "
                        "is what meshcni captures (`meshcni doctor --cgroup` lists the order)", hook,
                        ", ".join(f"{p.name} (id {p.prog_id})" for p in programs), cgroup)

    def _policy_source(self):
        opts = self.opts
        if opts.kube:
            from meshcni.agent.kube import KubePolicySource

            if not opts.node_name:
                raise AgentStartError("--kube needs --node-name (the DaemonSet passes spec.nodeName)")
            return KubePolicySource(opts.node_name, kubeconfig=opts.kubeconfig,
                                    on_change=lambda ns, name, ann: self.core.on_policy_change(ns, name, ann))
        if opts.policy_file:
            source = LocalPolicyFile(opts.policy_file, on_change=self.core.on_policy_change)
            return source
        return NoPolicy()

    def _serve(self) -> None:
        opts = self.opts
        self._cni = CniHttpServer(self.core, opts.cni_socket, ready=lambda: self.datapath is not None
                                  or self.core.node_mode is not Mode.EBPF)
        self._cni.start()
        self.events = EventHub(opts.pin_dir if self.datapath is not None else None)
        self._grpc = serve(AgentService(self.core, self.status, self.events), opts.socket)
        if opts.metrics_address:
            collector = AgentCollector(self.core, self.status)
            self._metrics = MetricsServer(collector, opts.metrics_address,
                                          healthy=lambda: self.core is not None)
            self._metrics.start()

    def replay_pending(self) -> int:
        """Enrol the pods the plugin let through while we were away (failurePolicy open), and adopt those it
        captured with its own iptables rules (failurePolicy iptables: `"fallback": "iptables"`)."""
        pending = Path(self.opts.pending_dir)
        if not pending.is_dir():
            return 0
        done = 0
        for path in sorted(pending.glob("*.json")):
            try:
                body = json.loads(path.read_text(encoding="utf-8"))
                adopt = Mode.IPTABLES if body.get("fallback") == "iptables" else None
                record = self.core.add_pod(PodSpec.parse(body), adopt_from=adopt)
                log.info("pending pod %s enrolled (mode %s)", record.display_name, record.mode)
                done += 1
            except AgentError as exc:
                if exc.kind != "not_found":  # a vanished netns just means the pod is gone
                    log.error("pending enrolment %s failed: %s; kept as %s.failed", path.name, exc.msg, path.name)
                    path.rename(path.with_suffix(".failed"))
                    continue
            except (OSError, ValueError) as exc:
                log.error("pending enrolment %s is unreadable: %s", path.name, exc)
                path.rename(path.with_suffix(".failed"))
                continue
            path.unlink(missing_ok=True)
        self.pending_replayed += done
        return done

    def status(self) -> dict:
        by_mode: dict[str, int] = {}
        records = self.core.registry.all()
        for r in records:
            by_mode[r.mode] = by_mode.get(r.mode, 0) + 1
        links = 0
        if self.datapath is not None and self.datapath.pins.links.exists():
            links = sum(1 for _ in self.datapath.pins.links.iterdir())
        return {
            "datapath_loaded": self.datapath is not None,
            "pin_dir": self.opts.pin_dir,
            "cgroup": self.opts.cgroup or "/",
            "node_mode": self.core.node_mode.value,
            "enrolled": len(records),
            "pods_by_mode": by_mode,
            "features": dict(self.features),
            "degraded": list(self.degraded),
            "started_at": self.started_at,
            "attached_programs": links,
            "pending_replayed": self.pending_replayed,
        }
