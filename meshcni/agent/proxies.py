"""The agent's side of proxy hot upgrades: per pod, hold the proxy's listeners, serve them, replace the proxy.

For a pod whose config says `hold_listeners` (annotation `meshcni.io/listeners: agent`, or the node default
`--hold-listeners`), the agent creates the proxy's listening sockets inside the pod netns when it enrols the
pod, registers the inbound ones in the SOCKMAP (eBPF mode) and serves all of them on a per-pod handoff socket
(`<handoff dir>/<namespace>_<name>.sock`) that `meshcni proxy-exec` in the sidecar fetches them from. The
sockets stay open in the agent for the pod's lifetime, so a replaced or crashed proxy never closes them.

An agent that restarts (even after `kill -9`) re-acquires the sockets from the running proxy with
pidfd_getfd instead of creating new ones — they are the very sockets the SOCKMAP and the proxy use — and
serves them again on the same path.

`upgrade` drives the three flows of `meshcni.handoff.upgrade` for `meshcni proxy upgrade`. The next proxy is
started *like the current one*: same command line (unless a new one is given), environment, working
directory, uid/gid, cgroup and netns, all read from /proc, so the agent needs no knowledge of how a pod's
sidecar was launched. Spawning goes through `sh` + `nsenter` rather than a fork hook, because the agent has
many threads and a fork hook in a threaded process can deadlock.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from meshcni.config import PodConfig
from meshcni.datapath import listeners as dp_listeners
from meshcni.datapath.interceptor import PodNet
from meshcni.handoff import upgrade as flows
from meshcni.handoff.errors import HandoffError, UpgradeError
from meshcni.handoff.listeners import INBOUND, INBOUND6, OUTBOUND, PodListeners, specs_for
from meshcni.handoff.server import HandoffServer
from meshcni.sys import cgroup as cgroup_sys
from meshcni.sys import netns as netns_sys
from meshcni.sys import proc
from meshcni.sys.errors import SysError

log = logging.getLogger("meshcni.agent")

DEFAULT_HANDOFF_DIR = "/var/run/meshcni/proxy"
KINDS = ("graceful", "crash", "adopt")
# Variables proxy-exec sets for one generation; the next generation gets fresh ones.
_HANDOFF_ENV = re.compile(r"^(LISTEN_FDS|LISTEN_FDNAMES|LISTEN_PID|MESHCNI_FD_.*)$")
_EVENT_LOOP_WAITS = ("epoll", "ep_poll", "do_sys_poll", "do_select", "core_sys_select")


@dataclass
class PodProxy:
    """What the agent holds for one pod: its listeners, their handoff server and the pod's upgrade counters."""

    container_id: str
    display: str
    netns: str
    config: PodConfig
    listeners: PodListeners
    server: HandoffServer
    reacquired: bool  # True: taken back from a running proxy after an agent restart
    stats: flows.UpgradeStats = field(default_factory=flows.UpgradeStats)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one upgrade at a time per pod

    def inode_set(self) -> set[int]:
        return {os.fstat(fd).st_ino for fd in self.listeners.fds().values()}


def handoff_socket_name(namespace: str, name: str, container_id: str) -> str:
    """`<namespace>_<name>.sock`: what a sidecar knows about itself (downward API); the container id otherwise."""
    if name:
        return f"{namespace or 'default'}_{name}.sock"
    return f"{container_id[:24]}.sock"


