"""`up`, `down` and `status` of a lab: the kubelet+runtime part of a node, played on one machine.

`up` goes step by step — state dir, subnet, cgroup, then per pod: netns, CNI ADD through the conflist, app and
sidecar processes, and finally capture (after every proxy listens, because the datapath registers the proxy's
inbound listener). Each resource is written to the state file before or as it is created, and any failure
(or Ctrl-C) runs the same teardown `down` runs, so a failed `up` leaves nothing behind. `down` works from the
state file alone, tolerates every resource already being gone, and keeps the state file when something could
not be removed so that running it again retries exactly the rest.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from meshcni.config import PodConfig
from meshcni.datapath.interceptor import PodNet
from meshcni.lab import agent as lab_agent
from meshcni.lab import cni, haproxy, host, pod as podproc
from meshcni.lab.state import (
    DEFAULT_STATE_ROOT,
    LAB_NAMESPACE,
    LabError,
    LabNames,
    LabState,
    PodState,
    check_name,
    default_state_dir,
)
from meshcni.sys import cgroup, proc
from meshcni.sys.errors import SysError

SUBNET_BASE = ipaddress.ip_network("10.233.0.0/16")
MAX_PODS = 200


@dataclass
class LabOptions:
    name: str = "lab"
    pods: int = 2
    state_dir: Path | None = None
    capture: bool = True
    agent: bool = True  # capture through the lab's own agent + CNI plugin; False: enrol straight into the datapath
    agent_mode: str = "ebpf"
    hold_listeners: bool = False  # the agent holds the sidecars' listeners (hot upgrades); needs agent
    annotations: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # pod name -> its annotations
    proxy_http_ports: tuple[int, ...] = (80, 8080)
    cni_path: tuple[str, ...] = (cni.REFERENCE_PLUGIN_DIR,)
    chain_plugins: tuple[Mapping[str, Any], ...] = ()  # appended after bridge+loopback (e.g. meshcni)
    ready_timeout: float = 15.0

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir(self.name)


@dataclass
class DownReport:
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"removed": self.removed, "notes": self.notes, "errors": self.errors}


# ------------------------------------------------------------------------------------------------------ up


def up(opts: LabOptions) -> LabState:
    """Create the lab; on any failure tear down what was created and raise LabError."""
    _validate(opts)
    datapath_cls = _datapath_class() if opts.capture else None  # fail before creating anything
    state_dir = opts.resolved_state_dir()
    existing = LabState.load(state_dir)
    if existing is not None:
        raise LabError(
            f"lab {opts.name!r} already exists ({existing.path}, phase {existing.phase}); "
            f"run `meshcni lab down --name {opts.name}` first"
        )
    _check_reachable_by_proxy(state_dir)
    names = LabNames(opts.name)
    state = _allocate(opts, state_dir, names)
    try:
        _build(opts, state, names, datapath_cls)
    except BaseException as exc:
        report = teardown(state)
        detail = f"; rollback also failed: {'; '.join(report.errors)}" if report.errors else "; rolled back"
        if isinstance(exc, (LabError, SysError, OSError)):
            raise LabError(f"lab up failed: {exc}{detail}") from exc
        raise
    return state


def _validate(opts: LabOptions) -> None:
    check_name(opts.name)
    if opts.hold_listeners and not (opts.capture and opts.agent):
        raise LabError("--hold-listeners needs the lab's agent (drop --no-agent / --no-capture)")
    if not 1 <= opts.pods <= MAX_PODS:
        raise LabError(f"--pods must be between 1 and {MAX_PODS}, not {opts.pods}")
    for port in opts.proxy_http_ports:
        if not 1 <= port <= 65535:
            raise LabError(f"proxy HTTP port {port} is outside 1-65535")
    for p in opts.chain_plugins:
        if not isinstance(p, Mapping) or not isinstance(p.get("type"), str) or not p["type"]:
            raise LabError(f"a chained plugin needs a non-empty \"type\": {p!r}")


def _check_reachable_by_proxy(state_dir: Path) -> None:
    # HAProxy runs as uid 1337 and nginx workers as nobody: both must traverse every directory above the
    # state dir to read their config (pytest's /tmp/pytest-of-root is 0700, for instance).
    for parent in state_dir.absolute().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise LabError(f"{parent} is not searchable by other users; pick a --state-dir the proxy uid can reach")


def _allocate(opts: LabOptions, state_dir: Path, names: LabNames) -> LabState:
    """Pick a free 10.233.N.0/24 (and bridge mcnilabN) and write the initial state, under a host-wide lock."""
    DEFAULT_STATE_ROOT.mkdir(parents=True, exist_ok=True)
    DEFAULT_STATE_ROOT.chmod(0o755)
    DEFAULT_STATE_ROOT.parent.chmod(0o755)
    with open(DEFAULT_STATE_ROOT / ".alloc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = _free_subnet_index(opts.name)
        use_agent = opts.capture and opts.agent
        subnet = str(list(SUBNET_BASE.subnets(new_prefix=24))[index])
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o755)
        bridge = names.bridge(index)
        state = LabState(
            name=opts.name,
            state_dir=str(state_dir),
            subnet=subnet,
            subnet_index=index,
            bridge=bridge,
            cgroup=str(cgroup.unified_root() / names.cgroup_dir),
            capture=opts.capture,
            proxy_http_ports=list(opts.proxy_http_ports),
            conflist=cni.build_conflist(
                f"meshcni-lab-{opts.name}", bridge, subnet, state_dir / "ipam",
                extra=tuple(opts.chain_plugins) + ((lab_agent.plugin_conf(state_dir),) if use_agent else ()),
            ),
            cni_path=([str(lab_agent.paths(state_dir)["bin"])] if use_agent else []) + list(opts.cni_path),
            use_agent=use_agent,
            agent_mode=opts.agent_mode,
            hold_listeners=use_agent and opts.hold_listeners,
        )
        state.save()
    return state


def _free_subnet_index(name: str) -> int:
    taken: set[int] = set()
    for bridge in host.lab_bridges():
        suffix = bridge[len(host.LAB_BRIDGE_PREFIX) :]
        if suffix.isdigit():
            taken.add(int(suffix))
    for dst in host.routes_v4():
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue  # "default", "broadcast ..." and friends
        for i, sub in enumerate(SUBNET_BASE.subnets(new_prefix=24)):
            if net.overlaps(sub) and net.prefixlen >= 8:
                taken.add(i)
    for f in DEFAULT_STATE_ROOT.glob("*/state.json"):
        try:
            taken.add(int(json.loads(f.read_text())["subnet_index"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    # Start from a hash of the name so a lab tends to keep its subnet across runs; skip .0 (looks like a typo).
    start = zlib.crc32(name.encode()) % 255 + 1
    for k in range(255):
        i = (start + k - 1) % 255 + 1
        if i not in taken:
            return i
    raise LabError(f"no free /24 left in {SUBNET_BASE} for a lab subnet")


def _build(opts: LabOptions, state: LabState, names: LabNames, datapath_cls) -> None:
    cgroup.ensure(state.cgroup)
    state.host_ip_forward_before = host.read_ip_forward()
    conf_dir = Path(state.state_dir) / "cni"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / f"{state.conflist['name']}.conflist").write_text(json.dumps(state.conflist, indent=2) + "\n")
    state.save()

    if state.use_agent:
        lab_agent.install_plugin(state)
        lab_agent.start(state, names, opts.annotations)
    rt = cni.runtime(state.cni_path, state.state_dir)
    for i in range(opts.pods):
        netns_name = names.netns(i)
        pod = PodState(
            index=i, name=names.pod(i), netns=host.netns_path(netns_name), container_id=names.container_id(i)
        )
        state.pods.append(pod)
        state.save()
        host.netns_add(netns_name)
        pod.cni_added = True
        state.save()
        pod.captured = state.use_agent  # the chain's meshcni plugin enrols it; DEL must release it
        result = cni.add(rt, state.conflist, _attachment(pod, pod.netns))
        pod.ip, pod.mac = cni.pod_address(result, pod.ifname)
        state.save()

    for pod in state.pods:
        peer = state.pods[(pod.index + 1) % len(state.pods)]
        podproc.start(state, pod, peer, opts.ready_timeout)

    if state.use_agent:
        _wait_listeners(state, opts.ready_timeout)
    elif datapath_cls is not None:
        state.bpf_pin_dir = str(names.bpf_pin_dir)
        state.save()
        dp = datapath_cls.load(pin_dir=state.bpf_pin_dir, cgroup=state.cgroup)
        try:
            for pod in state.pods:
                pod.captured = True  # recorded first: a capture that fails half-way still gets released
                state.save()
                dp.capture(pod_net(pod))
        finally:
            dp.close()
    state.phase = "ready"
    state.save()


def _wait_listeners(state: LabState, timeout: float) -> None:
    """The agent adopts each proxy's inbound listener once it listens; the lab is ready when all are in."""
    from meshcni.agent.client import AgentClient

    deadline = time.monotonic() + timeout
    with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
        while True:
            pending = [p["pod_name"] for p in client.list_pods() if p["mode"] == "ebpf" and p["listener"] != "registered"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LabError(f"the agent has not registered the proxy listener of {', '.join(pending)} "
                               f"after {timeout:g}s: {lab_agent.tail(lab_agent.paths(state)['log'])}")
            time.sleep(0.05)


def _attachment(pod: PodState, netns: str):
    return cni.attachment(pod.container_id, netns, pod.ifname, pod.name, LAB_NAMESPACE)


def lab_pod_config() -> PodConfig:
    """Capture everything but the explicit benchmark listeners, which are proxy-to-proxy by design."""
    return PodConfig(
        exclude_inbound_ports=haproxy.EXPLICIT_PORTS,
        exclude_outbound_ports=(haproxy.EXPLICIT_HTTP_OUT, haproxy.EXPLICIT_TCP_OUT),
    )


def pod_net(pod: PodState) -> PodNet:
    ips = (ipaddress.ip_address(pod.ip),) if pod.ip else ()
    return PodNet(
        key=pod.container_id, netns=pod.netns, ips=ips, config=lab_pod_config(), name=pod.name,
        namespace=LAB_NAMESPACE,
    )


def _datapath_class():
    try:
        from meshcni.datapath.ebpf import EbpfDatapath
    except ImportError as exc:
        raise LabError(f"capture needs meshcni.datapath.ebpf, which cannot be imported ({exc}); use --no-capture") from exc
    return EbpfDatapath


# ---------------------------------------------------------------------------------------------------- down


def down(name: str, state_dir: Path | None = None) -> DownReport:
    """Remove everything the lab `name` created; fine to run when it is half-built or already gone."""
    check_name(name)
    sdir = Path(state_dir) if state_dir else default_state_dir(name)
    state = LabState.load(sdir)
    if state is None:
        return _teardown_by_convention(name, sdir)
    report = teardown(state)
    if report.errors:
        raise LabError("lab down left things behind (run it again to retry): " + "; ".join(report.errors))
    return report


def teardown(state: LabState) -> DownReport:
    """Undo `up` in reverse order, continuing past failures; the state file survives only if something failed."""
    r = DownReport()
    if state.agent_process:  # first, so it does not re-enrol what the next step releases
        errs = lab_agent.stop(state)
        r.errors.extend(errs)
        if not errs:
            r.removed.append("lab agent")
    _release_capture(state, r)
    for pod in state.pods:
        errs = podproc.stop(pod)
        r.errors.extend(errs)
        if pod.processes and not errs:
            r.removed.append(f"processes of pod {pod.name}")
    try:
        # Anything that forked away from the recorded processes is still in the lab cgroup.
        proc.kill_cgroup(state.cgroup)
    except proc.ProcessError as exc:
        r.errors.append(str(exc))
    for pod in reversed(state.pods):
        _cni_del(state, pod, r)
        name = Path(pod.netns).name
        _step(r, f"netns {name}", lambda: host.netns_delete(name))
    _step(r, f"bridge {state.bridge}", lambda: host.link_delete(state.bridge))
    if host.restore_ip_forward(state.host_ip_forward_before):
        r.notes.append(f"restored net.ipv4.ip_forward={state.host_ip_forward_before}")
    _step(r, f"cgroup {state.cgroup}", lambda: _remove_cgroup(state.cgroup))
    if r.errors:
        state.phase = "teardown-incomplete"
        state.save()
    else:
        _step(r, f"state dir {state.state_dir}", lambda: _rmtree(state.state_dir))
    return r


def datapath(state: LabState):
    """The lab's loaded datapath, re-opened from its pins (no compiling); the caller closes it."""
    return _datapath_class().open(state.bpf_pin_dir)


def _release_capture(state: LabState, r: DownReport) -> None:
    if not state.bpf_pin_dir:
        return
    try:
        dp_cls = _datapath_class()
        if dp_cls.is_loaded(state.bpf_pin_dir):
            dp = dp_cls.open(state.bpf_pin_dir)
            for pod in state.pods:
                if pod.captured:
                    dp.release(pod_net(pod))
            dp.unload()  # detaches every link and removes every pin
            r.removed.append(f"BPF programs and pins {state.bpf_pin_dir}")
        elif Path(state.bpf_pin_dir).exists():
            # A load that failed before its maps were pinned can still have left program pins behind.
            shutil.rmtree(state.bpf_pin_dir)
            r.removed.append(f"partial BPF pins {state.bpf_pin_dir}")
        for pod in state.pods:
            pod.captured = False
        state.bpf_pin_dir = None
        state.save()
    except Exception as exc:  # noqa: BLE001 - any failure here must not stop the rest of the teardown
        r.errors.append(f"releasing capture ({state.bpf_pin_dir}): {exc}")


def _cni_del(state: LabState, pod: PodState, r: DownReport) -> None:
    if not pod.cni_added:
        return
    # CNI_NETNS may be empty on DEL when the namespace is already gone (SPEC: DEL must still clean up IPAM).
    netns = pod.netns if Path(pod.netns).exists() else ""
    try:
        notes = cni.delete(cni.runtime(state.cni_path, state.state_dir), state.conflist, _attachment(pod, netns))
        r.notes.extend(notes)
        r.removed.append(f"CNI attachment of pod {pod.name}")
        pod.cni_added = False
        state.save()
    except LabError as exc:
        r.errors.append(f"pod {pod.name}: {exc}")


def _step(r: DownReport, what: str, action) -> None:
    try:
        if action() is not False:
            r.removed.append(what)
    except (LabError, OSError, SysError) as exc:
        r.errors.append(f"{what}: {exc}")


def _remove_cgroup(path: str) -> bool:
    if not Path(path).exists():
        return False
    cgroup.remove(path)
    return True


def _rmtree(path: str) -> bool:
    if not Path(path).exists():
        return False
    shutil.rmtree(path)
    return True


def _teardown_by_convention(name: str, sdir: Path) -> DownReport:
    """No state file (never created, or already removed): remove whatever still carries the lab's names."""
    names = LabNames(name)
    r = DownReport()
    cg = cgroup.unified_root() / names.cgroup_dir
    try:
        proc.kill_cgroup(cg)
    except proc.ProcessError as exc:
        r.errors.append(str(exc))
    for ns in host.netns_names():
        if ns.startswith(names.netns_prefix):
            _step(r, f"netns {ns}", lambda ns=ns: host.netns_delete(ns))
    _step(r, f"cgroup {cg}", lambda: _remove_cgroup(str(cg)))
    if names.bpf_pin_dir.exists():
        r.errors.append(f"{names.bpf_pin_dir} exists but the lab state is gone; remove the pins by hand")
    _step(r, f"state dir {sdir}", lambda: _rmtree(str(sdir)))
    if r.errors:
        raise LabError("lab down left things behind: " + "; ".join(r.errors))
    return r


# -------------------------------------------------------------------------------------------------- status


def _capture_problems(state: LabState) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What is wrong with each captured pod's capture (empty lists when all is in place), and each captured
    pod's capture mode. A lab with an agent asks the agent (CheckPod), since a pod may be in iptables mode
    or off; without one, the lab enrolled the pods into the eBPF datapath itself and asks that."""
    captured = [p for p in state.pods if p.captured]
    if not captured:
        return {}, {}
    if state.use_agent:
        return _agent_capture_problems(state, captured)
    if not state.bpf_pin_dir:
        return {}, {}
    try:
        dp = datapath(state)
    except (LabError, SysError) as exc:
        return {p.name: [f"cannot open the datapath: {exc}"] for p in captured}, {}
    try:
        return {p.name: dp.verify(pod_net(p)) for p in captured}, {p.name: "ebpf" for p in captured}
    finally:
        dp.close()


def _agent_capture_problems(state: LabState, captured: list[PodState]) -> tuple[dict[str, list[str]], dict[str, str]]:
    from meshcni.agent.client import AgentCallError, AgentClient, AgentNotRunning

    try:
        with AgentClient(str(lab_agent.paths(state)["socket"]), timeout=10.0) as client:
            modes = {p["container_id"]: p["mode"] for p in client.list_pods()}
            problems = {}
            for pod in captured:
                if pod.container_id not in modes:
                    problems[pod.name] = ["the lab's agent has not enrolled this pod"]
                    continue
                reply = client.check_pod(container_id=pod.container_id, netns=pod.netns, ifname=pod.ifname)
                problems[pod.name] = list(reply.get("problems", []))
    except (AgentNotRunning, AgentCallError) as exc:
        return {p.name: [f"the lab's agent does not answer: {exc}"] for p in captured}, {}
    return problems, {p.name: modes[p.container_id] for p in captured if p.container_id in modes}


def load(name: str, state_dir: Path | None = None) -> LabState:
    check_name(name)
    sdir = Path(state_dir) if state_dir else default_state_dir(name)
    state = LabState.load(sdir)
    if state is None:
        raise LabError(f"no lab {name!r} (no state in {sdir}); create it with `meshcni lab up --name {name}`")
    return state


def status(state: LabState) -> dict:
    problems, modes = _capture_problems(state)
    pods = []
    for pod in state.pods:
        health = podproc.health(pod)
        pods.append(
            {
                "name": pod.name,
                "ip": pod.ip,
                "netns": pod.netns,
                "netns_present": Path(pod.netns).exists(),
                "container_id": pod.container_id,
                "processes": {
                    n: {"pid": ref.pid, "alive": health[n]} for n, ref in sorted(pod.processes.items())
                },
                "healthy": bool(health) and all(health.values()) and not problems.get(pod.name),
                "captured": pod.captured,
                "capture_mode": modes.get(pod.name),
                "capture_problems": problems.get(pod.name, []),
            }
        )
    return {
        "name": state.name,
        "phase": state.phase,
        "state_dir": state.state_dir,
        "subnet": state.subnet,
        "bridge": state.bridge,
        "bridge_present": host.link_exists(state.bridge),
        "cgroup": state.cgroup,
        "capture": state.capture,
        "bpf_pin_dir": state.bpf_pin_dir,
        "agent_socket": str(lab_agent.paths(state)["socket"]) if state.use_agent else None,
        "pods": pods,
        "healthy": state.phase == "ready" and all(p["healthy"] and p["netns_present"] for p in pods),
    }
