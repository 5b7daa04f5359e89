"""Pod annotations of this node, from the Kubernetes API server: one LIST, then a WATCH kept alive for good.

`KubePolicySource` is the agent's Kubernetes policy source. `start()` lists the pods bound to this node
(`fieldSelector=spec.nodeName=<node>`) and a daemon thread then watches from the list's resourceVersion,
surviving what a long-lived watch meets in practice: `410 Gone` (the server compacted past our
resourceVersion: list again and diff), dropped connections and server errors (back off with jitter, watch
again from the last resourceVersion), silence (a read timeout just starts a new watch). Only the
annotations capture depends on are kept (by default the `traffic.sidecar.istio.io/`, `sidecar.istio.io/` and
`meshcni.io/` prefixes), never whole Pod objects: a node's cache stays a few KB however large pods'
`last-applied-configuration` annotations are, and edits to unrelated annotations fire no callback.
Responses are read raw (`_preload_content=False`) and parsed with `json` for the same reason: the client's
model classes would build every field of every pod only for us to drop it.

The cache is written by LIST and WATCH only. `annotations()` answers a miss (a CNI ADD that raced ahead of
the watch) with one GET but does not cache its answer, so the cache never holds a pod the server has since
forgotten.

`on_change(namespace, name, annotations)` contract, exactly:
  * it runs on the watch thread, after the cache was updated, outside the cache lock, in event order;
  * MODIFIED (or a repeated ADDED) of a cached pod whose kept annotations differ from the cached ones →
    called with the new annotations (possibly `{}` when the last kept annotation was removed);
  * DELETED of a cached pod → called with `{}`; `cached(namespace, name)` is then `None`, which tells a
    deletion apart from "all annotations removed";
  * after a re-list (410 Gone), the same rules apply to the difference between the old and the new cache:
    pods gone → `{}`, pods whose annotations differ → the new annotations;
  * a pod first seen (ADDED, the initial LIST in `start()`, or a new pod in a re-list) → not called: nobody can
    have acted on a pod not known yet; read `pods()` after `start()` for the initial state;
  * an exception raised by the callback is logged with its traceback and the watch goes on (the cache is
    already correct; stopping the watch would turn one bad callback into a stale node).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from meshcni.config import ANN_INJECT, ANN_MODE, ANN_PREFIX

log = logging.getLogger("meshcni.agent.kube")

OnChange = Callable[[str, str, dict[str, str]], None]
PodKey = tuple[str, str]

# Annotation prefixes PodConfig.from_annotations reads (see meshcni/config.py).
DEFAULT_ANNOTATION_PREFIXES: tuple[str, ...] = (
    ANN_PREFIX,
    ANN_INJECT.rsplit("/", 1)[0] + "/",
    ANN_MODE.rsplit("/", 1)[0] + "/",
)

LIST_PAGE_SIZE = 500
# The server ends each watch after a random 5-10 minutes (client-go's reflector does the same) so that
# watchers of a restarted API server spread out instead of reconnecting in one burst.
WATCH_SERVER_TIMEOUT = (300, 600)
# Longer than the server's own timeout would mean waiting up to 10 min on a silently dead connection; bookmarks
# (requested) and events normally arrive well within this, and a timeout only costs one re-watch.
WATCH_READ_TIMEOUT = 120.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 30.0
CLOSE_JOIN_TIMEOUT = 10.0


class KubeSourceError(RuntimeError):
    """The API server could not be reached, refused us, or answered something that is not a Pod/PodList."""


class _Expired(Exception):
    """The watch's resourceVersion (or a list's continue token) is older than the server keeps: list again."""


@dataclass
class KubeSourceStatus:
    """Counters for the agent's /healthz and metrics."""

    watching: bool = False
    relists: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0
    resource_version: str | None = None
    last_error: str | None = None


