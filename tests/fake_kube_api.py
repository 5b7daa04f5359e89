"""A stand-in for the Kubernetes API server's Pod endpoints, for testing the agent's KubePolicySource.

THIS IS NOT AN API SERVER. No real API server (kube-apiserver + etcd, kind, k3s) can run on this machine, so
this threaded HTTP/1.1 server on 127.0.0.1 (random port) speaks the part of the Pod API the agent uses, with
real-shaped objects (apiVersion v1, kind Pod, metadata name/namespace/uid/resourceVersion/annotations,
spec.nodeName, status.podIP/podIPs) and the real wire behaviour of:

  * GET /api/v1/pods?fieldSelector=spec.nodeName%3D<node>[&limit=N&continue=T]: a PodList with
    metadata.resourceVersion, paginated from a snapshot like the real server; an unknown continue → 410;
  * GET /api/v1/namespaces/{ns}/pods/{name}: the Pod, or a 404 Status;
  * GET /api/v1/pods?watch=true&resourceVersion=N[&fieldSelector=...][&allowWatchBookmarks=true]
    [&timeoutSeconds=S]: a chunked stream of JSON lines `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR",
    "object": ...}` replaying every change after N; a resourceVersion older than the last `compact()` gets
    one `ERROR` event with a 410 Expired Status, as etcd compaction does. A pod entering or leaving the field
    selector is sent as ADDED / DELETED, as the real watch cache does;
  * a Bearer token check (401 Status otherwise), so a test proves the kubeconfig's credentials are used.

Tests drive it with add_pod / set_annotations / bind / delete_pod / compact / expire_watches / drop_watches /
refuse_watches / send_bookmark, and read `requests` and `wait_for_watchers()` to see what the client did.
`write_kubeconfig(path)` writes a kubeconfig pointing at it.
"""

from __future__ import annotations

import copy
import json
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "fake-kube-api-token"
_DROP = object()  # queue sentinel: abort the connection without ending the chunked stream


@dataclass
class _Watcher:
    selector: str | None
    bookmarks: bool
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)


