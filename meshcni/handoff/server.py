"""The per-pod handoff server: gives the pod's held listeners to its proxy, and to no one else.

A unix stream socket at a path the sidecar can see; one thread accepts and answers each connection in turn.
Who may receive is decided by the kernel's SO_PEERCRED of the connecting process, never by what it says:
its uid must be the pod's proxy uid and, when the pod's netns is known, the process must live in that netns
(every pod's proxy runs as 1337, so the uid alone would let one pod's proxy take another pod's sockets if it
could reach the path). Root is refused too: the datapath exempts only the proxy uid from capture, so a
proxy running as root would capture its own upstream connections into a loop — better it fails at startup —
and root needs no handoff anyway (it can take any fd with pidfd_getfd). The socket file is mode 0666 on
purpose: a wrong peer must reach us to be refused *and logged*; file permissions would turn it away silently.

`adopt_from_pid` is the other direction, for proxies that bind their own listeners: duplicate the new proxy's
listener with pidfd_getfd so the agent can point the SOCKMAP at it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

from meshcni.datapath import listeners as dp_listeners
from meshcni.handoff import protocol
from meshcni.handoff.errors import HandoffError
from meshcni.handoff.listeners import PodListeners
from meshcni.sys.errors import SysError

log = logging.getLogger("meshcni.handoff")

EventSink = Callable[[str, dict], None]
PEER_TIMEOUT = 1.0  # one slow or silent client may hold up the next handoff this long, no longer


class HandoffServer:
    """Serve `listeners` on `socket_path` to processes running as `proxy_uid` (in `pod_netns`, if given)."""

    def __init__(self, socket_path: str | os.PathLike, listeners: PodListeners, proxy_uid: int,
                 on_event: EventSink | None = None, pod_netns: str | os.PathLike | None = None):
        self.socket_path = Path(socket_path)
        self.listeners = listeners
        self.proxy_uid = proxy_uid
        self.on_event = on_event
        self.pod_netns_id = _ns_id(pod_netns) if pod_netns is not None else None
        self.handoffs = 0
        self.refused = 0
        self.generation = 0
        self._lock = threading.Lock()
        self._sock = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"handoff-{listeners.pod}", daemon=True)
        self._thread.start()

    # --- public -------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"handoffs": self.handoffs, "refused": self.refused, "generation": self.generation}

    def close(self) -> None:
        """Stop serving and remove the socket file; the listeners themselves stay open (they are not ours)."""
        if self._sock is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._sock.close()
        self._sock = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            if self.socket_path.is_socket():
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "HandoffServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        parent = self.socket_path.parent
        try:
            st = parent.stat()
        except FileNotFoundError:
            raise HandoffError(f"cannot serve handoffs on {self.socket_path}: {parent} does not exist") from None
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            # Anyone who can write the directory could swap our socket for theirs and feed the proxy other fds.
            raise HandoffError(f"cannot serve handoffs in {parent}: it must be owned by uid {os.geteuid()} "
                               f"and writable by no one else")
        if self.socket_path.is_socket():
            self.socket_path.unlink()  # a stale socket of an earlier agent; the listeners it served are gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o666)
            s.listen(16)
        except OSError as exc:
            s.close()
            raise HandoffError(f"cannot serve handoffs on {self.socket_path}: {exc.strerror}") from exc
        return s

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                log.warning("handoff %s: accept failed: %s", self.socket_path, exc)
                continue
            with conn:
                conn.settimeout(PEER_TIMEOUT)
                try:
                    self._answer(conn)
                except (OSError, SysError) as exc:
                    # A peer that hung up or stalled; the next one is served normally.
                    log.warning("handoff %s: exchange failed: %s", self.socket_path, exc)

    def _answer(self, conn: socket.socket) -> None:
        pid, uid, gid = protocol.peer_cred(conn)
        # The request is read even from a peer about to be refused: closing with its bytes unread would
        # reset the connection, and the peer would see "connection reset" instead of the reason.
        request = _read_request(conn)
        reason = self._refusal(pid, uid)
        if reason is None and request != protocol.REQUEST:
            reason = f"unknown request {request[:40]!r}"
        if reason is not None:
            with self._lock:
                self.refused += 1
            info = {"pod": self.listeners.pod, "pid": pid, "uid": uid, "gid": gid, "reason": reason}
            log.warning("handoff refused for pod %s: pid %d uid %d: %s", self.listeners.pod, pid, uid, reason)
            conn.sendall(protocol.encode_refusal(reason))
            self._emit("refused", info)
            return
        fds = self.listeners.fds()
        # Counted before sending: the peer may look at the counters the moment it has the fds.
        with self._lock:
            self.generation += 1
            self.handoffs += 1
            generation = self.generation
        header = protocol.encode_header(list(fds), self.listeners.pod, generation)
        try:
            socket.send_fds(conn, [header], list(fds.values()))
        except OSError:
            with self._lock:
                self.handoffs -= 1
            raise
        log.info("handed %s of pod %s to pid %d (generation %d)", ",".join(fds), self.listeners.pod, pid,
                 generation)
        self._emit("handoff", {"pod": self.listeners.pod, "pid": pid, "uid": uid, "generation": generation,
                               "names": list(fds)})

    def _refusal(self, pid: int, uid: int) -> str | None:
        if uid != self.proxy_uid:
            return f"uid {uid} is not the pod's proxy uid {self.proxy_uid}"
        if self.pod_netns_id is not None:
            try:
                peer_ns = _ns_id(f"/proc/{pid}/ns/net")
            except HandoffError:
                return f"cannot read the network namespace of pid {pid}"
            if peer_ns != self.pod_netns_id:
                return f"pid {pid} is not in the pod's network namespace"
        return None

    def _emit(self, kind: str, info: dict) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, info)
        except Exception:  # noqa: BLE001 - a broken metrics hook must not stop handoffs
            log.exception("handoff event hook failed for %s", kind)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < 64:
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    return data


def _ns_id(path: str | os.PathLike) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HandoffError(f"cannot stat namespace {path}: {exc.strerror}") from exc
    return st.st_dev, st.st_ino


def adopt_from_pid(pid: int, port: int) -> dict[int, int]:
    """Duplicates of the sockets process `pid` itself listens on at `port`, as {address family: fd}.

    Only that process is searched (not every process of its netns), so during an upgrade the *new* proxy's
    listener is taken, not the old one's. The caller owns the fds (the SOCKMAP keeps its own reference, so
    close them after registering). Raises HandoffError when the process holds no such listener.
    """
    try:
        taken = dp_listeners.take_from_pid(pid, dp_listeners.listening_inodes_of(pid, port))
    except (OSError, SysError) as exc:
        raise HandoffError(f"cannot take the listeners of pid {pid} on port {port}: {exc}") from exc
    if not taken:
        raise HandoffError(f"pid {pid} does not listen on port {port}")
    return taken


def adopt_in_netns(netns_path: str, port: int) -> dict[int, int]:
    """Like `adopt_from_pid`, for whichever process of the netns listens on `port` (one proxy per pod)."""
    taken = dp_listeners.take_listeners(netns_path, port)
    if not taken:
        raise HandoffError(f"no process in {netns_path} listens on port {port}")
    return taken
