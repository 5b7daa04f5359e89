"""Proxy upgrade flows: graceful replacement, crash restart, and adoption of a self-bound listener.

All three start the next proxy generation through a `ProxyLauncher` (inside the pod netns and cgroup, as the
proxy uid; through `meshcni proxy-exec` when the agent holds the listeners) and count as done only when it
answers — for HAProxy, when `show info` on its admin socket reports the new pid, i.e. its event loop runs.
- graceful: both generations share the agent's listening sockets; once the new one accepts, the old one is
  told to soft-stop (HAProxy: SIGUSR1 — close its copies of the listeners, finish its connections, exit).
  The sockets never stop listening and whatever waits in their accept queue is taken by the new proxy.
- crash_restart: SIGKILL and start again. The agent's reference keeps each listener open, so connections that
  arrive while no proxy runs complete their handshake and wait in the accept queue (its peak is reported as
  `queued`). Connections the killed proxy had already accepted die with it — no listener can save those —
  so the flow freezes the proxy first and reports how many it held (`in_flight_lost`).
- adopt: for a proxy binding its own listener (HAProxy sets SO_REUSEPORT, so old and new bind side by side),
  take the new listener with pidfd_getfd and hand it to `swap` (the agent: `EbpfDatapath.register_listener`),
  which moves new inbound connections atomically; the old proxy is soft-stopped once its accept queue is empty.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from meshcni.config import PROXY_GID, PROXY_UID
from meshcni.handoff import proxy_exec
from meshcni.handoff.errors import HandoffError, UpgradeError
from meshcni.handoff.listeners import PodListeners, accept_queue
from meshcni.handoff.protocol import close_fds
from meshcni.handoff.server import adopt_from_pid
from meshcni.sys import netns, proc

READY_TIMEOUT = 10.0
DRAIN_TIMEOUT = 30.0
_TCP_LISTEN = "0A"


@dataclass
class ProxyLauncher:
    """How to start one generation of a pod's proxy."""

    argv: Sequence[str]  # the proxy command itself, e.g. haproxy -db -f /etc/haproxy.cfg
    netns: str
    handoff_socket: str | None = None  # set: run through proxy-exec with the agent's listeners
    stats_socket: str | None = None  # HAProxy admin socket: readiness = `show info` answers with the new pid
    uid: int = PROXY_UID
    gid: int = PROXY_GID
    cgroup: str | None = None
    log: str | None = None
    soft_stop_signal: int = signal.SIGUSR1  # HAProxy's "stop listening, drain, exit"

    def command(self) -> list[str]:
        if self.handoff_socket is None:
            return list(self.argv)
        return proxy_exec.launcher_argv(self.handoff_socket, self.argv)

    def start(self) -> subprocess.Popen:
        return proc.spawn(self.command(), netns=self.netns, cgroup=self.cgroup, uid=self.uid, gid=self.gid,
                          stdout=self.log, stderr=self.log, cwd="/")

    def ready(self, pid: int) -> bool:
        """Does generation `pid` serve yet? Subclasses may know better (see meshcni.agent.proxies)."""
        return _answers(self, pid)


@dataclass
class UpgradeResult:
    kind: str  # graceful | crash | adopt
    new: subprocess.Popen
    old_pid: int
    old_exited: bool
    queued: int = 0  # peak of connections seen waiting in the held listeners before the new proxy accepted
    in_flight_lost: int = 0  # crash only: client connections the killed proxy had accepted
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "new_pid": self.new.pid, "old_pid": self.old_pid, "old_exited": self.old_exited,
                "queued": self.queued, "in_flight_lost": self.in_flight_lost, "seconds": round(self.seconds, 4)}


@dataclass
class UpgradeStats:
    """Counters an agent exports (thread-safe): one per flow, plus what crossed a handoff."""

    graceful: int = 0
    crash_restarts: int = 0
    adoptions: int = 0
    failed: int = 0
    queued_connections: int = 0
    in_flight_lost: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, result: UpgradeResult) -> None:
        with self._lock:
            attr = {"graceful": "graceful", "crash": "crash_restarts", "adopt": "adoptions"}[result.kind]
            setattr(self, attr, getattr(self, attr) + 1)
            self.queued_connections += result.queued
            self.in_flight_lost += result.in_flight_lost

    def record_failure(self) -> None:
        with self._lock:
            self.failed += 1

    def to_dict(self) -> dict[str, int]:
        with self._lock:
            return {"graceful": self.graceful, "crash_restarts": self.crash_restarts, "adoptions": self.adoptions,
                    "failed": self.failed, "queued_connections": self.queued_connections,
                    "in_flight_lost": self.in_flight_lost}


