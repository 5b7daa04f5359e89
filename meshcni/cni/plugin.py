"""The meshcni chained CNI plugin: a thin translator from CNI verbs to calls on the node agent.

`run_command` is the core. It takes its collaborators as arguments (an `AgentClient`, a `PendingStore`, a
`PluginLog`) so it is unit-tested with a fake agent and, separately, executed for real by a runtime in a
network namespace. `main` is the exec wrapper: it reads the CNI_* environment and stdin, builds the real
collaborators, prints the result or the spec error JSON on stdout, and returns the exit status; logs go to
stderr and the configured logFile only, and no Python traceback ever reaches the runtime.

Verb semantics: ADD is chained-only (no prevResult → 7) and prints prevResult back in the requested
version; DEL is idempotent and succeeds when the pod, netns or agent is gone; CHECK asks the agent whether
the pod is really captured; STATUS is ok only when the agent answers with its datapath loaded (else 50);
GC passes cni.dev/valid-attachments to the agent and prunes stale pending records. failurePolicy decides
what an unreachable agent (or one answering 11, not ready) means at ADD: "closed" → 11 try again; "open" →
pass uncaptured and record the pod under pendingDir for the agent to enrol later; "iptables" → the plugin
writes Istio's nat rules in the pod netns itself (`fallback.IptablesFallback`, node defaults), so the pod
starts captured, and records it with `"fallback": "iptables"` so the agent adopts it (captures in its own
mode first, then removes these rules). If those rules cannot be written the ADD fails with 103 naming the
netns, with nothing of ours left in it. DEL of such a pod removes the rules while its record is still there
(the agent has not adopted it yet); a failure there is logged, never fatal.
"""

from __future__ import annotations

import json
import sys
from typing import Any, BinaryIO, Callable, Mapping, TextIO

from meshcni.cni import conf as confmod
from meshcni.cni import protocol, spec
from meshcni.cni.conf import Invocation, PluginConfig
from meshcni.cni.fallback import Fallback, FallbackError, IptablesFallback
from meshcni.cni.log import PluginLog
from meshcni.cni.netns import NetnsInvalid, NetnsMissing, check_netns, check_path_shape
from meshcni.cni.pending import PendingStore
from meshcni.cni.protocol import AgentClient, AgentProtocolError, AgentRefused, AgentUnavailable
from meshcni.cni.spec import CniError

ERR_FALLBACK_FAILED = 103  # failurePolicy iptables: the agent is away and the plugin could not capture either
ERR_INTERNAL = 110  # a bug in the plugin itself; the message names the exception
FALLBACK_IPTABLES = "iptables"  # the pending record's "fallback" value: the pod is captured by our rules
DEL_TIMEOUT_CAP = 5.0  # seconds: teardown is never held longer than this by a slow agent

ClientFactory = Callable[[str, float, float], AgentClient]


def run_command(
    inv: Invocation,
    conf: PluginConfig,
    agent: AgentClient,
    pending: PendingStore,
    log: PluginLog,
    fallback: Fallback | None = None,
) -> dict[str, Any] | None:
    """Carry out one verb; returns the JSON to print (None for verbs that print nothing) or raises CniError.

    `fallback` captures and releases pods for failurePolicy "iptables"; constructing the default is free,
    it imports the datapath only when used."""
    handler = _HANDLERS[inv.command]
    return handler(inv, conf, agent, pending, log, fallback if fallback is not None else IptablesFallback())


