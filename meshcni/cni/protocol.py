"""The wire contract between the `meshcni` CNI plugin and the node agent that serves it.

Transport: HTTP/1.1 with JSON bodies over a unix stream socket, default `/var/run/meshcni/cni.sock`
(plugin config key `agentSocket`), the same shape as Istio's CNI plugin talking to its node agent. One
request per connection (`Connection: close`); `Host: meshcni-agent`; `Content-Type: application/json`.
The socket should be 0600 root-owned: only the runtime (root) execs the plugin.

Endpoints

    POST /v1/cni/add     enrol the pod: capture its traffic into its sidecar proxy
    POST /v1/cni/del     release the pod; MUST succeed when the pod, its netns or its enrolment is gone
    POST /v1/cni/check   verify the pod is really captured (datapath state, not just a registry entry)
    POST /v1/cni/gc      drop every enrolment whose (container_id, ifname) is not in valid_attachments
    GET  /v1/status      is the agent ready to serve ADD (datapath loaded)?

Request body of add/del/check (`pod_request` builds it):

    {"cni_version": "1.1.0", "container_id": "...", "netns": "/var/run/netns/x" ("" allowed on del),
     "ifname": "eth0", "cni_args": {"K8S_POD_NAME": "...", ...}, "pod_name": "...", "pod_namespace": "...",
     "pod_uid": "...", "infra_container_id": "...", "ips": ["10.0.0.5/24", ...] (from prevResult),
     "plugin_config": {...the plugin's network config minus prevResult...}}

Request body of gc: {"cni_version", "valid_attachments": [{"container_id", "ifname"}, ...], "plugin_config"}.

Responses: HTTP 200 with `{"ok": true, ...}`. add may add `"captured": bool, "mode": str` (a pod that
opted out is `ok` with `captured: false`); gc adds `"removed": [{"container_id", "ifname"}, ...]`; status
answers `{"ok": true, "datapath_loaded": bool, "version": str}`.
Failures: an HTTP 4xx/5xx status with `{"error": {"code": <CNI code>, "msg": str, "details": str}}`, where
`code` is what the plugin reports to the runtime: 3 unknown container (del treats it as success), 7 invalid
config, 11 try again (agent not ready yet; with failurePolicy "open" or "iptables" the plugin then treats
the agent as away, as below), 101 pod not captured (check), 100 anything else the agent could not do.
Suggested statuses: 400 for 4/6/7, 404 for 3, 503 for 11/50, 500 otherwise; the plugin trusts the body's
code, and a reply without that JSON shape becomes error 102 (protocol).

Pending enrolments: when the agent is unreachable and failurePolicy is "open", the plugin writes the add
request body plus `{"reason", "recorded_at"}` to `<pendingDir>/<container_id>.json` (atomic rename,
default dir /var/run/meshcni/pending). With failurePolicy "iptables" the plugin first captures the pod
itself with Istio's nat rules in its netns (node defaults: uid/gid 1337, 15001/15006) and the record also
carries `"fallback": "iptables"`. The agent replays each file as an add on start-up and deletes it; for a
fallback record it adopts the pod: its own mode captures first, then it removes the plugin's iptables rules
(make-before-break). The plugin deletes the file itself on del (removing its iptables rules first, if the
record says it wrote them) and on gc for attachments that are no longer valid.
"""

from __future__ import annotations

from typing import Any, Protocol

DEFAULT_SOCKET = "/var/run/meshcni/cni.sock"
DEFAULT_PENDING_DIR = "/var/run/meshcni/pending"

PATH_ADD = "/v1/cni/add"
PATH_DEL = "/v1/cni/del"
PATH_CHECK = "/v1/cni/check"
PATH_GC = "/v1/cni/gc"
PATH_STATUS = "/v1/status"

HTTP_STATUS_FOR_CODE = {3: 404, 4: 400, 6: 400, 7: 400, 11: 503, 50: 503}


def http_status_for(code: int) -> int:
    """The HTTP status an agent should send with an error of this CNI code."""
    return HTTP_STATUS_FOR_CODE.get(code, 500)


class AgentUnavailable(Exception):
    """No answer from the agent: the socket is missing, refuses, or the agent did not reply in time."""

    def __init__(self, socket_path: str, reason: str):
        super().__init__(f"meshcni agent at {socket_path} is unreachable: {reason}")
        self.socket_path = socket_path
        self.reason = reason


class AgentRefused(Exception):
    """The agent answered with a contract error body: it understood the request and said no."""

    def __init__(self, code: int, msg: str, details: str = "", http_status: int = 0):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details
        self.http_status = http_status


class AgentProtocolError(Exception):
    """The agent answered something that does not follow this contract."""


class AgentClient(Protocol):
    """What the plugin core needs from the agent; `client.HttpAgentClient` speaks it over the socket."""

    socket_path: str

    def add(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def delete(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def check(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def gc(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def pod_request(
    *,
    cni_version: str,
    container_id: str,
    netns: str,
    ifname: str,
    cni_args: dict[str, str],
    ips: list[str],
    plugin_config: dict[str, Any],
) -> dict[str, Any]:
    """The body of add/del/check; the Kubernetes identity comes from the kubelet's CNI_ARGS."""
    return {
        "cni_version": cni_version,
        "container_id": container_id,
        "netns": netns,
        "ifname": ifname,
        "cni_args": dict(cni_args),
        "pod_name": cni_args.get("K8S_POD_NAME", ""),
        "pod_namespace": cni_args.get("K8S_POD_NAMESPACE", ""),
        "pod_uid": cni_args.get("K8S_POD_UID", ""),
        "infra_container_id": cni_args.get("K8S_POD_INFRA_CONTAINER_ID", ""),
        "ips": list(ips),
        "plugin_config": plugin_config,
    }


def gc_request(*, cni_version: str, valid: list[tuple[str, str]], plugin_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "cni_version": cni_version,
        "valid_attachments": [{"container_id": c, "ifname": i} for c, i in valid],
        "plugin_config": plugin_config,
    }


def error_body(code: int, msg: str, details: str = "") -> dict[str, Any]:
    """What an agent sends on failure (used by the agent and by the test stand-in)."""
    return {"error": {"code": code, "msg": msg, "details": details}}