# ----------------------------------------------------------------------------------------------- the flows


def graceful(launcher: ProxyLauncher, old: subprocess.Popen | int, *, listeners: PodListeners | None = None,
             stats: UpgradeStats | None = None, ready_timeout: float = READY_TIMEOUT,
             drain_timeout: float = DRAIN_TIMEOUT) -> UpgradeResult:
    """Start the next proxy on the same sockets, then soft-stop the old one once the new one accepts."""
    return _run(stats, lambda: _graceful(launcher, old, listeners, ready_timeout, drain_timeout))


def crash_restart(launcher: ProxyLauncher, old: subprocess.Popen | int, *, listeners: PodListeners | None = None,
                  stats: UpgradeStats | None = None, ready_timeout: float = READY_TIMEOUT) -> UpgradeResult:
    """SIGKILL the proxy and start the next one; the held listeners keep queueing meanwhile."""
    return _run(stats, lambda: _crash(launcher, old, listeners, ready_timeout))


def adopt(launcher: ProxyLauncher, old: subprocess.Popen | int, port: int, swap: Callable[[dict[int, int]], object],
          *, stats: UpgradeStats | None = None, ready_timeout: float = READY_TIMEOUT,
          drain_timeout: float = DRAIN_TIMEOUT) -> UpgradeResult:
    """Start a self-binding proxy, point the SOCKMAP at its listener on `port` via `swap`, retire the old one."""
    return _run(stats, lambda: _adopt(launcher, old, port, swap, ready_timeout, drain_timeout))


def _run(stats: UpgradeStats | None, flow: Callable[[], UpgradeResult]) -> UpgradeResult:
    try:
        result = flow()
    except BaseException:
        if stats is not None:
            stats.record_failure()
        raise
    if stats is not None:
        stats.record(result)
    return result


def _graceful(launcher, old, listeners, ready_timeout, drain_timeout) -> UpgradeResult:
    started = time.monotonic()
    new = launcher.start()
    queued = wait_ready(launcher, new, ready_timeout, listeners)
    old_pid = _pid(old)
    _signal(old_pid, launcher.soft_stop_signal)
    exited = wait_exit(old, drain_timeout)
    return UpgradeResult("graceful", new, old_pid, exited, queued=queued, seconds=time.monotonic() - started)


def _crash(launcher, old, listeners, ready_timeout) -> UpgradeResult:
    started = time.monotonic()
    old_pid = _pid(old)
    # Frozen, the proxy accepts nothing more, so the count of what it holds is exact at the moment of death.
    _signal(old_pid, signal.SIGSTOP)
    lost = accepted_connections(old_pid, launcher.netns)
    _signal(old_pid, signal.SIGKILL)
    if not wait_exit(old, 5.0):
        raise UpgradeError(f"proxy pid {old_pid} survived SIGKILL")
    new = launcher.start()
    queued = wait_ready(launcher, new, ready_timeout, listeners)
    return UpgradeResult("crash", new, old_pid, True, queued=queued, in_flight_lost=lost,
                         seconds=time.monotonic() - started)


def _adopt(launcher, old, port, swap, ready_timeout, drain_timeout) -> UpgradeResult:
    started = time.monotonic()
    old_pid = _pid(old)
    new = launcher.start()
    wait_ready(launcher, new, ready_timeout, None)
    fds = adopt_from_pid(new.pid, port)
    try:
        swap(fds)
    finally:
        close_fds(fds.values())  # the SOCKMAP holds the sockets themselves
    _wait_accept_queue_empty(old_pid, port, drain_timeout)
    _signal(old_pid, launcher.soft_stop_signal)
    exited = wait_exit(old, drain_timeout)
    return UpgradeResult("adopt", new, old_pid, exited, seconds=time.monotonic() - started)