def _add(inv: Invocation, conf: PluginConfig, agent: AgentClient, pending: PendingStore, log: PluginLog,
         fallback: Fallback):
    if conf.prev_result is None:
        raise CniError(
            spec.ERR_INVALID_CONFIG,
            "meshcni must be chained after a plugin that sets up the interface (no prevResult)",
            'add {"type": "meshcni"} as the last plugin of a conflist',
        )
    _require_netns(inv.netns)
    request = _pod_request(inv, conf)
    try:
        reply = agent.add(request)
    except AgentUnavailable as exc:
        _agent_away(conf, request, pending, log, fallback, str(exc))
    except AgentRefused as exc:
        if exc.code == spec.ERR_TRY_AGAIN and conf.failure_policy != "closed":
            _agent_away(conf, request, pending, log, fallback, f"agent not ready: {exc.msg}")
        else:
            raise _from_refusal(exc) from None
    except AgentProtocolError as exc:
        raise CniError(spec.ERR_AGENT_PROTOCOL, str(exc)) from None
    else:
        pending.forget(inv.container_id)  # a re-ADD after an open-policy pass supersedes the record
        log.info(f"enrolled ips={request['ips']} captured={reply.get('captured')} mode={reply.get('mode')}")
    return spec.render_result(conf.prev_result, conf.cni_version)


def _agent_away(
    conf: PluginConfig, request: dict[str, Any], pending: PendingStore, log: PluginLog, fallback: Fallback, why: str
):
    if conf.failure_policy == "closed":
        raise CniError(
            spec.ERR_TRY_AGAIN,
            f"meshcni agent at {conf.agent_socket} is unavailable; pod not created (failurePolicy closed)",
            why,
        )
    if conf.failure_policy == FALLBACK_IPTABLES:
        _capture_by_iptables(conf, request, pending, log, fallback, why)
        return
    try:
        where = pending.record(request, why)
    except OSError as exc:
        raise CniError(
            spec.ERR_IO, f"agent unavailable and cannot record pending pod in {pending.directory}", str(exc)
        ) from None
    log.warning(f"{why}; pod passes uncaptured (failurePolicy open), recorded in {where}")


def _capture_by_iptables(
    conf: PluginConfig, request: dict[str, Any], pending: PendingStore, log: PluginLog, fallback: Fallback, why: str
):
    """Capture first, record second: a pod is never running uncaptured, and a record always means rules.

    (The other order could leave rules written after an agent that just came back had already adopted the
    pod.) A record that cannot be written undoes the capture, so the ADD fails with nothing left behind."""
    cid, netns = request["container_id"], request["netns"]
    try:
        fallback.capture(cid, netns, request["ips"], conf.fallback_exclude_inbound, conf.fallback_exclude_outbound)
    except FallbackError as exc:
        raise CniError(
            ERR_FALLBACK_FAILED,
            f"meshcni agent is unavailable and the iptables fallback failed in netns {netns}; pod not created",
            f"{exc} (agent: {why})",
        ) from None
    try:
        where = pending.record(dict(request, fallback=FALLBACK_IPTABLES), why)
    except OSError as exc:
        undo = ""
        try:
            fallback.release(cid, netns)
        except FallbackError as undo_exc:
            undo = f"; {undo_exc}"
        raise CniError(
            spec.ERR_IO,
            f"agent unavailable and cannot record the iptables-captured pod in {pending.directory}; pod not created",
            f"{exc}{undo}",
        ) from None
    log.warning(f"{why}; pod captured by the plugin's iptables rules (failurePolicy iptables), recorded in {where}")


def _del(inv: Invocation, conf: PluginConfig, agent: AgentClient, pending: PendingStore, log: PluginLog,
         fallback: Fallback):
    netns = inv.netns
    if netns:
        try:
            check_path_shape(netns)
        except NetnsInvalid as exc:
            log.warning(f"ignoring malformed CNI_NETNS on DEL: {exc}")
            netns = ""
    if netns and _pending_fallback(pending, inv.container_id, log) == FALLBACK_IPTABLES:
        # The record is still there, so the agent has not adopted the pod: the rules are ours to remove.
        # Released before the record is forgotten, so a DEL that dies half-way is redone by the next one.
        try:
            fallback.release(inv.container_id, netns)
            log.info("removed the fallback iptables rules")
        except FallbackError as exc:
            log.warning(f"{exc}; DEL proceeds")
    if pending.forget(inv.container_id):
        log.info("removed pending record")
    request = _pod_request(inv, conf, netns=netns)
    try:
        agent.delete(request)
    except AgentUnavailable as exc:
        # Teardown must not wait for the agent; it drops stale enrolments itself (GC, netns watch).
        log.warning(f"{exc}; DEL proceeds")
    except AgentRefused as exc:
        if exc.code != spec.ERR_UNKNOWN_CONTAINER:
            raise _from_refusal(exc) from None
        log.info("agent does not know the pod; nothing to release")
    except AgentProtocolError as exc:
        raise CniError(spec.ERR_AGENT_PROTOCOL, str(exc)) from None
    return None


