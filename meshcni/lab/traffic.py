"""Traffic from inside a lab pod, and the evidence the lab can read back (proxy stats, capture counters).

`request`/`echo` start `meshcni.lab.client` in the source pod's netns and the lab cgroup as the app uid (not
1337), so each connection is one the capture datapath is meant to intercept, and return the client's JSON
report. `proxy_stats` reads each sidecar's `show stat`; `capture_counters` reads the per-pod capture
counters when the lab captures (from its agent, if it has one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from meshcni.lab import haproxy
from meshcni.lab import pod as podproc
from meshcni.lab.state import LabError, LabState, PodState
from meshcni.sys import proc

CLIENT_TIMEOUT = 60.0


def run_client(state: LabState, src: PodState, args: list[str], uid: int = podproc.APP_UID) -> dict:
    """Run the lab client in `src` with `args`; returns its JSON report (which may carry an "error")."""
    cp = proc.run(
        [sys.executable, "-m", "meshcni.lab.client", *args],
        netns=src.netns,
        cgroup=state.cgroup,
        uid=uid,
        gid=uid,
        cwd="/",
        timeout=CLIENT_TIMEOUT,
    )
    out = cp.stdout.decode(errors="replace").strip()
    try:
        report = json.loads(out.splitlines()[-1]) if out else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        err = cp.stderr.decode(errors="replace").strip()
        raise LabError(f"the lab client in pod {src.name} failed (exit {cp.returncode}): {err[-500:] or out[-500:]}")
    report["from"] = src.name
    return report


def request(
    state: LabState, src: PodState, host: str, port: int, path: str = "/", *, method: str = "GET", body_bytes: int = 0
) -> dict:
    args = ["http", host, str(port), path, "--method", method]
    if body_bytes:
        args += ["--body-bytes", str(body_bytes)]
    return run_client(state, src, args)


def echo(state: LabState, src: PodState, host: str, port: int, nbytes: int) -> dict:
    return run_client(state, src, ["tcp", host, str(port), "--bytes", str(nbytes)])


class BackgroundLoad:
    """Connection-per-request load from one pod to another, running until `stop()`; see client.load."""

    def __init__(self, state: LabState, src: PodState, host: str, port: int = 80):
        fd, self._stop_file = tempfile.mkstemp(prefix="mcni-load-", dir=state.state_dir)
        os.close(fd)
        os.unlink(self._stop_file)  # its appearance is the stop signal
        self.src = src
        self._proc = proc.spawn(
            [sys.executable, "-m", "meshcni.lab.client", "load", host, str(port), "--stop-file", self._stop_file],
            netns=src.netns, cgroup=state.cgroup, uid=podproc.APP_UID, gid=podproc.APP_GID, cwd="/",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def stop(self, timeout: float = CLIENT_TIMEOUT) -> dict:
        """Stop the load and return its report: ok, failed, errors by reason, and which proxies served."""
        open(self._stop_file, "w").close()
        try:
            out, err = self._proc.communicate(timeout=timeout)
        finally:
            os.unlink(self._stop_file)
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise LabError(f"the load client in pod {self.src.name} failed: {err.decode()[-500:]}") from None

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if os.path.exists(self._stop_file):
            os.unlink(self._stop_file)


def proxy_headers(report: dict) -> list[str]:
    """The x-meshcni-proxy values of a response, in the order they arrived (innermost proxy first)."""
    return [v for k, v in report.get("headers", []) if k == haproxy.PROXY_HEADER]


def proxy_stats(state: LabState) -> dict[str, dict]:
    out = {}
    for pod in state.pods:
        try:
            out[pod.name] = haproxy.stats(podproc.proxy_socket(state, pod))
        except LabError as exc:
            out[pod.name] = {"error": str(exc)}
    return out


def capture_counters(state: LabState) -> dict[str, dict[str, int]] | None:
    """Each captured pod's capture counters: from the lab's agent when it has one (so a pod in iptables
    mode shows its rules' counts, see AgentCore.counters), else from the datapath the lab enrolled into."""
    if state.use_agent and state.capture:
        from meshcni.agent.client import AgentClient
        from meshcni.lab import agent as lab_agent

        with AgentClient(str(lab_agent.paths(state)["socket"])) as client:
            by_name = {p["pod_name"]: p["counters"] for p in client.counters()}
        return {pod.name: by_name.get(pod.name, {}) for pod in state.pods if pod.captured}
    if not state.bpf_pin_dir:
        return None
    from meshcni.lab.lab import datapath, pod_net  # the datapath is optional; import it only when captured

    dp = datapath(state)
    try:
        return {pod.name: dp.counters(pod_net(pod)) for pod in state.pods if pod.captured}
    finally:
        dp.close()
