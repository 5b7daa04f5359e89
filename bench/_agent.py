"""A real `meshcni agent` with private paths for benchmarks (cgroup, bpffs dir, sockets, state), and
bare network namespaces to enrol; everything is removed on exit, whatever happened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from meshcni.sys import cgroup as cgroups


class PrivateAgent:
    def __init__(self, netns_count: int = 0, log_level: str = "warning"):
        self.uid = uuid.uuid4().hex[:6]
        self.tmp = Path(tempfile.mkdtemp(prefix="mcni-bench-agent-"))
        self.pin_dir = Path(f"/sys/fs/bpf/mcni-bench-{self.uid}")
        self.cgroup = cgroups.unified_root() / f"mcni-bench-{self.uid}"
        self.socket = self.tmp / "agent.sock"
        self.cni_socket = self.tmp / "cni.sock"
        self.pending = self.tmp / "pending"
        self.netns = [f"mcni-b{self.uid}-{i}" for i in range(netns_count)]
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None

    def netns_path(self, i: int) -> str:
        return f"/var/run/netns/{self.netns[i]}"

    def __enter__(self) -> "PrivateAgent":
        try:
            cgroups.ensure(self.cgroup)
            for name in self.netns:
                subprocess.run(["ip", "netns", "add", name], check=True)
            log = open(self.tmp / "agent.log", "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshcni", "agent", "--bpf-dir", str(self.pin_dir), "--cgroup",
                 str(self.cgroup), "--state-dir", str(self.tmp / "state"), "--socket", str(self.socket),
                 "--cni-socket", str(self.cni_socket), "--pending-dir", str(self.pending),
                 "--metrics-address", "", "--log-level", self.log_level],
                stdout=log, stderr=log, start_new_session=True)
            deadline = time.monotonic() + 120
            while not (self.socket.exists() and self.cni_socket.exists()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"agent did not start: {(self.tmp / 'agent.log').read_text()[-1000:]}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.pin_dir.exists():
            from meshcni.datapath.ebpf import EbpfDatapath

            EbpfDatapath.open(self.pin_dir).unload()
        for name in self.netns:
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        if self.cgroup.exists():
            os.rmdir(self.cgroup)
        shutil.rmtree(self.tmp, ignore_errors=True)