class ProxyManager:
    """Held listeners and handoff servers of every pod that asked for them, and the upgrade flows."""

    def __init__(self, handoff_dir: str | os.PathLike = DEFAULT_HANDOFF_DIR, log_dir: str | os.PathLike | None = None,
                 attach_cgroup: str | os.PathLike | None = None):
        self.dir = Path(handoff_dir)
        self.attach_cgroup = attach_cgroup  # where the datapath's cgroup hooks attach (None: the root)
        self.log_dir = Path(log_dir) if log_dir else None
        self._pods: dict[str, PodProxy] = {}
        self._children: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self.handoff_events = {"handoff": 0, "refused": 0}
        self.adopt_stats: dict[str, flows.UpgradeStats] = {}  # per pod whose proxy binds its own listeners

    # --- holding ------------------------------------------------------------------------------------------

    def hold(self, container_id: str, display: str, pod: PodNet) -> PodProxy:
        """The pod's held listeners, created (or re-acquired from its running proxy) on first call."""
        with self._lock:
            current = self._pods.get(container_id)
            if current is not None and current.config.outbound_port == pod.config.outbound_port \
                    and current.config.inbound_port == pod.config.inbound_port:
                current.config = pod.config
                return current
        if current is not None:
            self.drop(container_id)  # the ports changed: the old sockets listen on the wrong ones
        self._check_cgroup()
        self._ensure_dir()
        ipv6 = any(ip.version == 6 for ip in pod.ips)
        held, reacquired = _reacquire(pod, ipv6), True
        if held is None:
            held, reacquired = PodListeners.create(pod.netns, pod.config, pod=display, ipv6=ipv6), False
        path = self.dir / handoff_socket_name(pod.namespace, pod.name, container_id)
        try:
            server = HandoffServer(path, held, pod.config.proxy_uid, on_event=self._count_event,
                                   pod_netns=pod.netns)
        except BaseException:
            held.close()
            raise
        entry = PodProxy(container_id, display, pod.netns, pod.config, held, server, reacquired)
        with self._lock:
            self._pods[container_id] = entry
        log.info("pod %s: %s listeners %s, served on %s", display, "re-acquired" if reacquired else "holding",
                 ",".join(held.names), path)
        return entry

    def adopt_stats_for(self, container_id: str) -> flows.UpgradeStats:
        with self._lock:
            return self.adopt_stats.setdefault(container_id, flows.UpgradeStats())

    def get(self, container_id: str) -> PodProxy | None:
        with self._lock:
            return self._pods.get(container_id)

    def all(self) -> list[PodProxy]:
        with self._lock:
            return list(self._pods.values())

    def drop(self, container_id: str) -> None:
        """Stop serving and close our references (a running proxy keeps its own until it exits)."""
        with self._lock:
            entry = self._pods.pop(container_id, None)
            self.adopt_stats.pop(container_id, None)
        if entry is not None:
            entry.server.close()
            entry.listeners.close()

    def close(self) -> None:
        """Agent shutdown: the proxies keep their sockets; the next agent re-acquires them."""
        for cid in [p.container_id for p in self.all()]:
            self.drop(cid)
        self.reap()

    def reap(self) -> None:
        """Collect proxies we started that have exited (they are our children until they die)."""
        with self._lock:
            self._children = [c for c in self._children if c.poll() is None]

    # --- who is the proxy ---------------------------------------------------------------------------------

    def proxy_pids(self, entry: PodProxy) -> list[int]:
        """Processes other than the agent that hold the pod's listeners, oldest first."""
        return _holders(entry.netns, entry.inode_set())

    def status(self, entry: PodProxy) -> dict:
        counters = entry.server.counters()
        return {
            "socket": str(entry.server.socket_path),
            "listeners": {name: {"address": _fmt(addr), "queued": entry.listeners.queued()[name]}
                          for name, addr in entry.listeners.addresses().items()},
            "proxy_pids": self.proxy_pids(entry),
            "handoffs": counters["handoffs"], "refused": counters["refused"],
            "generation": counters["generation"], "reacquired": entry.reacquired,
            "upgrades": entry.stats.to_dict(),
        }

    # --- upgrades -----------------------------------------------------------------------------------------

    def upgrade(self, entry: PodProxy | None, pod: PodNet, kind: str, *, argv: list[str] | None = None,
                stop_signal: int = signal.SIGUSR1, ready_socket: str | None = None, timeout: float = 10.0,
                swap=None, stats: flows.UpgradeStats | None = None) -> flows.UpgradeResult:
        """Replace the pod's proxy by flow `kind`; `entry` is None for a pod whose proxy binds its own
        listeners (only "adopt" applies, and `swap` points the SOCKMAP at the new listener)."""
        if kind not in KINDS:
            raise UpgradeError(f"unknown upgrade kind {kind!r}: one of {', '.join(KINDS)}")
        if entry is None and kind != "adopt":
            raise UpgradeError(f"pod {pod.name or pod.key} does not have agent-held listeners "
                               f"(annotation meshcni.io/listeners: agent); only --adopt can replace its proxy")
        if entry is not None and kind == "adopt":
            raise UpgradeError("the agent already holds this pod's listeners: use a graceful upgrade or --kill")
        lock = entry.lock if entry is not None else threading.Lock()
        if not lock.acquire(timeout=0.1):
            raise UpgradeError(f"an upgrade of pod {pod.name or pod.key} is already running")
        try:
            if entry is not None:
                pids = self.proxy_pids(entry)
            else:
                pids = _holders(pod.netns, set(dp_listeners.listening_inodes(pod.netns, pod.config.inbound_port)))
            if not pids:
                raise UpgradeError(f"no proxy process holds the listeners of pod {pod.name or pod.key}")
            current = pids[-1]  # the newest generation is the one to copy and to replace
            launcher = self._launcher_like(current, pod, entry, argv, stop_signal, ready_socket)
            if kind == "graceful":
                result = flows.graceful(launcher, current, listeners=entry.listeners, stats=stats or entry.stats,
                                        ready_timeout=timeout)
                for older in pids[:-1]:  # generations still draining from earlier upgrades
                    _signal(older, stop_signal)
            elif kind == "crash":
                result = flows.crash_restart(launcher, current, listeners=entry.listeners,
                                             stats=stats or entry.stats, ready_timeout=timeout)
            else:
                flows.enable_request_migration(pod.netns)
                result = flows.adopt(launcher, current, pod.config.inbound_port, swap, stats=stats,
                                     ready_timeout=timeout)
        finally:
            lock.release()
        with self._lock:
            self._children.append(result.new)
        log.info("pod %s: proxy %s upgrade: pid %d -> %d (%.3fs, %d queued meanwhile)", pod.name or pod.key, kind,
                 result.old_pid, result.new.pid, result.seconds, result.queued)
        return result

    def _launcher_like(self, pid: int, pod: PodNet, entry: PodProxy | None, argv: list[str] | None,
                       stop_signal: int, ready_socket: str | None) -> "AgentLauncher":
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            uid, gid = _ids(pid)
            cgroup_path = _cgroup_of(pid)
        except OSError as exc:
            raise UpgradeError(f"cannot read how proxy pid {pid} was started: {exc.strerror}") from exc
        env = {}
        for item in environ:
            key, sep, value = item.decode(errors="surrogateescape").partition("=")
            if sep and not _HANDOFF_ENV.match(key):
                env[key] = value
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = str(self.log_dir / f"proxy-{(pod.name or pod.key)[:40]}.log")
        return AgentLauncher(
            argv=list(argv) if argv else [a.decode(errors="surrogateescape") for a in cmdline],
            netns=pod.netns, handoff_socket=str(entry.server.socket_path) if entry else None,
            stats_socket=ready_socket, uid=uid, gid=gid, cgroup=cgroup_path, log=log_path,
            soft_stop_signal=stop_signal, env=env, cwd=cwd,
        )

    # --- internals ----------------------------------------------------------------------------------------

    def _check_cgroup(self) -> None:
        """A socket belongs to the cgroup of the task that created it, and so do the connections it accepts;
        the getsockopt (SO_ORIGINAL_DST) and sockops hooks only see sockets of the attach cgroup's subtree.
        Listeners created from outside it would hand the proxy connections it cannot find the original
        destination of, so refuse rather than loop."""
        if self.attach_cgroup is None:
            return
        mine = _cgroup_of(os.getpid())
        root = os.path.realpath(self.attach_cgroup)
        if mine is None or not (os.path.realpath(mine) + "/").startswith(root.rstrip("/") + "/"):
            raise HandoffError(f"the agent runs in cgroup {mine}, outside the attach cgroup {root}: the proxy "
                               f"listeners it created would be invisible to the cgroup hooks; run the agent "
                               f"inside {root}")

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # The proxy (uid 1337) must reach its socket; only root may create entries (HandoffServer checks).
        os.chmod(self.dir, 0o755)

    def _count_event(self, kind: str, info: dict) -> None:
        with self._lock:
            self.handoff_events[kind] = self.handoff_events.get(kind, 0) + 1