def _pending_fallback(pending: PendingStore, container_id: str, log: PluginLog) -> str | None:
    """The "fallback" of the pod's pending record; None without a (readable) record."""
    try:
        record = pending.load(container_id)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning(f"unreadable pending record of {container_id}: {exc}")
        return None
    return record.get("fallback") if isinstance(record, dict) else None


def _check(inv: Invocation, conf: PluginConfig, agent: AgentClient, pending: PendingStore, log: PluginLog,
           fallback: Fallback):
    _require_version(conf, "0.4.0", "CHECK")
    if conf.prev_result is None:
        raise CniError(spec.ERR_INVALID_CONFIG, "CHECK needs prevResult (the result of the ADD being checked)")
    _require_netns(inv.netns)
    try:
        agent.check(_pod_request(inv, conf))
    except AgentUnavailable as exc:
        raise CniError(spec.ERR_TRY_AGAIN, f"cannot verify capture: {exc}") from None
    except AgentRefused as exc:
        raise _from_refusal(exc) from None
    except AgentProtocolError as exc:
        raise CniError(spec.ERR_AGENT_PROTOCOL, str(exc)) from None
    return None


def _status(inv: Invocation, conf: PluginConfig, agent: AgentClient, pending: PendingStore, log: PluginLog,
            fallback: Fallback):
    _require_version(conf, "1.1.0", "STATUS")
    try:
        reply = agent.status()
    except AgentUnavailable as exc:
        raise CniError(spec.ERR_STATUS_NOT_AVAILABLE, str(exc)) from None
    except AgentRefused as exc:
        raise CniError(spec.ERR_STATUS_NOT_AVAILABLE, f"agent not ready: {exc.msg}", exc.details) from None
    except AgentProtocolError as exc:
        raise CniError(spec.ERR_STATUS_NOT_AVAILABLE, str(exc)) from None
    if reply.get("datapath_loaded") is not True:
        raise CniError(spec.ERR_STATUS_NOT_AVAILABLE, "meshcni agent is up but its datapath is not loaded")
    return None


def _gc(inv: Invocation, conf: PluginConfig, agent: AgentClient, pending: PendingStore, log: PluginLog,
         fallback: Fallback):
    _require_version(conf, "1.1.0", "GC")
    valid = conf.valid_attachments or []
    keep = {cid for cid, _ in valid}
    for cid in pending.container_ids():
        if cid not in keep and pending.forget(cid):
            log.info(f"gc: dropped pending record of {cid}")
    try:
        reply = agent.gc(protocol.gc_request(cni_version=conf.cni_version, valid=valid, plugin_config=conf.forwarded()))
    except AgentUnavailable as exc:
        raise CniError(spec.ERR_TRY_AGAIN, f"gc not delivered: {exc}") from None
    except AgentRefused as exc:
        raise _from_refusal(exc) from None
    except AgentProtocolError as exc:
        raise CniError(spec.ERR_AGENT_PROTOCOL, str(exc)) from None
    log.info(f"gc: agent removed {len(reply.get('removed') or [])} stale enrolment(s)")
    return None


_HANDLERS = {"ADD": _add, "DEL": _del, "CHECK": _check, "STATUS": _status, "GC": _gc}


