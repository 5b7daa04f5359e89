"""The CNI plugin's front door: the HTTP+JSON contract of meshcni/cni/protocol.py on a 0600 unix socket.

The plugin is exec'd by the container runtime for every pod and must stay light (no grpc import), so it
speaks plain HTTP/1.1 over a unix socket; this server maps each endpoint onto `AgentCore` and each
`AgentError` onto the contract's error body, whose `code` is the CNI error code the plugin reports.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from meshcni import __version__
from meshcni.agent.core import AgentCore, AgentError, PodSpec
from meshcni.cni import protocol

log = logging.getLogger("meshcni.agent")
MAX_BODY = 1 << 20  # a pod request is a few KiB; anything near this is not from our plugin


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


def _pod_reply(core: AgentCore, record) -> dict:
    return {"ok": True, "captured": record.mode != "off", "mode": record.mode,
            "container_id": record.container_id, "slot": core.slot_of(record)}


class CniHttpServer:
    def __init__(self, core: AgentCore, socket_path: str | os.PathLike, ready: Callable[[], bool]):
        self.core = core
        self.ready = ready
        self.path = Path(socket_path)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.path.unlink(missing_ok=True)
        handler = self._handler_class()
        old = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), handler)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cni-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self.path.unlink(missing_ok=True)

    # --- endpoints ------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if method == "GET" and path == protocol.PATH_STATUS:
            return 200, {"ok": True, "datapath_loaded": self.ready(), "version": __version__}
        if method != "POST":
            return 405, protocol.error_body(100, f"{method} {path} is not part of the CNI contract")
        if not self.ready() and path != protocol.PATH_DEL:
            return 503, protocol.error_body(11, "the meshcni agent is starting; try again")
        if not isinstance(body, dict):
            return 400, protocol.error_body(6, "the request body must be a JSON object")
        if path == protocol.PATH_ADD:
            record = self.core.add_pod(PodSpec.parse(body))
            return 200, _pod_reply(self.core, record)
        if path == protocol.PATH_DEL:
            record = self.core.del_pod(PodSpec.parse(body, need_netns=False))
            return 200, {"ok": True, "released": record is not None}
        if path == protocol.PATH_CHECK:
            problems = self.core.check_pod(PodSpec.parse(body, need_netns=False))
            if problems:
                raise AgentError("not_captured", "pod is not captured as configured", "; ".join(problems))
            return 200, {"ok": True}
        if path == protocol.PATH_GC:
            valid = body.get("valid_attachments")
            if not isinstance(valid, list) or not all(isinstance(a, dict) for a in valid):
                raise AgentError("invalid", "valid_attachments must be a list of {container_id, ifname}")
            keep = {(str(a.get("container_id", "")), str(a.get("ifname") or "eth0")) for a in valid}
            removed = self.core.gc(keep)
            return 200, {"ok": True, "removed": [{"container_id": r.container_id, "ifname": r.ifname}
                                                 for r in removed]}
        return 404, protocol.error_body(100, f"unknown endpoint {path}")

    def _handler_class(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def address_string(self) -> str:  # unix peers have no address
                return "cni-plugin"

            def log_message(self, fmt, *args):
                log.debug("cni http: " + fmt, *args)

            def _run(self, method: str) -> None:
                body = None
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        status, reply = 413, protocol.error_body(100, f"request body of {length} bytes is too large")
                    else:
                        if length:
                            try:
                                body = json.loads(self.rfile.read(length))
                            except (ValueError, UnicodeDecodeError) as exc:
                                raise AgentError("invalid", f"request body is not JSON: {exc}") from None
                        status, reply = outer.handle(method, self.path, body)
                except AgentError as exc:
                    status = protocol.http_status_for(exc.cni_code)
                    reply = protocol.error_body(exc.cni_code, exc.msg, exc.details)
                except Exception as exc:  # noqa: BLE001 - the plugin gets code 100, the log the trace
                    log.exception("cni %s %s failed", method, self.path)
                    status, reply = 500, protocol.error_body(100, f"agent error: {exc}")
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def do_GET(self):
                self._run("GET")

            def do_POST(self):
                self._run("POST")

        return Handler