@dataclass
class AgentLauncher(flows.ProxyLauncher):
    """A `ProxyLauncher` safe to use from the threaded agent, carrying the environment and cwd it copies.

    `sh` writes its own pid into the cgroup, then execs `nsenter` (netns, then gid and uid), which execs
    proxy-exec (when the agent holds the listeners) and finally the proxy: one pid all along, no fork hook.
    Readiness without an admin socket is "its event loop runs": a thread of the new process sleeps in
    epoll/poll/select while holding the listeners.
    """

    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"

    def start(self) -> subprocess.Popen:
        netns_sys.check_netns(self.netns)
        inner = netns_sys.nsenter_argv(self.netns, self.command(), uid=self.uid, gid=self.gid)
        if self.cgroup:
            argv = ["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", self.cgroup, *inner]
        else:
            argv = inner
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                                    cwd=self.cwd if os.path.isdir(self.cwd) else "/", start_new_session=True,
                                    close_fds=True)
        except OSError as exc:
            raise UpgradeError(f"cannot start the next proxy: {exc.strerror}") from exc
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def ready(self, pid: int) -> bool:
        if self.stats_socket is not None:
            return flows.haproxy_pid(self.stats_socket) == pid
        return _in_event_loop(pid) and _holds_a_listener(pid)


# ----------------------------------------------------------------------------------------------- helpers


