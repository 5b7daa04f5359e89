"""A two-pod lab run by its own agent, with a connection-per-request load from pod a through both sidecars to
pod b's app: what the hot-upgrade root tests and bench/hotupgrade.py share.

`HotUpgradeRig` brings the lab up with the agent's capture in `capture` mode (ebpf or iptables) and, with
proxy="handoff", the agent holding every sidecar's listeners (HAProxy runs through `meshcni proxy-exec`);
with proxy="own", HAProxy binds its own and the agent adopts them. Upgrades of pod b's proxy go through the
agent's API — exactly what `meshcni proxy upgrade lab/b` does — so the tests exercise the product, not a
copy of it. The load (meshcni.handoff.load) runs as the app in pod a: app -> a's outbound proxy -> b's
inbound proxy -> b's nginx, and a response must carry b's proxy header to count as served.
`lab down` on exit removes everything, including proxies started by upgrades (they live in the lab cgroup).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from meshcni.agent.client import AgentClient
from meshcni.config import PROXY_GID, PROXY_UID
from meshcni.handoff.upgrade import ProxyLauncher, haproxy_pid, wait_exit, wait_ready
from meshcni.lab import agent as lab_agent
from meshcni.lab import haproxy
from meshcni.lab import lab as lab_core
from meshcni.lab import pod as podproc
from meshcni.lab.state import LAB_NAMESPACE, LabError
from meshcni.sys import proc

APP_PORT = 80


# How long the agent may wait for each next proxy of the rig to serve. The product's default (READY_TIMEOUT,
# 10 s) is for a node; the tests and benches on a shared VM assert counts, never how fast a proxy starts, and
# a hypervisor that steals nearly all of the CPU for a while has kept a new HAProxy from answering for over
# 10 s (the process runnable, not stuck). Such a pause must not decide a test.
RIG_READY_TIMEOUT = 120.0


class HotUpgradeRig:
    def __init__(self, name: str, proxy: str = "handoff", capture: str = "ebpf", master_worker: bool = False,
                 ready_timeout: float = RIG_READY_TIMEOUT):
        if proxy not in ("handoff", "own") or capture not in ("ebpf", "iptables"):
            raise ValueError(f"unknown rig proxy={proxy!r} capture={capture!r}")
        if master_worker and proxy != "own":
            raise ValueError("HAProxy's master-worker reload binds its own listeners: use proxy='own'")
        self.name, self.proxy_mode, self.capture_mode, self.master_worker = name, proxy, capture, master_worker
        self.ready_timeout = ready_timeout
        self.state = None
        self.client: AgentClient | None = None
        self.master: subprocess.Popen | None = None

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
        opts = lab_core.LabOptions(name=self.name, pods=2, agent_mode=self.capture_mode,
                                   hold_listeners=self.proxy_mode == "handoff")
        try:
            self.state = lab_core.up(opts)
        except LabError:
            lab_core.down(self.name)
            raise
        self.client_pod, self.pod = self.state.pods
        self.key = f"{LAB_NAMESPACE}/{self.pod.name}"
        self.stats_socket = str(podproc.proxy_socket(self.state, self.pod))
        self.client = AgentClient(str(lab_agent.paths(self.state)["socket"]))
        if self.master_worker:
            self._start_master_worker()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.state is not None:
            lab_core.down(self.name)  # stops the agent, kills every process in the lab cgroup, unloads BPF
            self.state = None
        if self.master is not None:
            self.master.wait(timeout=10)  # killed with the lab cgroup; reap it
            self.master = None

    # --- what a test or the bench does -------------------------------------------------------------------

    def upgrade(self, kind: str = "graceful") -> dict:
        """`meshcni proxy upgrade lab/b [--kill|--adopt]` through the agent; returns its reply."""
        return self.client.upgrade_proxy(self.key, kind, ready_socket=self.stats_socket, timeout=self.ready_timeout)

    def proxy_status(self) -> dict:
        return self.client.proxy_status(self.key)

    def counters(self) -> dict[str, int]:
        return self.client.counters(self.key)[0]["counters"]

    def current_pid(self) -> int | None:
        return haproxy_pid(self.stats_socket)

    def naive_restart(self) -> dict:
        """Kill the proxy and start it again, nothing held or handed over: the baseline hot upgrades beat."""
        started = time.monotonic()
        pid = self.current_pid()
        if pid is None:
            raise LabError(f"no HAProxy answers on {self.stats_socket}")
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 5.0)
        launcher = self._launcher([haproxy.HAPROXY_BIN, "-db", "-f", str(self._config())])
        wait_ready(launcher, launcher.start(), 15.0)
        return {"seconds": time.monotonic() - started}

    def master_worker_reload(self) -> dict:
        """HAProxy's own reload: SIGUSR2 to the master, which starts new workers binding new sockets."""
        started = time.monotonic()
        old_worker = self.current_pid()
        os.kill(self.master.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 15
        while (worker := self.current_pid()) in (None, old_worker):
            if time.monotonic() > deadline:
                raise LabError("HAProxy's new worker did not answer after a reload")
            time.sleep(0.005)
        if old_worker is not None:
            wait_exit(old_worker, 30.0)  # the master refuses a reload while the former worker still runs
        return {"seconds": time.monotonic() - started, "worker": worker}

    def start_load(self, concurrency: int = 2) -> "LoadRun":
        p = proc.spawn([sys.executable, "-m", "meshcni.handoff.load", self.pod.ip, str(APP_PORT),
                        "--concurrency", str(concurrency), "--expect-header",
                        f"{haproxy.PROXY_HEADER}={self.pod.name}-inbound"],
                       netns=self.client_pod.netns, cgroup=self.state.cgroup, uid=podproc.APP_UID,
                       gid=podproc.APP_GID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        return LoadRun(p)

    def client_retries(self) -> int:
        """Requests pod a's outbound proxy sent again after its upstream failed (HAProxy `wretr`)."""
        return haproxy.retries(podproc.proxy_socket(self.state, self.client_pod))

    # --- internals ----------------------------------------------------------------------------------------

    def _config(self):
        return podproc.pod_dir(self.state, self.pod) / "haproxy.cfg"

    def _launcher(self, argv: list[str]) -> ProxyLauncher:
        return ProxyLauncher(argv=argv, netns=self.pod.netns, stats_socket=self.stats_socket, uid=PROXY_UID,
                             gid=PROXY_GID, cgroup=self.state.cgroup,
                             log=str(podproc.pod_dir(self.state, self.pod) / "haproxy-rig.log"))

    def _start_master_worker(self) -> None:
        old = self.current_pid()
        proc.stop(self.pod.processes["haproxy"])
        if old is not None:
            wait_exit(old, 10.0)
        launcher = self._launcher([haproxy.HAPROXY_BIN, "-W", "-db", "-f", str(self._config())])
        self.master = launcher.start()
        deadline = time.monotonic() + 15
        while self.current_pid() is None:  # `show info` reports the worker's pid, not the master's
            if self.master.poll() is not None or time.monotonic() > deadline:
                raise LabError("HAProxy in master-worker mode did not start")
            time.sleep(0.01)
        self.wait_listener_registered()

    def wait_listener_registered(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.client.get_pod(self.key)["listener"] != "registered":
            if time.monotonic() > deadline:
                raise LabError(f"the agent did not register pod {self.pod.name}'s proxy listener")
            time.sleep(0.02)


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