class FakeKubeApi:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._rv = 100
        self._pods: dict[tuple[str, str], dict] = {}
        # (resourceVersion, type, object before, object after) for every change, for watch replay.
        self._log: list[tuple[int, str, dict | None, dict | None]] = []
        self._compacted = 0
        self._watchers: list[_Watcher] = []
        self._snapshots: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.watch_requests = 0  # watches opened, including those answered with 410
        self.refusing_watches = False  # answer new watches 503, as an overloaded server would
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> "FakeKubeApi":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.api = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "FakeKubeApi":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def write_kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        # JSON is YAML: the client's kubeconfig loader reads it as is.
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }))
        return path

    # -- state changes (each is one resourceVersion, like one etcd write)

    def add_pod(self, namespace: str, name: str, node: str | None, annotations: dict[str, str] | None = None,
                ip: str | None = None) -> dict:
        with self._lock:
            if (namespace, name) in self._pods:
                raise ValueError(f"pod {namespace}/{name} exists")
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                             "resourceVersion": "", "creationTimestamp": "2024-01-01T00:00:00Z",
                             "labels": {"app": name}, "annotations": dict(annotations or {})},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx"}]},
                "status": {"phase": "Running" if ip else "Pending", "podIP": ip,
                           "podIPs": [{"ip": ip}] if ip else []},
            }
            if node is None:
                del pod["spec"]["nodeName"]
            self._commit("ADDED", None, pod)
            return copy.deepcopy(pod)

    def set_annotations(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self._update(namespace, name, lambda pod: pod["metadata"].__setitem__("annotations", dict(annotations)))

    def bind(self, namespace: str, name: str, node: str) -> None:
        """Schedule a pending pod onto a node (the scheduler's binding)."""
        self._update(namespace, name, lambda pod: pod["spec"].__setitem__("nodeName", node))

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            old = self._pods[(namespace, name)]
            self._commit("DELETED", old, copy.deepcopy(old))

    def compact(self) -> None:
        """Forget history up to now: watches from an older resourceVersion get 410 Gone."""
        with self._lock:
            self._compacted = self._rv
            self._log.clear()
            self._snapshots.clear()

    def expire_watches(self) -> None:
        """Compact and tell every open watch 410 Gone (what a watcher that fell too far behind receives)."""
        with self._lock:
            self.compact()
            for w in self._watchers:
                w.events.put(_status(410, "Expired", f"too old resource version: {self._compacted}"))

    def drop_watches(self) -> None:
        """Abort every open watch connection mid-stream (no terminating chunk), like a dying server."""
        with self._lock:
            for w in self._watchers:
                w.events.put(_DROP)

    def refuse_watches(self, refuse: bool = True) -> None:
        """While set, new watch requests get a 503 Status; the client backs off and retries."""
        with self._lock:
            self.refusing_watches = refuse

    def send_bookmark(self) -> None:
        with self._lock:
            for w in self._watchers:
                if w.bookmarks:
                    w.events.put({"type": "BOOKMARK", "object": {
                        "apiVersion": "v1", "kind": "Pod", "metadata": {"resourceVersion": str(self._rv)}}})

    # -- observation

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def watchers(self) -> int:
        with self._lock:
            return len(self._watchers)

    def wait_for_watchers(self, count: int, *, opened_at_least: int = 0, timeout: float = 10.0) -> bool:
        """Wait until `count` watches are open and at least `opened_at_least` were ever requested."""
        with self._lock:
            return self._lock.wait_for(
                lambda: len(self._watchers) == count and self.watch_requests >= opened_at_least, timeout)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and p == path)

    # -- internals

    def _update(self, namespace: str, name: str, change) -> None:
        with self._lock:
            old = self._pods[(namespace, name)]
            new = copy.deepcopy(old)
            change(new)
            self._commit("MODIFIED", old, new)

    def _commit(self, kind: str, old: dict | None, new: dict) -> None:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = (new["metadata"]["namespace"], new["metadata"]["name"])
        if kind == "DELETED":
            self._pods.pop(key)
        else:
            self._pods[key] = new
        self._log.append((self._rv, kind, old, new))
        for w in self._watchers:
            event = _filtered(kind, old, new, w.selector)
            if event is not None:
                w.events.put(event)
        self._lock.notify_all()

    def _list(self, selector: str | None, limit: int | None, token: str | None) -> tuple[int, Any]:
        with self._lock:
            if token:
                items = self._snapshots.pop(token, None)
                if items is None:
                    return 410, _status(410, "Expired", "The provided continue parameter is too old")["object"]
                rv = int(token.split(":")[0])
            else:
                rv = self._rv
                items = [copy.deepcopy(p) for k, p in sorted(self._pods.items()) if _matches(p, selector)]
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if rest:
                next_token = f"{rv}:{uuid.uuid4().hex}"
                self._snapshots[next_token] = rest
                meta["continue"] = next_token
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": meta, "items": page}

    def _open_watch(self, selector: str | None, rv: str | None, bookmarks: bool) -> tuple[_Watcher, list]:
        with self._lock:
            self.watch_requests += 1
            watcher = _Watcher(selector, bookmarks)
            backlog: list = []
            if rv in (None, "", "0"):
                # "Any" resourceVersion: synthetic ADDED for the current state, as the real server does.
                backlog = [{"type": "ADDED", "object": copy.deepcopy(p)}
                           for p in self._pods.values() if _matches(p, selector)]
            elif int(rv) < self._compacted:
                backlog = [_status(410, "Expired", f"too old resource version: {rv} ({self._compacted})"),
                           None]
            else:
                for event_rv, kind, old, new in self._log:
                    if event_rv > int(rv):
                        event = _filtered(kind, old, new, selector)
                        if event is not None:
                            backlog.append(event)
            if not backlog or backlog[-1] is not None:
                self._watchers.append(watcher)
            self._lock.notify_all()
            return watcher, backlog

    def _close_watch(self, watcher: _Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            self._lock.notify_all()


def _matches(pod: dict, selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        field_name, _, value = term.replace("==", "=").partition("=")
        if field_name == "spec.nodeName":
            if pod["spec"].get("nodeName") != value:
                return False
        elif field_name == "metadata.namespace":
            if pod["metadata"]["namespace"] != value:
                return False
        else:
            raise ValueError(f"field selector {field_name!r} not supported by the fake")
    return True


def _filtered(kind: str, old: dict | None, new: dict, selector: str | None) -> dict | None:
    """What a watcher with `selector` sees of one change (entering the selection is ADDED, leaving DELETED)."""
    was = old is not None and _matches(old, selector)
    now = kind != "DELETED" and _matches(new, selector)
    if kind == "DELETED":
        return {"type": "DELETED", "object": copy.deepcopy(new)} if was else None
    if was and now:
        return {"type": "MODIFIED", "object": copy.deepcopy(new)}
    if now:
        return {"type": "ADDED", "object": copy.deepcopy(new)}
    if was:
        return {"type": "DELETED", "object": copy.deepcopy(new)}
    return None


def _status(code: int, reason: str, message: str) -> dict:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                        "status": "Failure", "message": message, "reason": reason, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the real server speaks

    def log_message(self, *args: object) -> None:
        pass

    @property
    def api(self) -> FakeKubeApi:
        return self.server.api  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.api._lock:
            self.api.requests.append(("GET", url.path, query))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._json(401, _status(401, "Unauthorized", "Unauthorized")["object"])
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["api", "v1", "pods"]:
            selector = query.get("fieldSelector")
            if query.get("watch") in ("true", "1"):
                with self.api._lock:
                    refusing = self.api.refusing_watches
                if refusing:
                    self._json(503, _status(503, "ServiceUnavailable", "watch refused by the test")["object"])
                    return
                self._watch(selector, query.get("resourceVersion"), query.get("allowWatchBookmarks") == "true",
                            float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None)
                return
            limit = int(query["limit"]) if "limit" in query else None
            self._json(*self.api._list(selector, limit, query.get("continue")))
            return
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            with self.api._lock:
                pod = self.api._pods.get((parts[3], parts[5]))
                pod = copy.deepcopy(pod) if pod else None
            if pod is None:
                body = _status(404, "NotFound", f'pods "{parts[5]}" not found')["object"]
                body["details"] = {"name": parts[5], "kind": "pods"}
                self._json(404, body)
            else:
                self._json(200, pod)
            return
        self._json(404, _status(404, "NotFound", "the server could not find the requested resource")["object"])

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, selector: str | None, rv: str | None, bookmarks: bool, timeout: float | None) -> None:
        watcher, backlog = self.api._open_watch(selector, rv, bookmarks)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for event in backlog:
                if event is None:  # the 410 answer ends the stream
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self._chunk(event)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    event = watcher.events.get(timeout=0.05)
                except queue.Empty:
                    if self._client_gone():
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        self.wfile.write(b"0\r\n\r\n")  # timeoutSeconds reached: a clean end of the stream
                        return
                    continue
                if event is _DROP:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._chunk(event)
                if event["type"] == "ERROR":
                    self.wfile.write(b"0\r\n\r\n")
                    return
        except OSError:
            return  # the client went away
        finally:
            self.api._close_watch(watcher)

    def _client_gone(self) -> bool:
        """A watch client sends nothing, so readable means EOF (or a reset): it hung up."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
