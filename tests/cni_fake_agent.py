"""A stand-in for the meshcni node agent, serving meshcni.cni.protocol over a real unix socket.

THIS IS NOT THE AGENT. It exists only until the agent issue lands, so the plugin can be tested against a
real HTTP-over-AF_UNIX server implementing the contract: an in-memory registry of enrolments keyed by
(container_id, ifname), with switches to make it not ready, drop its datapath, or hang. "Captured" here
means "enrolled and its netns still exists"; the real agent checks the datapath.

Usable as a context manager in tests (`with FakeAgent(path) as agent:`) or as a process:
`python tests/cni_fake_agent.py --socket /tmp/x.sock`.
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from meshcni.cni import protocol

_REQUIRED = {"container_id": str, "netns": str, "ifname": str, "cni_args": dict, "ips": list, "plugin_config": dict}


class FakeAgent:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.enrolled: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.datapath_loaded = True
        self.not_ready = False  # answer add with code 11, as an agent still starting up would
        self.hang_seconds = 0.0  # delay every reply (to exercise the plugin's timeouts)
        self.lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "FakeAgent":
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._server = _Server(self.socket_path, _Handler)
        self._server.agent = self
        os.chmod(self.socket_path, 0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-agent", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "FakeAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def verbs(self) -> list[str]:
        with self.lock:
            return [path.rsplit("/", 1)[-1] for path, _ in self.calls]

    # -- contract
    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.calls.append((path, body))
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        if method == "GET" and path == protocol.PATH_STATUS:
            return 200, {"ok": True, "datapath_loaded": self.datapath_loaded, "version": "fake"}
        if method != "POST" or path not in (protocol.PATH_ADD, protocol.PATH_DEL, protocol.PATH_CHECK, protocol.PATH_GC):
            return 404, protocol.error_body(100, f"no endpoint {method} {path}")
        if not isinstance(body, dict):
            return 400, protocol.error_body(6, "request body is not a JSON object")
        if path == protocol.PATH_GC:
            return self._gc(body)
        for key, typ in _REQUIRED.items():
            if not isinstance(body.get(key), typ):
                return 400, protocol.error_body(7, f"request field {key} missing or not {typ.__name__}")
        key = (body["container_id"], body["ifname"])
        with self.lock:
            if path == protocol.PATH_ADD:
                if self.not_ready:
                    return 503, protocol.error_body(11, "agent is starting; datapath not loaded yet")
                if not body["netns"] or not os.path.exists(body["netns"]):
                    return 404, protocol.error_body(3, f"netns {body['netns']!r} does not exist")
                self.enrolled[key] = body
                return 200, {"ok": True, "captured": True, "mode": "fake"}
            if path == protocol.PATH_DEL:
                self.enrolled.pop(key, None)  # idempotent by contract
                return 200, {"ok": True}
            entry = self.enrolled.get(key)  # CHECK
            if entry is None:
                return 404, protocol.error_body(101, f"pod {key[0]}/{key[1]} is not captured", "no enrolment")
            if not os.path.exists(entry["netns"]):
                return 404, protocol.error_body(101, f"pod {key[0]} netns {entry['netns']} is gone")
            if sorted(entry["ips"]) != sorted(body["ips"]):
                return 409, protocol.error_body(101, "pod addresses changed since ADD", f"{entry['ips']} != {body['ips']}")
            return 200, {"ok": True}

    def _gc(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        valid = body.get("valid_attachments")
        if not isinstance(valid, list):
            return 400, protocol.error_body(7, "valid_attachments must be a list")
        keep = {(v.get("container_id"), v.get("ifname")) for v in valid if isinstance(v, dict)}
        with self.lock:
            stale = [k for k in self.enrolled if k not in keep]
            for k in stale:
                del self.enrolled[k]
        return 200, {"ok": True, "removed": [{"container_id": c, "ifname": i} for c, i in stale]}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    agent: FakeAgent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET", None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self._serve("POST", body)

    def _serve(self, method: str, body: dict[str, Any] | None) -> None:
        status, reply = self.server.agent.handle(method, self.path, body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def address_string(self) -> str:  # AF_UNIX peers have no address tuple
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _main() -> None:
    parser = argparse.ArgumentParser(description="meshcni agent stand-in (tests only)")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    agent = FakeAgent(args.socket).start()
    print(f"fake agent on {args.socket}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()


if __name__ == "__main__":
    _main()