class KubePolicySource:
    """This node's pods' annotations, kept current by a LIST + WATCH of the API server (see the module doc)."""

    def __init__(self, node_name: str, *, kubeconfig: str | None = None, api_client: Any = None,
                 on_change: OnChange | None = None,
                 annotation_prefixes: tuple[str, ...] | None = DEFAULT_ANNOTATION_PREFIXES):
        """`api_client` (a `kubernetes.client.ApiClient`) wins over credentials; else an explicit
        `kubeconfig`, else the in-cluster service account when KUBERNETES_SERVICE_HOST is set, else the
        default kubeconfig ($KUBECONFIG, ~/.kube/config). `annotation_prefixes=None` keeps every annotation."""
        if not node_name:
            raise KubeSourceError("node name is empty (set --node-name, e.g. from the downward API spec.nodeName)")
        self.node_name = node_name
        self._on_change = on_change
        self._prefixes = annotation_prefixes
        self._owns_client = api_client is None
        self._api_client = api_client if api_client is not None else _make_api_client(kubeconfig)
        self._core = k8s_client.CoreV1Api(self._api_client)
        self._selector = f"spec.nodeName={node_name}"
        self._lock = threading.Lock()
        self._cache: dict[PodKey, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: urllib3.BaseHTTPResponse | None = None  # the open watch, so close() can abort it
        self._status = KubeSourceStatus()

    # -- public API

    def start(self) -> None:
        """List this node's pods (raises KubeSourceError if that fails), then watch them on a daemon thread."""
        if self._thread is not None:
            raise KubeSourceError("KubePolicySource already started")
        if self._stop.is_set():
            raise KubeSourceError("KubePolicySource is closed")
        self._relist(notify=False)
        self._thread = threading.Thread(target=self._run, name=f"kube-watch-{self.node_name}", daemon=True)
        self._thread.start()

    def annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        """The pod's kept annotations: from the cache, or on a miss from one GET (not cached); None if 404."""
        with self._lock:
            cached = self._cache.get((namespace, name))
        if cached is not None:
            return dict(cached)
        pod = self._get_pod(namespace, name)
        return None if pod is None else self._keep(pod)

    def cached(self, namespace: str, name: str) -> dict[str, str] | None:
        """The cached annotations, never asking the server: None when the pod is not (or no longer) known."""
        with self._lock:
            cached = self._cache.get((namespace, name))
        return None if cached is None else dict(cached)

    def pods(self) -> dict[PodKey, dict[str, str]]:
        """A copy of the cache: (namespace, name) → kept annotations, for every pod bound to this node."""
        with self._lock:
            return {key: dict(ann) for key, ann in self._cache.items()}

    def status(self) -> KubeSourceStatus:
        with self._lock:
            return KubeSourceStatus(**vars(self._status))

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def close(self) -> None:
        """Stop the watch thread (aborting its open connection so it returns at once) and wait for it."""
        self._stop.set()
        response = self._response
        if response is not None:
            _abort(response)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("kube watch thread did not stop within %.0f s", CLOSE_JOIN_TIMEOUT)
        if self._owns_client:
            self._api_client.close()

    def __enter__(self) -> "KubePolicySource":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the watch loop

    def _run(self) -> None:
        delay = BACKOFF_INITIAL
        need_relist = False
        while not self._stop.is_set():
            try:
                if need_relist:
                    self._relist(notify=True)
                    need_relist = False
                if self._watch_once():
                    delay = BACKOFF_INITIAL  # the stream delivered something: the server is healthy
                continue  # a clean end (server timeout, read timeout): watch again at once
            except _Expired as exc:
                log.info("kube watch expired (%s); listing again", exc)
                need_relist = True
                # Back off only if the re-list itself keeps failing; a single 410 re-lists at once.
                continue
            except KubeSourceError as exc:
                if self._stop.is_set():
                    break
                self._record_error(str(exc))
                wait = delay * random.uniform(0.5, 1.0)
                log.warning("kube watch failed: %s; retrying in %.1f s", exc, wait)
                self._stop.wait(wait)
                delay = min(delay * 2, BACKOFF_MAX)
        with self._lock:
            self._status.watching = False

    def _watch_once(self) -> bool:
        """One WATCH request from the current resourceVersion; True if it delivered at least one event."""
        with self._lock:
            rv = self._status.resource_version
            self._status.watches += 1
        try:
            response = self._core.list_pod_for_all_namespaces(
                field_selector=self._selector, resource_version=rv, watch=True, allow_watch_bookmarks=True,
                timeout_seconds=random.randint(*WATCH_SERVER_TIMEOUT),
                _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, WATCH_READ_TIMEOUT))
        except ApiException as exc:
            if exc.status == 410:
                raise _Expired(f"HTTP 410 on watch from resourceVersion {rv}") from None
            raise KubeSourceError(_api_error("watch pods", exc)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeSourceError(f"watch pods on node {self.node_name}: {exc}") from None
        self._response = response
        if self._stop.is_set():  # close() ran before the response was published: it could not abort it
            _abort(response)
        with self._lock:
            self._status.watching = True
        delivered = False
        try:
            for event in _json_lines(response):
                self._apply_event(event)
                delivered = True
        except urllib3.exceptions.ReadTimeoutError:
            log.debug("kube watch silent for %.0f s; watching again", WATCH_READ_TIMEOUT)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if not self._stop.is_set():
                raise KubeSourceError(f"watch connection dropped: {exc}") from None
        finally:
            self._response = None
            with self._lock:
                self._status.watching = False
            response.close()
            response.release_conn()
        return delivered

    def _apply_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired(obj.get("message", "410 Gone"))
            raise KubeSourceError(f"watch error {code}: {obj.get('message', obj)}")
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if kind == "BOOKMARK":
            with self._lock:
                if rv:
                    self._status.resource_version = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise KubeSourceError(f"unexpected watch event type {kind!r}")
        key = (meta.get("namespace", ""), meta.get("name", ""))
        notify: dict[str, str] | None = None
        with self._lock:
            self._status.events += 1
            if rv:
                self._status.resource_version = rv
            if kind == "DELETED":
                if self._cache.pop(key, None) is not None:
                    notify = {}
            else:
                new = self._keep(obj)
                old = self._cache.get(key)
                self._cache[key] = new
                if old is not None and old != new:
                    notify = dict(new)
        if notify is not None:
            self._notify(key, notify)

    # -- LIST

    def _relist(self, *, notify: bool) -> None:
        """Replace the cache with a fresh paginated LIST; with `notify`, report the difference."""
        fresh, rv = self._list_all()
        with self._lock:
            old = self._cache
            self._cache = fresh
            self._status.resource_version = rv
            self._status.relists += 1
        if not notify:
            return
        for key, ann in old.items():
            new = fresh.get(key)
            if new is None:
                self._notify(key, {})
            elif new != ann:
                self._notify(key, dict(new))

    def _list_all(self) -> tuple[dict[PodKey, dict[str, str]], str]:
        pods: dict[PodKey, dict[str, str]] = {}
        token: str | None = None
        while True:
            try:
                response = self._core.list_pod_for_all_namespaces(
                    field_selector=self._selector, limit=LIST_PAGE_SIZE, _continue=token,
                    _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, REQUEST_TIMEOUT))
                body = _read_json(response)
            except ApiException as exc:
                if exc.status == 410 and token is not None:
                    # The continue token expired mid-list: a consistent list must start over.
                    pods.clear()
                    token = None
                    continue
                raise KubeSourceError(_api_error(f"list pods on node {self.node_name}", exc)) from None
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise KubeSourceError(f"list pods on node {self.node_name}: {exc}") from None
            if body.get("kind") != "PodList":
                raise KubeSourceError(f"list pods: expected a PodList, got kind {body.get('kind')!r}")
            for pod in body.get("items") or ():
                meta = pod.get("metadata") or {}
                pods[(meta.get("namespace", ""), meta.get("name", ""))] = self._keep(pod)
            list_meta = body.get("metadata") or {}
            token = list_meta.get("continue") or None
            if token is None:
                return pods, list_meta.get("resourceVersion") or ""

    # -- GET

    def _get_pod(self, namespace: str, name: str) -> dict | None:
        try:
            response = self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, REQUEST_TIMEOUT))
            body = _read_json(response)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeSourceError(_api_error(f"get pod {namespace}/{name}", exc)) from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise KubeSourceError(f"get pod {namespace}/{name}: {exc}") from None
        if body.get("kind") != "Pod":
            raise KubeSourceError(f"get pod {namespace}/{name}: expected a Pod, got kind {body.get('kind')!r}")
        return body

    # -- helpers

    def _keep(self, pod: Mapping[str, Any]) -> dict[str, str]:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        prefixes = self._prefixes
        # Interned keys: the same dozen annotation names repeat on every pod of the node.
        return {sys.intern(k): v for k, v in annotations.items()
                if prefixes is None or k.startswith(prefixes)}

    def _notify(self, key: PodKey, annotations: dict[str, str]) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(key[0], key[1], annotations)
        except Exception:  # noqa: BLE001 - see the module doc: a bad callback must not stop the watch
            log.exception("on_change(%s, %s) raised; the watch continues", key[0], key[1])

    def _record_error(self, message: str) -> None:
        with self._lock:
            self._status.errors += 1
            self._status.last_error = message


