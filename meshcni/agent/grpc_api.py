"""The gRPC front door (meshcni/api/agent.proto) on a unix socket, for the CLI and other node tools.

Each RPC converts the request to the core's types, calls `AgentCore`, and converts back; an `AgentError`
becomes the gRPC status it names, with its message as the details, so `meshcni` can print exactly what went
wrong. The socket is created 0600: only root on the node may drive the agent.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent import futures
from pathlib import Path
from typing import Callable

from meshcni.api import fork_safe  # noqa: F401 - before grpc is imported

import grpc

from meshcni import __version__
from meshcni.agent.core import AgentCore, AgentError, PodSpec
from meshcni.agent.events import EventHub
from meshcni.agent.registry import PodRecord
from meshcni.api import agent_pb2 as pb
from meshcni.api import agent_pb2_grpc as pb_grpc
from meshcni.datapath import maps as datapath_maps
from meshcni.datapath.events import ConnectionEvent, wall_clock_ns
from meshcni.handoff.upgrade import READY_TIMEOUT

log = logging.getLogger("meshcni.agent")


def pod_message(core: AgentCore, record: PodRecord) -> pb.Pod:
    slot = core.slot_of(record)
    return pb.Pod(
        container_id=record.container_id, ifname=record.ifname, netns=record.netns,
        pod_name=record.pod_name, pod_namespace=record.pod_namespace, pod_uid=record.pod_uid,
        ips=record.ips, mode=record.mode, mode_source=record.mode_source,
        captured=record.phase == "captured" and record.mode != "off",
        slot=-1 if slot is None else slot, listener=core.listener_state(record),
        config_json=json.dumps(record.config, sort_keys=True), added_at=record.added_at,
    )


def event_message(event: ConnectionEvent, record: PodRecord | None, dropped: int) -> pb.ConnectionEvent:
    return pb.ConnectionEvent(
        time_unix_ns=wall_clock_ns(event.time_ns), container_id=record.container_id if record else "",
        pod_name=record.pod_name if record else "", pod_namespace=record.pod_namespace if record else "",
        kind=event.kind, reason=event.reason, family=event.family, src=event.src, sport=event.sport,
        dst=event.dst, dport=event.dport, pid=event.pid, uid=event.uid, comm=event.comm, dropped=dropped,
    )


def _spec(request: pb.PodRequest, need_netns: bool = True) -> PodSpec:
    return PodSpec.parse({
        "container_id": request.container_id, "netns": request.netns, "ifname": request.ifname,
        "ips": list(request.ips), "pod_name": request.pod_name or request.cni_args.get("K8S_POD_NAME", ""),
        "pod_namespace": request.pod_namespace or request.cni_args.get("K8S_POD_NAMESPACE", ""),
        "pod_uid": request.pod_uid or request.cni_args.get("K8S_POD_UID", ""),
    }, need_netns=need_netns)


def _guard(method: Callable) -> Callable:
    """Turn AgentError (and anything unexpected) into a gRPC status instead of a stack trace."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except AgentError as exc:
            context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.msg)
        except Exception as exc:  # noqa: BLE001 - the client gets a message, the log gets the trace
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")

    wrapper.__name__ = method.__name__
    return wrapper


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, core: AgentCore, status: Callable[[], dict], events: EventHub | None = None):
        self.core = core
        self.status = status
        self.events = events if events is not None else EventHub(None)

    @_guard
    def AddPod(self, request, context):
        return pb.PodReply(pod=pod_message(self.core, self.core.add_pod(_spec(request))))

    @_guard
    def DelPod(self, request, context):
        record = self.core.del_pod(_spec(request, need_netns=False))
        return pb.PodReply(pod=pod_message(self.core, record) if record else None)

    @_guard
    def CheckPod(self, request, context):
        problems = self.core.check_pod(_spec(request, need_netns=False))
        return pb.CheckReply(ok=not problems, problems=problems)

    @_guard
    def ListPods(self, request, context):
        pods = sorted(self.core.registry.all(), key=lambda r: (r.pod_namespace, r.pod_name, r.container_id))
        return pb.ListPodsReply(pods=[pod_message(self.core, r) for r in pods])

    @_guard
    def GetPod(self, request, context):
        return pod_message(self.core, self.core.find(request.key))

    @_guard
    def Counters(self, request, context):
        records = [self.core.find(request.key)] if request.key else self.core.registry.all()
        out = []
        for r in sorted(records, key=lambda r: (r.pod_namespace, r.pod_name, r.container_id)):
            out.append(pb.PodCounters(container_id=r.container_id, pod_name=r.pod_name,
                                      pod_namespace=r.pod_namespace, mode=r.mode, counters=self.core.counters(r)))
        return pb.CountersReply(pods=out)

    @_guard
    def Status(self, request, context):
        s = self.status()
        return pb.StatusReply(
            version=__version__, datapath_loaded=s["datapath_loaded"], pin_dir=s["pin_dir"], cgroup=s["cgroup"],
            node_mode=s["node_mode"], enrolled=s["enrolled"], pods_by_mode=s["pods_by_mode"],
            features=s["features"], degraded=s["degraded"], started_at=s["started_at"],
            attached_programs=s["attached_programs"], pending_replayed=s["pending_replayed"],
        )

    @_guard
    def SetMode(self, request, context):
        if request.key:
            changed = [self.core.set_pod_mode(request.key, request.mode)]
        else:
            changed = self.core.set_node_mode(request.mode)
        return pb.SetModeReply(changed=[pod_message(self.core, r) for r in changed],
                               node_mode=self.core.node_mode.value)

    @_guard
    def ProxyStatus(self, request, context):
        record = self.core.find(request.key)
        reply = pb.ProxyStatusReply(container_id=record.container_id, pod_name=record.pod_name,
                                    pod_namespace=record.pod_namespace)
        info = self.core.proxy_status(record)
        if info is None:
            return reply
        reply.held = True
        reply.socket = info["socket"]
        reply.listeners.extend(pb.ListenerInfo(name=n, address=v["address"], queued=v["queued"])
                               for n, v in info["listeners"].items())
        reply.proxy_pids.extend(info["proxy_pids"])
        reply.handoffs, reply.refused, reply.generation = info["handoffs"], info["refused"], info["generation"]
        reply.reacquired = info["reacquired"]
        reply.upgrades.CopyFrom(pb.UpgradeCounters(**info["upgrades"]))
        return reply

    @_guard
    def UpgradeProxy(self, request, context):
        result = self.core.upgrade_proxy(request.key, request.kind or "graceful", argv=list(request.argv),
                                         stop_signal=request.stop_signal or "SIGUSR1",
                                         ready_socket=request.ready_socket or None,
                                         timeout=request.timeout_seconds or READY_TIMEOUT)
        return pb.UpgradeReply(kind=result.kind, old_pid=result.old_pid, new_pid=result.new.pid,
                               old_exited=result.old_exited, queued=result.queued,
                               in_flight_lost=result.in_flight_lost, seconds=result.seconds)

    @_guard
    def Maps(self, request, context):
        if self.core.ebpf is None:
            raise AgentError("precondition", "no eBPF datapath is loaded on this node, so it has no maps")
        pin_dir = str(self.core.ebpf.pin_dir)
        reply = pb.MapsReply(pin_dir=pin_dir, maps=[
            pb.MapInfo(**{**m, "entries": -1 if m["entries"] is None else m["entries"]})
            for m in datapath_maps.describe(pin_dir)])
        if request.name:
            try:
                rows, truncated = datapath_maps.entries(pin_dir, request.name, request.limit or 100)
            except KeyError as exc:
                raise AgentError("not_found", exc.args[0]) from None
            except ValueError as exc:
                raise AgentError("invalid", str(exc)) from None
            reply.entries_json.extend(json.dumps(r, sort_keys=True) for r in rows)
            reply.truncated = truncated
        return reply

    def WatchEvents(self, request, context):
        """A stream (so not behind `_guard`, which returns one reply): errors before the first event abort."""
        try:
            only = self.core.find(request.key) if request.key else None
            watcher = self.events.watch()
        except AgentError as exc:
            context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.msg)
        context.add_callback(watcher.close)  # the moment the client leaves, not when the generator is collected
        context.send_initial_metadata((("meshcni-watching", "1"),))  # the client's cue: nothing is missed now
        try:
            while context.is_active():
                batch = watcher.next_batch(timeout=0.5)
                if not batch:
                    continue
                # slots are reused as pods come and go: resolve them against the registry of this moment
                by_slot = {r.slot: r for r in self.core.registry.all() if self.core.slot_of(r) is not None}
                dropped = watcher.dropped  # once per batch: it reads a map
                for event in batch:
                    record = by_slot.get(event.slot)
                    if only is not None and (record is None or record.container_id != only.container_id):
                        continue
                    yield event_message(event, record, dropped)
        finally:
            watcher.close()

    @_guard
    def GarbageCollect(self, request, context):
        removed = self.core.gc({(a.container_id, a.ifname or "eth0") for a in request.valid})
        return pb.GcReply(removed=[pb.Attachment(container_id=r.container_id, ifname=r.ifname) for r in removed])


def serve(service: AgentService, socket_path: str | os.PathLike, workers: int = 8) -> grpc.Server:
    """Start the gRPC server on a fresh 0600 unix socket; the caller stops it."""
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.unlink(missing_ok=True)  # the daemon already proved no other agent owns it (its lock file)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"))
    pb_grpc.add_AgentServicer_to_server(service, server)
    # umask instead of a chmod after bind: the socket is never reachable by others, not even briefly
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server