def _reacquire(pod: PodNet, ipv6: bool) -> PodListeners | None:
    """The listeners a running proxy holds on the pod's ports (after an agent restart), or None."""
    index = dp_listeners.ProcessIndex()
    taken: dict[str, socket.socket] = {}
    try:
        for spec in specs_for(pod.config, ipv6):
            fds = dp_listeners.take_listeners(pod.netns, spec.port, index)
            fd = fds.pop(spec.family, None)
            for other in fds.values():
                os.close(other)
            if fd is None:
                break
            taken[spec.name] = socket.socket(fileno=fd)
    except (OSError, HandoffError, SysError) as exc:  # SysError: the netns went away meanwhile
        log.warning("pod %s: cannot re-acquire its listeners: %s", pod.name or pod.key, exc)
    if set(taken) != {s.name for s in specs_for(pod.config, ipv6)}:
        for s in taken.values():
            s.close()
        return None
    return PodListeners(pod.name or pod.key, pod.netns, {n: taken[n] for n in (OUTBOUND, INBOUND, INBOUND6) if n in taken})


def _holders(netns_path: str, inodes: set[int]) -> list[int]:
    """Pids of the netns (not us) with an fd on one of `inodes`, oldest first by start time."""
    me = os.getpid()
    found = []
    if not inodes:
        return []
    for pid in dp_listeners.ProcessIndex().pids_in(netns_path):
        # a stopped (T) proxy is one a crash flow is killing right now
        if pid != me and proc.socket_inodes(pid) & inodes and proc.state(pid) not in (None, "Z", "X", "T"):
            found.append(pid)
    return sorted(found, key=lambda p: (proc.start_time(p) or 0, p))


def _holds_a_listener(pid: int) -> bool:
    """Has `pid` itself (not just its netns) a listening TCP socket among its fds?"""
    try:
        listening = dp_listeners.listening_inodes_of(pid)
    except SysError:  # the process is gone
        return False
    return bool(listening.keys() & proc.socket_inodes(pid))


def _in_event_loop(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        if any(w in wchan for w in _EVENT_LOOP_WAITS):
            return True
    return False


def _ids(pid: int) -> tuple[int, int]:
    uid = gid = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    if uid is None or gid is None:
        raise OSError(0, f"no Uid/Gid in /proc/{pid}/status")
    return uid, gid


def _cgroup_of(pid: int) -> str | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return str(cgroup_sys.unified_root() / line[3:].lstrip("/"))
    return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fmt(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"