def _make_api_client(kubeconfig: str | None) -> Any:
    configuration = k8s_client.Configuration()
    try:
        if kubeconfig:
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            k8s_config.load_kube_config(client_configuration=configuration)
    except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = kubeconfig or ("in-cluster service account" if os.environ.get("KUBERNETES_SERVICE_HOST")
                               else "default kubeconfig")
        raise KubeSourceError(f"cannot load Kubernetes credentials from {where}: {exc}") from None
    return k8s_client.ApiClient(configuration)


def _read_json(response: Any) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _json_lines(response: Any) -> Iterator[dict]:
    """Watch events: one JSON object per line, lines split arbitrarily across HTTP chunks."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield _decode_event(line)
    if buffer.strip():
        yield _decode_event(buffer)


def _decode_event(line: bytes) -> dict:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise KubeSourceError(f"watch sent a line that is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise KubeSourceError("watch sent a JSON value that is not an event object")
    return event


def _api_error(what: str, exc: ApiException) -> str:
    message = exc.reason
    try:
        message = json.loads(exc.body).get("message", message)
    except (TypeError, ValueError, AttributeError):
        pass
    if exc.status in (401, 403):
        return f"{what}: HTTP {exc.status} {message} (check the ServiceAccount and its ClusterRole)"
    return f"{what}: HTTP {exc.status} {message}"


def _abort(response: Any) -> None:
    """Unblock a thread reading `response`: shut the socket down (urllib3 >= 2.3 has `shutdown()`)."""
    try:
        if hasattr(response, "shutdown"):
            response.shutdown()
        else:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                import socket

                sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the reader is returning anyway
