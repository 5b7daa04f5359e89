"""`HttpAgentClient`: the plugin's side of meshcni.cni.protocol, HTTP/1.1 + JSON over a unix socket.

Stdlib only (http.client, socket, json) so a plugin exec stays cheap. Two timeouts: a short one for
connecting (a missing or wedged agent must not hold up a pod, least of all its teardown) and a longer one
for the reply (capturing a pod may take the agent a moment). Anything that prevents an answer becomes
`AgentUnavailable`; a contract error body becomes `AgentRefused`; anything else malformed becomes
`AgentProtocolError`. The caller decides what each means for the CNI verb at hand.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from meshcni.cni import protocol

MAX_REPLY_BYTES = 1 << 20


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: only `connect` differs from TCP."""

    def __init__(self, socket_path: str, connect_timeout: float, timeout: float):
        super().__init__("meshcni-agent", timeout=timeout)
        self._socket_path = socket_path
        self._connect_timeout = connect_timeout

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock


class HttpAgentClient:
    """Talks to the agent at `socket_path`; one connection per call (the plugin makes one call per exec)."""

    def __init__(self, socket_path: str = protocol.DEFAULT_SOCKET, connect_timeout: float = 1.0, timeout: float = 10.0):
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    def add(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", protocol.PATH_ADD, request)

    def delete(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", protocol.PATH_DEL, request)

    def check(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", protocol.PATH_CHECK, request)

    def gc(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", protocol.PATH_GC, request)

    def status(self) -> dict[str, Any]:
        return self._call("GET", protocol.PATH_STATUS, None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        conn = _UnixHTTPConnection(self.socket_path, self.connect_timeout, self.timeout)
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Connection": "close", "Accept": "application/json"}
        try:
            try:
                conn.connect()
            except FileNotFoundError:
                raise protocol.AgentUnavailable(self.socket_path, "socket does not exist") from None
            except ConnectionRefusedError:
                raise protocol.AgentUnavailable(self.socket_path, "connection refused (agent not running)") from None
            except socket.timeout:
                raise protocol.AgentUnavailable(
                    self.socket_path, f"no connection within {self.connect_timeout:g}s"
                ) from None
            except OSError as exc:
                raise protocol.AgentUnavailable(self.socket_path, f"connect failed: {exc.strerror or exc}") from None
            try:
                conn.request(method, path, body=payload if body is not None else None, headers=headers)
                response = conn.getresponse()
                raw = response.read(MAX_REPLY_BYTES + 1)
            except socket.timeout:
                raise protocol.AgentUnavailable(self.socket_path, f"no reply to {path} within {self.timeout:g}s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise protocol.AgentUnavailable(self.socket_path, f"{path} failed mid-request: {exc}") from None
        finally:
            conn.close()
        return _decode_reply(path, response.status, raw)


def _decode_reply(path: str, status: int, raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_REPLY_BYTES:
        raise protocol.AgentProtocolError(f"agent reply to {path} exceeds {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise protocol.AgentProtocolError(f"agent reply to {path} (HTTP {status}) is not JSON") from None
    if not isinstance(reply, dict):
        raise protocol.AgentProtocolError(f"agent reply to {path} (HTTP {status}) is not a JSON object")
    error = reply.get("error")
    if error is not None:
        if not isinstance(error, dict) or not isinstance(error.get("code"), int) or isinstance(error.get("code"), bool):
            raise protocol.AgentProtocolError(f"agent error reply to {path} (HTTP {status}) has no integer code")
        raise protocol.AgentRefused(
            error["code"], str(error.get("msg") or "agent refused the request"), str(error.get("details") or ""), status
        )
    if status != 200 or reply.get("ok") is not True:
        raise protocol.AgentProtocolError(f"agent reply to {path} (HTTP {status}) is neither ok nor an error")
    return reply

