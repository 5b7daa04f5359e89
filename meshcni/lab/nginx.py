"""The pod's app: an nginx configuration whose every path lives under the pod's directory.

`GET /` answers `pod=<name> ip=<ip> peer=<remote address>` (the peer shows 127.0.0.6 when the inbound proxy
delivered the request); `GET /bytes/<n>` serves n bytes of the lab payload (files written here for the sizes
in `PAYLOAD_SIZES`); `POST /upload` accepts up to 16 MiB and answers the size it was told. nginx runs in the
foreground (`daemon off`) with its pid file, error log and temp directories in the pod directory, so it never
touches /run/nginx.pid or /var/lib/nginx and never conflicts with a host nginx.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshcni.lab.payload import payload

APP_PORTS = (80, 8080)
PAYLOAD_SIZES = (1024, 65536, 1 << 20)
NGINX_BIN = "/usr/sbin/nginx"
WORKER_UID = 65534  # nginx's workers run as nobody; only the master is root (to bind port 80)
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render(pod: str, ip: str, pod_dir: Path) -> str:
    tmp = pod_dir / "nginx-tmp"
    temp_lines = "\n".join(f"    {name}_temp_path {tmp / name};" for name in TEMP_DIRS)
    listens = "\n".join(f"        listen {port};" for port in APP_PORTS)
    return f"""# Written by meshcni lab for pod {pod}; every path is under {pod_dir}.
daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid {pod_dir / 'nginx.pid'};
error_log {pod_dir / 'nginx-error.log'} warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 100000;
{temp_lines}

    server {{
{listens}
        root {pod_dir / 'www'};

        location = / {{
            default_type text/plain;
            return 200 "pod={pod} ip={ip} peer=$remote_addr\\n";
        }}
        location /bytes/ {{
        }}
        location = /upload {{
            client_max_body_size 16m;
            client_body_buffer_size 16m;
            default_type text/plain;
            return 200 "pod={pod} received=$content_length\\n";
        }}
    }}
}}
"""


def write(pod: str, ip: str, pod_dir: Path) -> Path:
    """Write nginx.conf, the payload files and the worker-writable temp directories; return the config path."""
    www = pod_dir / "www" / "bytes"
    www.mkdir(parents=True, exist_ok=True)
    for size in PAYLOAD_SIZES:
        (www / str(size)).write_bytes(payload(size))
    for name in TEMP_DIRS:
        d = pod_dir / "nginx-tmp" / name
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, WORKER_UID, WORKER_UID)
    conf = pod_dir / "nginx.conf"
    conf.write_text(render(pod, ip, pod_dir), encoding="utf-8")
    return conf


def argv(conf: Path, pod_dir: Path) -> list[str]:
    # -e: nginx opens its compiled-in error log before reading the config; point it at the pod directory too.
    return [NGINX_BIN, "-c", str(conf), "-p", str(pod_dir), "-e", str(pod_dir / "nginx-error.log")]
