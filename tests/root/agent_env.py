"""A real `meshcni agent` process for root tests, with every path private to the test.

The agent attaches to its own cgroup under the cgroup v2 root (no process lives there, so nothing is ever
captured), pins under its own bpffs directory, and serves sockets in a temporary directory. Pods are bare
network namespaces: the agent only needs a netns path and IPs to enrol a pod. `close()` stops the agent,
unloads the datapath, and deletes the namespaces and the cgroup, whatever state the test left them in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshcni.agent.client import AgentClient
from meshcni.sys import cgroup as cgroups

START_TIMEOUT = 120.0


class AgentEnv:
    def __init__(self, tmp: Path, uid: str):
        self.tmp = tmp
        self.uid = uid
        self.pin_dir = Path(f"/sys/fs/bpf/mcni-test-{uid}")
        self.cgroup = cgroups.unified_root() / f"mcni-test-{uid}"
        self.state_dir = tmp / "state"
        self.socket = tmp / "agent.sock"
        self.cni_socket = tmp / "cni.sock"
        self.pending = tmp / "pending"
        self.policy = tmp / "policy.json"
        self.log = tmp / "agent.log"
        self.metrics_port = _free_port()
        self.netns: list[str] = []
        self.proc: subprocess.Popen | None = None
        cgroups.ensure(self.cgroup)

    # --- the agent process ------------------------------------------------------------------------------

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "meshcni", "agent", "--bpf-dir", str(self.pin_dir), "--cgroup",
                str(self.cgroup), "--state-dir", str(self.state_dir), "--socket", str(self.socket),
                "--cni-socket", str(self.cni_socket), "--pending-dir", str(self.pending),
                "--metrics-address", f"127.0.0.1:{self.metrics_port}", "--policy-file", str(self.policy), *extra]

    def start(self, *extra: str) -> None:
        for sock in (self.socket, self.cni_socket):
            sock.unlink(missing_ok=True)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(*extra), stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.socket.exists() and self.cni_socket.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code

    def client(self) -> AgentClient:
        return AgentClient(str(self.socket))

    # --- pods -----------------------------------------------------------------------------------------------

    def make_netns(self, index: int) -> str:
        name = f"mcni-t{self.uid}-{index}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return f"/var/run/netns/{name}"

    def delete_netns(self, path: str) -> None:
        name = Path(path).name
        subprocess.run(["ip", "netns", "del", name], check=False)
        if name in self.netns:
            self.netns.remove(name)

    # --- cleanup --------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        try:
            if self.pin_dir.exists():
                from meshcni.datapath.ebpf import EbpfDatapath

                EbpfDatapath.open(self.pin_dir).unload()
        finally:
            for name in list(self.netns):
                subprocess.run(["ip", "netns", "del", name], check=False)
            if self.cgroup.exists():
                os.rmdir(self.cgroup)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