def _require_version(conf: PluginConfig, minimum: str, verb: str) -> None:
    if not spec.at_least(conf.cni_version, minimum):
        raise CniError(
            spec.ERR_INCOMPATIBLE_VERSION, f"config version {conf.cni_version} does not allow {verb}", f"needs {minimum}+"
        )


def _require_netns(path: str) -> None:
    try:
        check_netns(path)
    except NetnsMissing as exc:
        raise CniError(spec.ERR_UNKNOWN_CONTAINER, str(exc)) from None
    except NetnsInvalid as exc:
        raise CniError(spec.ERR_INVALID_ENV, f"CNI_NETNS: {exc}") from None


def _pod_request(inv: Invocation, conf: PluginConfig, netns: str | None = None) -> dict[str, Any]:
    return protocol.pod_request(
        cni_version=conf.cni_version,
        container_id=inv.container_id,
        netns=inv.netns if netns is None else netns,
        ifname=inv.ifname,
        cni_args=inv.cni_args,
        ips=spec.result_ips(conf.prev_result) if conf.prev_result else [],
        plugin_config=conf.forwarded(),
    )


def _from_refusal(exc: AgentRefused) -> CniError:
    code = exc.code if exc.code > 0 else spec.ERR_AGENT_FAILED
    return CniError(code, f"meshcni agent: {exc.msg}", exc.details)


# ------------------------------------------------------------------------------------------------ exec


def _default_client(socket_path: str, connect_timeout: float, timeout: float) -> AgentClient:
    # Imported here so VERSION and config errors never pay for http.client.
    from meshcni.cni.client import HttpAgentClient

    return HttpAgentClient(socket_path, connect_timeout, timeout)


def main(
    env: Mapping[str, str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO | None = None,
    client_factory: ClientFactory = _default_client,
) -> int:
    """One plugin exec: returns the process exit status (0 ok, 1 error with spec JSON on stdout)."""
    log = PluginLog(stderr if stderr is not None else sys.stderr)
    reply_version = spec.LATEST
    try:
        try:
            # stdin is read before the environment is judged so every error can echo the requested version.
            raw: dict[str, Any] | None = None
            stdin_error: CniError | None = None
            try:
                data = confmod.read_stdin(stdin)
                if data.strip():
                    raw = confmod.decode_config(data)
            except CniError as exc:
                stdin_error = exc
            requested = confmod.requested_version(raw) if raw is not None else None
            if requested in spec.SUPPORTED_VERSIONS:
                reply_version = requested
            inv = confmod.parse_invocation(env)
            if stdin_error is not None:
                raise stdin_error
            if inv.command == "VERSION":
                _emit(stdout, spec.version_info(requested))
                return 0
            if raw is None:
                raise CniError(spec.ERR_DECODE, "no network config on stdin")
            conf = confmod.parse_config(raw, inv.command)
            log.to_file(conf.log_file, conf.log_level)
            log.context = f"{inv.command} {inv.container_id or conf.name} "
            timeout = min(conf.request_timeout, DEL_TIMEOUT_CAP) if inv.command == "DEL" else conf.request_timeout
            agent = client_factory(conf.agent_socket, conf.connect_timeout, timeout)
            result = run_command(inv, conf, agent, PendingStore(conf.pending_dir), log)
        except CniError:
            raise
        except Exception as exc:  # a plugin bug: report it as JSON, never as a traceback
            raise CniError(ERR_INTERNAL, f"internal error: {type(exc).__name__}: {exc}") from None
    except CniError as err:
        log.error(f"code {err.code}: {err.msg}{' (' + err.details + ')' if err.details else ''}")
        _emit(stdout, err.to_json(reply_version))
        return 1
    if result is not None:
        _emit(stdout, result)
    return 0


def _emit(stdout: BinaryIO, obj: dict[str, Any]) -> None:
    stdout.write(json.dumps(obj).encode() + b"\n")
    stdout.flush()
