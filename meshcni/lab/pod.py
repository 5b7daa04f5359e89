"""Start and check the processes of one lab pod: nginx and the echo server (the app) and HAProxy (the sidecar).

Every process is started by `meshcni.sys.proc.spawn` inside the pod's netns and the lab's cgroup, so it exists
in the cgroup before it opens a single socket. The app runs as root (nginx master, to bind port 80; its
workers drop to nobody) or nobody (echo); the sidecar runs as uid/gid 1337, which is what the datapath uses to
tell the proxy's own connections from the app's. A process counts as started only when its ports are
listening; if it exits first, the error carries the tail of its log.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from meshcni.config import PROXY_GID, PROXY_UID
from meshcni.handoff.proxy_exec import launcher_argv
from meshcni.lab import haproxy, nginx
from meshcni.lab.state import LabError, LabState, PodState
from meshcni.sys import proc

APP_UID = 65534  # nobody: any uid but the proxy's, so app traffic is what capture must catch
APP_GID = 65534
ECHO_PORT = haproxy.ECHO_PORT


def pod_dir(state: LabState, pod: PodState) -> Path:
    return Path(state.state_dir) / "pods" / pod.name


def proxy_socket(state: LabState, pod: PodState) -> Path:
    return pod_dir(state, pod) / "proxy" / "haproxy.sock"


def prepare(state: LabState, pod: PodState, peer: PodState) -> dict[str, Path]:
    """Write the pod's configuration files; returns the config paths."""
    d = pod_dir(state, pod)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    proxy_dir = d / "proxy"
    proxy_dir.mkdir(exist_ok=True)
    # HAProxy (uid 1337) creates its stats socket by bind + rename, so it needs to write this directory.
    os.chown(proxy_dir, PROXY_UID, PROXY_GID)
    os.chmod(proxy_dir, 0o755)
    ngx = nginx.write(pod.name, pod.ip or "", d)
    spec = haproxy.ProxySpec(
        pod=pod.name,
        peer_ip=peer.ip or "",
        http_ports=tuple(state.proxy_http_ports),
        socket_path=proxy_socket(state, pod),
        listen_fds=state.hold_listeners,
    )
    hap = d / "haproxy.cfg"
    hap.write_text(haproxy.render(spec), encoding="utf-8")
    os.chmod(hap, 0o644)
    confs = {"nginx": ngx, "haproxy": hap, "haproxy_check": hap}
    if spec.listen_fds:
        # `haproxy -c` cannot check `bind fd@N` without the sockets; the same config with plain binds can be.
        check = d / "haproxy-check.cfg"
        check.write_text(haproxy.render(replace(spec, listen_fds=False)), encoding="utf-8")
        confs["haproxy_check"] = check
    return confs


def start(state: LabState, pod: PodState, peer: PodState, timeout: float) -> None:
    """Start app and sidecar, recording each process in the state the moment it exists."""
    confs = prepare(state, pod, peer)
    d = pod_dir(state, pod)
    check = proc.run(haproxy.check_argv(confs["haproxy_check"]), uid=PROXY_UID, gid=PROXY_GID, timeout=30)
    if check.returncode != 0:
        raise LabError(f"HAProxy rejects the config for pod {pod.name}: {check.stderr.decode().strip()}")
    plan = [
        ("nginx", nginx.argv(confs["nginx"], d), None, None, set(nginx.APP_PORTS)),
        ("echo", [sys.executable, "-m", "meshcni.lab.echo", "--port", str(ECHO_PORT)], APP_UID, APP_GID, {ECHO_PORT}),
        ("haproxy", _sidecar_argv(state, pod, confs["haproxy"]), PROXY_UID, PROXY_GID, set(haproxy.LISTEN_PORTS)),
    ]
    for name, argv, uid, gid, ports in plan:
        log = d / f"{name}.log"
        p = proc.spawn(
            argv, netns=pod.netns, cgroup=state.cgroup, uid=uid, gid=gid, stdout=log, stderr=log, cwd="/"
        )
        pod.processes[name] = proc.ref(p.pid)
        state.save()
        _wait_listening(pod, name, p, ports, log, timeout)
    _wait_socket(pod, proxy_socket(state, pod), timeout)


def _sidecar_argv(state: LabState, pod: PodState, conf: Path) -> list[str]:
    """HAProxy, started through `meshcni proxy-exec` when the agent holds the pod's listeners."""
    if not state.hold_listeners:
        return haproxy.argv(conf)
    from meshcni.lab import agent as lab_agent

    return launcher_argv(str(lab_agent.handoff_socket(state, pod)), haproxy.argv(conf))


def _wait_listening(pod: PodState, name: str, p, ports: set[int], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listening = proc.listening_ports(p.pid)
        if ports <= listening:
            return
        if p.poll() is not None:
            raise LabError(f"{name} in pod {pod.name} exited with status {p.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            missing = ", ".join(str(x) for x in sorted(ports - listening))
            raise LabError(f"{name} in pod {pod.name} is not listening on {missing} after {timeout:g}s: {_tail(log)}")
        time.sleep(0.02)


def _wait_socket(pod: PodState, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise LabError(f"HAProxy in pod {pod.name} did not create its stats socket {path}")
        time.sleep(0.02)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def health(pod: PodState) -> dict[str, bool]:
    """Which of the pod's recorded processes still run."""
    return {name: proc.is_alive(ref) for name, ref in sorted(pod.processes.items())}


def stop(pod: PodState) -> list[str]:
    """Stop the pod's processes (sidecar first, so it never forwards to a dead app); returns errors."""
    errors = []
    for name in sorted(pod.processes, key=lambda n: n != "haproxy"):
        try:
            proc.stop(pod.processes[name])
        except proc.ProcessError as exc:
            errors.append(f"pod {pod.name}: {exc}")
    return errors
