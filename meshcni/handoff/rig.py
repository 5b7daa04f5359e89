"""A lab pod whose sidecar runs on agent-held listeners, plus a load from its peer: what the hot-upgrade root
tests and bench/hotupgrade.py share, and a worked example of the few lines an agent needs.

`HotUpgradeRig` brings up a two-pod lab without the lab's own capture, replaces pod b's lab HAProxy with one
started through `meshcni proxy-exec` (proxy="handoff"), or one that binds its own listeners ("own"), and
captures pod b with the eBPF datapath (SOCKMAP entry = the held inbound listener) or with iptables. Pod a runs
the connection-per-request load against b's app port, so every request crosses b's proxy. The capture state
is written into the lab state, so `lab down` (always run on exit) releases and unloads it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from meshcni.config import Mode, PROXY_GID, PROXY_UID
from meshcni.handoff.listeners import PodListeners
from meshcni.handoff.server import HandoffServer, adopt_from_pid
from meshcni.handoff.upgrade import ProxyLauncher, UpgradeStats, enable_request_migration, haproxy_pid, wait_ready
from meshcni.lab import haproxy
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabError, LabNames
from meshcni.sys import proc

APP_PORT = 80


class HotUpgradeRig:
    def __init__(self, name: str, proxy: str = "handoff", capture: str = "ebpf", master_worker: bool = False):
        if proxy not in ("handoff", "own") or capture not in ("ebpf", "iptables"):
            raise ValueError(f"unknown rig proxy={proxy!r} capture={capture!r}")
        self.name, self.proxy_mode, self.capture_mode, self.master_worker = name, proxy, capture, master_worker
        self.state = None
        self.listeners: PodListeners | None = None
        self.server: HandoffServer | None = None
        self.dp = None
        self.slot: int | None = None
        self.current: subprocess.Popen | None = None
        self.stats = UpgradeStats()
        self.events: list[tuple[str, dict]] = []

    # --- life cycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> "HotUpgradeRig":
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _up(self) -> None:
        try:
            self.state = lab_core.up(lab_core.LabOptions(name=self.name, pods=2, capture=False))
        except LabError:
            lab_core.down(self.name)
            raise
        a, b = self.state.pods
        self.client_pod, self.pod = a, b
        proc.stop(b.processes["haproxy"])  # the lab's sidecar binds 15001/15006 itself; ours replaces it
        # A threaded process looks gone (main thread a zombie) while its other threads still hold the sockets.
        _wait_ports_free(b.processes["nginx"].pid, {haproxy.OUTBOUND_PORT, haproxy.INBOUND_PORT})
        d = podproc.pod_dir(self.state, b)
        cfg = d / ("haproxy-fd.cfg" if self.proxy_mode == "handoff" else "haproxy.cfg")
        spec = haproxy.ProxySpec(pod=b.name, peer_ip=a.ip, http_ports=tuple(self.state.proxy_http_ports),
                                 socket_path=podproc.proxy_socket(self.state, b),
                                 listen_fds=self.proxy_mode == "handoff")
        cfg.write_text(haproxy.render(spec), encoding="utf-8")
        os.chmod(cfg, 0o644)
        self.podnet = lab_core.pod_net(b)
        handoff_socket = None
        if self.proxy_mode == "handoff":
            # --- the agent's part: hold the listeners, serve them ---
            self.listeners = PodListeners.for_pod(self.podnet)
            handoff_socket = str(d / "handoff.sock")
            self.server = HandoffServer(handoff_socket, self.listeners, PROXY_UID,
                                        on_event=lambda k, i: self.events.append((k, i)), pod_netns=b.netns)
        argv = [haproxy.HAPROXY_BIN, "-W" if self.master_worker else "-db", "-f", str(cfg)]
        if self.master_worker:
            argv.insert(2, "-db")
        self.launcher = ProxyLauncher(argv=argv, netns=b.netns, handoff_socket=handoff_socket,
                                      stats_socket=str(spec.socket_path), uid=PROXY_UID, gid=PROXY_GID,
                                      cgroup=self.state.cgroup, log=str(d / "haproxy-upgrades.log"))
        if self.proxy_mode == "own":
            enable_request_migration(b.netns)  # the agent's part for self-binding proxies (see adopt)
        self.current = self.launcher.start()
        if self.master_worker:
            _wait_answer(self.launcher.stats_socket)  # `show info` reports the worker's pid, not the master's
        else:
            wait_ready(self.launcher, self.current, 15.0)
        self._capture()

    def _capture(self) -> None:
        if self.capture_mode == "iptables":
            from meshcni.datapath.iptables import IptablesInterceptor

            self.podnet = _with_mode(self.podnet, Mode.IPTABLES)
            self.pod.captured = True  # lab down releases captured pods through the eBPF datapath only
            IptablesInterceptor().capture(self.podnet)
            self._iptables = True
            return
        from meshcni.datapath.ebpf import EbpfDatapath

        self.state.bpf_pin_dir = str(LabNames(self.name).bpf_pin_dir)
        self.state.save()
        self.dp = EbpfDatapath.load(pin_dir=self.state.bpf_pin_dir, cgroup=self.state.cgroup)
        self.pod.captured = True
        self.state.save()
        fds = self.listeners.inbound_fds() if self.listeners else None  # the agent's sockets, or the proxy's own
        self.slot = self.dp.capture(self.podnet, listener_fds=fds)

    def swap_listener(self, fds: dict[int, int]) -> None:
        self.dp.register_listener(self.slot, self.podnet, fds)

    def register_own_listener(self, pid: int) -> None:
        fds = adopt_from_pid(pid, self.podnet.config.inbound_port)
        try:
            self.swap_listener(fds)
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        if getattr(self, "_iptables", False):
            from meshcni.datapath.iptables import IptablesInterceptor

            try:
                IptablesInterceptor().release(self.podnet)
            except Exception:  # noqa: BLE001 - the netns goes away with the lab right after
                pass
            self.pod.captured = False
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.state is not None:
            lab_core.down(self.name)  # kills every process in the lab cgroup, releases capture, unloads BPF
            self.state = None
        if self.listeners is not None:
            self.listeners.close()
            self.listeners = None

    # --- load ---------------------------------------------------------------------------------------------

    def start_load(self, concurrency: int = 2) -> "LoadRun":
        p = proc.spawn([sys.executable, "-m", "meshcni.handoff.load", self.pod.ip, str(APP_PORT),
                        "--concurrency", str(concurrency), "--expect-header",
                        f"{haproxy.PROXY_HEADER}={self.pod.name}-inbound"],
                       netns=self.client_pod.netns, cgroup=self.state.cgroup, uid=podproc.APP_UID,
                       gid=podproc.APP_GID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        return LoadRun(p)


class LoadRun:
    """The load process in pod a: wait until it runs, stop it, read its report."""

    def __init__(self, p: subprocess.Popen):
        self.p = p
        first = p.stdout.readline().decode().strip()
        if first != "running":
            self.p.kill()
            raise LabError(f"the load did not start: {first!r} {p.stderr.read().decode()[-500:]}")

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        out, err = self.p.communicate(timeout=60)
        lines = out.decode().strip().splitlines()
        if self.p.returncode != 0 or not lines:
            raise LabError(f"the load failed (exit {self.p.returncode}): {err.decode()[-500:]}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


def _wait_ports_free(pid_in_netns: int, ports: set[int], timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while {p for _, p in proc.listening_ports(pid_in_netns)} & ports:
        if time.monotonic() > deadline:
            raise LabError(f"ports {sorted(ports)} are still in use in the pod after its sidecar stopped")
        time.sleep(0.01)


def _wait_answer(stats_socket: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while haproxy_pid(stats_socket) is None:
        if time.monotonic() > deadline:
            raise LabError(f"HAProxy did not answer on {stats_socket}")
        time.sleep(0.01)


def _with_mode(podnet, mode: Mode):
    from dataclasses import replace

    return replace(podnet, config=podnet.config.with_mode(mode))