# ------------------------------------------------------------------------------------------------- helpers


def enable_request_migration(netns_path: str) -> None:
    """Set net.ipv4.tcp_migrate_req=1 in the pod's netns (Linux 5.14+; a per-netns sysctl, the host is untouched).

    For adoption: when the old proxy closes its SO_REUSEPORT listener, connections still in its accept queue or
    mid-handshake are moved to another listener of the group (the new proxy's) instead of being reset.
    """
    with netns.in_netns(netns_path):
        try:
            Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1")
        except OSError as exc:
            raise UpgradeError(f"cannot enable tcp_migrate_req in {netns_path}: {exc.strerror}") from exc


def wait_ready(launcher: ProxyLauncher, p: subprocess.Popen, timeout: float,
               listeners: PodListeners | None = None) -> int:
    """Wait until the new proxy answers; returns the peak accept-queue length seen on `listeners` meanwhile."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        if listeners is not None:
            peak = max(peak, sum(listeners.queued().values()))
        if p.poll() is not None:
            raise UpgradeError(f"the new proxy (pid {p.pid}) exited with status {p.returncode}{_tail(launcher.log)}")
        if launcher.ready(p.pid):
            return peak
        if time.monotonic() > deadline:
            raise UpgradeError(f"the new proxy (pid {p.pid}) did not become ready within {timeout:g}s"
                               f"{_tail(launcher.log)}")
        time.sleep(0.005)


def _answers(launcher: ProxyLauncher, pid: int) -> bool:
    if launcher.stats_socket is None:
        # Without an admin socket, "ready" is the weaker "has the listeners open": after the exec for a
        # handoff, or once bound for a self-binding proxy.
        return bool(proc.listening_ports(pid)) and _has_sockets(pid)
    return haproxy_pid(launcher.stats_socket) == pid


def haproxy_pid(stats_socket: str, timeout: float = 1.0) -> int | None:
    """The pid `show info` reports on an HAProxy admin socket, or None while nothing answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(stats_socket)
            s.sendall(b"show info\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("Pid:"):
            return int(line.split(":", 1)[1])
    return None


def _has_sockets(pid: int) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{n}").startswith("socket:") for n in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def wait_exit(p: subprocess.Popen | int, timeout: float) -> bool:
    """True once the process is gone (reaped, if it is our child) within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if isinstance(p, subprocess.Popen):
            if p.poll() is not None:
                return True
        elif proc.state(p) in (None, "Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def accepted_connections(pid: int, netns_path: str) -> int:
    """Connected TCP sockets of `pid` that it accepted (not ones it connected upstream), in any state but LISTEN.

    An accepted socket's local port is a listening port (or, after sk_lookup, the original destination port);
    an upstream one has an ephemeral local port from the netns's ip_local_port_range.
    """
    with netns.in_netns(netns_path):
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    inodes = proc.socket_inodes(pid)
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != _TCP_LISTEN and int(f[9]) in inodes and not low <= int(f[1].rsplit(":", 1)[1], 16) <= high:
                count += 1
    return count


def _wait_accept_queue_empty(pid: int, port: int, timeout: float) -> None:
    """Let the old proxy accept what sk_lookup gave it before the swap; closing a listener resets its queue."""
    try:
        fds = adopt_from_pid(pid, port)
    except HandoffError:
        return  # the old proxy is gone or holds no listener: nothing left to drain
    try:
        deadline = time.monotonic() + timeout
        empty_in_a_row = 0
        # Twice in a row, a few ms apart: a handshake in flight at the swap lands in the old queue a moment later.
        while empty_in_a_row < 2 and time.monotonic() < deadline:
            empty_in_a_row = empty_in_a_row + 1 if all(accept_queue(fd)[0] == 0 for fd in fds.values()) else 0
            time.sleep(0.005)
    finally:
        close_fds(fds.values())


def _pid(p: subprocess.Popen | int) -> int:
    return p.pid if isinstance(p, subprocess.Popen) else int(p)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(log: str | None) -> str:
    if not log:
        return ""
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()[-5:]
    except OSError:
        return ""
    return ": " + " | ".join(lines) if lines else ""
