"""A small synchronous client of the agent's gRPC API, for the CLI and tests.

It turns the two failures a user can act on into domain errors: `AgentNotRunning` (no socket, or nothing
answering on it: start the agent) and `AgentCallError` (the agent answered with an error status, whose
message already says what was wrong). Replies are returned as plain dicts, the shape `-o json` prints.
"""

from __future__ import annotations

import json
import os

from meshcni.api import fork_safe  # noqa: F401 - before grpc is imported

import grpc
from google.protobuf.json_format import MessageToDict

from meshcni.api import agent_pb2 as pb
from meshcni.api import agent_pb2_grpc as pb_grpc
from meshcni.handoff.upgrade import DRAIN_TIMEOUT, READY_TIMEOUT

DEFAULT_SOCKET = "/var/run/meshcni/agent.sock"


class AgentNotRunning(Exception):
    def __init__(self, socket_path: str, reason: str):
        super().__init__(f"the meshcni agent is not running (no answer on {socket_path}: {reason}); "
                         f"start it with `meshcni agent` or check `systemctl`/the DaemonSet")
        self.socket_path = socket_path


class AgentCallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def to_dict(message) -> dict:
    d = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if "config_json" in d:
        d["config"] = json.loads(d.pop("config_json") or "{}")
    for pod in d.get("pods", []) + d.get("changed", []):
        if "config_json" in pod:
            pod["config"] = json.loads(pod.pop("config_json") or "{}")
    if isinstance(d.get("pod"), dict) and "config_json" in d["pod"]:
        d["pod"]["config"] = json.loads(d["pod"].pop("config_json") or "{}")
    return d


class AgentClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}")
        self._stub = pb_grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        if not os.path.exists(self.socket_path):
            raise AgentNotRunning(self.socket_path, "the socket does not exist")
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
                raise AgentNotRunning(self.socket_path, exc.details()) from None
            raise AgentCallError(exc.code(), exc.details() or str(exc.code())) from None

    # --- calls ------------------------------------------------------------------------------------------

    def add_pod(self, **fields) -> dict:
        return to_dict(self._call("AddPod", pb.PodRequest(**fields)))["pod"]

    def del_pod(self, **fields) -> dict:
        return to_dict(self._call("DelPod", pb.PodRequest(**fields)))

    def check_pod(self, **fields) -> dict:
        return to_dict(self._call("CheckPod", pb.PodRequest(**fields)))

    def list_pods(self) -> list[dict]:
        return to_dict(self._call("ListPods", pb.ListPodsRequest()))["pods"]

    def get_pod(self, key: str) -> dict:
        return to_dict(self._call("GetPod", pb.PodKey(key=key)))

    def counters(self, key: str = "") -> list[dict]:
        pods = to_dict(self._call("Counters", pb.PodKey(key=key)))["pods"]
        for pod in pods:  # proto3 JSON spells uint64 as strings; callers want numbers
            pod["counters"] = {k: int(v) for k, v in pod["counters"].items()}
        return pods

    def status(self) -> dict:
        return to_dict(self._call("Status", pb.StatusRequest()))

    def set_mode(self, mode: str, key: str = "") -> dict:
        return to_dict(self._call("SetMode", pb.SetModeRequest(key=key, mode=mode)))

    def gc(self, valid: list[tuple[str, str]]) -> list[dict]:
        req = pb.GcRequest(valid=[pb.Attachment(container_id=c, ifname=i) for c, i in valid])
        return to_dict(self._call("GarbageCollect", req))["removed"]

    def proxy_status(self, key: str) -> dict:
        d = to_dict(self._call("ProxyStatus", pb.PodKey(key=key)))
        for k in ("handoffs", "refused", "generation"):
            d[k] = int(d[k])
        d["upgrades"] = {k: int(v) for k, v in (d.get("upgrades") or {}).items()}
        return d

    def upgrade_proxy(self, key: str, kind: str = "graceful", argv: list[str] | None = None,
                      stop_signal: str = "", ready_socket: str = "", timeout: float = 0.0) -> dict:
        req = pb.UpgradeRequest(key=key, kind=kind, argv=argv or [], stop_signal=stop_signal,
                                ready_socket=ready_socket, timeout_seconds=timeout)
        # The agent answers once the new proxy serves and the old one has drained (or its drain timed out): the
        # call outlives both waits, so a slow upgrade that succeeded is never reported as a failed call.
        deadline = self.timeout + (timeout or READY_TIMEOUT) + DRAIN_TIMEOUT
        return to_dict(self._call("UpgradeProxy", req, timeout=deadline))

    def maps(self, name: str = "", limit: int = 0) -> dict:
        d = to_dict(self._call("Maps", pb.MapsRequest(name=name, limit=limit)))
        for m in d["maps"]:
            m["entries"] = None if int(m["entries"]) < 0 else int(m["entries"])
        d["entries"] = [json.loads(e) for e in d.pop("entries_json")]
        return d

    def watch_events(self, key: str = "", duration: float | None = None) -> "EventStream":
        """The agent's connection events, for one pod or all, from the moment this returns: it waits until the
        agent watches. Iterate for dicts as they happen; the stream ends after `duration` seconds (None: when
        the caller stops iterating or calls `cancel`). A refused watch raises on the first iteration."""
        if not os.path.exists(self.socket_path):
            raise AgentNotRunning(self.socket_path, "the socket does not exist")
        return EventStream(self._stub.WatchEvents(pb.PodKey(key=key), timeout=duration), self.socket_path,
                           bounded=duration is not None)


class EventStream:
    """One WatchEvents call. The agent sends its initial metadata once its watcher is registered, so by the
    time the constructor returns, every later capture decision will be seen (a refused watch answers with
    its error instead, raised by the first iteration)."""

    def __init__(self, call, socket_path: str, bounded: bool):
        self._call = call
        self._socket_path = socket_path
        self._bounded = bounded
        try:
            call.initial_metadata()
        except grpc.RpcError:
            pass  # the same error is raised again, mapped, by iteration

    def __iter__(self):
        try:
            for message in self._call:
                event = MessageToDict(message, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
                for k in ("time_unix_ns", "dropped"):  # proto3 JSON spells uint64 as strings
                    event[k] = int(event[k])
                yield event
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._bounded:
                return  # the watch ran its course
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
                raise AgentNotRunning(self._socket_path, exc.details()) from None
            raise AgentCallError(exc.code(), exc.details() or str(exc.code())) from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        """End the stream (from any thread): the iteration stops, the agent lets go of the watcher."""
        self._call.cancel()
