"""The lab's own node agent and the meshcni CNI plugin it serves, the way a DaemonSet would run them.

Everything lives under the lab's state dir: the agent's registry, its gRPC and CNI sockets, the policy
file that stands in for pod annotations (the lab's explicit benchmark ports are excluded from capture
there, as an operator would annotate them), and a CNI bin dir holding a `meshcni` entry that runs the
plugin from this checkout. The agent runs in the host netns and inside the lab's cgroup (the attach
point of its programs), like a host-network DaemonSet pod below the root cgroup, with its own bpffs
directory; it enrols only the lab's namespaces, so it can never see the host's traffic.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from meshcni.agent.policy import write_policy
from meshcni.agent.proxies import handoff_socket_name
from meshcni.config import ANN_EXCLUDE_INBOUND_PORTS, ANN_EXCLUDE_OUTBOUND_PORTS
from meshcni.lab import haproxy
from meshcni.lab.state import LAB_NAMESPACE, LabError, LabNames, LabState
from meshcni.sys import proc

START_TIMEOUT = 90.0  # the first start compiles the BPF programs with clang (several seconds on 2 cores)


def paths(state: LabState | str | Path) -> dict[str, Path]:
    d = Path(state.state_dir if isinstance(state, LabState) else state)
    return {"dir": d / "agent", "socket": d / "agent.sock", "cni_socket": d / "cni.sock",
            "pending": d / "pending", "policy": d / "policy.json", "log": d / "agent.log", "bin": d / "cni-bin",
            "plugin_log": d / "meshcni-cni.log", "handoff": d / "handoff"}


def handoff_socket(state: LabState, pod) -> Path:
    """Where the lab agent serves `pod`'s held listeners (meshcni.agent.proxies names it)."""
    return paths(state)["handoff"] / handoff_socket_name(LAB_NAMESPACE, pod.name, pod.container_id)


def lab_policy(annotations: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Every lab pod's annotations: the explicit proxy-to-proxy listeners are never captured; plus per pod ones."""
    inbound = ",".join(str(p) for p in haproxy.EXPLICIT_PORTS)
    outbound = f"{haproxy.EXPLICIT_HTTP_OUT},{haproxy.EXPLICIT_TCP_OUT}"
    pods = {f"{LAB_NAMESPACE}/{name}": dict(ann) for name, ann in (annotations or {}).items()}
    return {"defaults": {ANN_EXCLUDE_INBOUND_PORTS: inbound, ANN_EXCLUDE_OUTBOUND_PORTS: outbound},
            "namespaces": {}, "pods": pods}


def set_pod_annotations(state: LabState, pod: str, annotations: Mapping[str, str]) -> None:
    """Edit a pod's annotations live, as `kubectl annotate` would; the agent follows within its tick."""
    path = paths(state)["policy"]
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["pods"][f"{LAB_NAMESPACE}/{pod}"] = dict(annotations)
    write_policy(path, doc)


def plugin_conf(state: LabState | str | Path) -> dict[str, Any]:
    p = paths(state)
    return {"type": "meshcni", "agentSocket": str(p["cni_socket"]), "pendingDir": str(p["pending"]),
            "failurePolicy": "closed", "logFile": str(p["plugin_log"])}


def install_plugin(state: LabState) -> Path:
    """A CNI bin dir with `meshcni` running the plugin from this interpreter; returns the dir."""
    bindir = paths(state)["bin"]
    bindir.mkdir(exist_ok=True)
    entry = bindir / "meshcni"
    entry.write_text(f"#!/bin/sh\nexec {sys.executable} -m meshcni.cni \"$@\"\n", encoding="utf-8")
    entry.chmod(0o755)
    return bindir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(state: LabState, names: LabNames, annotations: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Start the agent (recorded in the state the moment it exists) and wait until it serves the CNI socket."""
    p = paths(state)
    p["dir"].mkdir(exist_ok=True, mode=0o700)
    if not p["policy"].exists():
        write_policy(p["policy"], lab_policy(annotations))
    state.bpf_pin_dir = str(names.bpf_pin_dir)
    state.agent_metrics = f"127.0.0.1:{free_port()}"
    state.save()
    argv = [sys.executable, "-m", "meshcni", "agent", "--bpf-dir", state.bpf_pin_dir, "--cgroup", state.cgroup,
            "--state-dir", str(p["dir"]), "--socket", str(p["socket"]), "--cni-socket", str(p["cni_socket"]),
            "--pending-dir", str(p["pending"]), "--metrics-address", state.agent_metrics,
            "--policy-file", str(p["policy"]), "--mode", state.agent_mode, "--handoff-dir", str(p["handoff"])]
    if state.hold_listeners:
        argv.append("--hold-listeners")
    # Inside the lab cgroup, as a DaemonSet agent sits below the root its programs attach to: listeners it
    # creates for the sidecars must belong to the cgroup the hooks see (its own traffic is in the host
    # netns, which is never enrolled, so the hooks leave it alone).
    child = proc.spawn(argv, stdout=p["log"], stderr=p["log"], cwd="/", cgroup=state.cgroup)
    state.agent_process = proc.ref(child.pid).to_dict()
    state.save()
    wait_ready(state, child)


def wait_ready(state: LabState, child=None, timeout: float = START_TIMEOUT) -> None:
    p = paths(state)
    deadline = time.monotonic() + timeout
    while not (p["cni_socket"].exists() and p["socket"].exists()):
        if child is not None and child.poll() is not None:
            raise LabError(f"the lab agent exited with status {child.returncode}: {tail(p['log'])}")
        if time.monotonic() > deadline:
            raise LabError(f"the lab agent did not open its sockets within {timeout:g}s: {tail(p['log'])}")
        time.sleep(0.05)


def restart(state: LabState, *, kill: bool = True) -> None:
    """Kill (-9, or TERM when kill=False) and start the agent again: what a DaemonSet rollout or a crash does."""
    ref = process(state)
    if ref is not None:
        if kill:
            try:
                os.kill(ref.pid, 9)
            except ProcessLookupError:
                pass
            _reap(ref.pid)
        else:
            proc.stop(ref)
    for key in ("socket", "cni_socket"):
        paths(state)[key].unlink(missing_ok=True)  # a killed agent leaves its sockets; "ready" means new ones
    start(state, LabNames(state.name))


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.02)


def process(state: LabState) -> proc.ProcessRef | None:
    return proc.ProcessRef.from_dict(state.agent_process) if state.agent_process else None


def stop(state: LabState) -> list[str]:
    ref = process(state)
    if ref is None:
        return []
    try:
        proc.stop(ref)
    except proc.ProcessError as exc:
        return [f"lab agent: {exc}"]
    state.agent_process = None
    state.save()
    return []


def tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
