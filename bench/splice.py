"""sk_msg splicing on vs off for a same-pod loopback pair, and the blocking-reader hazard that keeps it opt-in.

Loads the eBPF datapath into a private cgroup and pin directory, makes one network namespace (a "pod"),
enrols it, and starts an echo server on 127.0.0.1:9000 in it. Then, in interleaved rounds, it enrols the pod
with splicing off and on and times N echoes of 1 MiB (client sends 1 MiB, server echoes it, client checks
sha256), so each figure is 2 MiB of payload per echo. Separately it runs the reproducer for the kernel
behaviour described under "Splicing" in docs/architecture.md: a *blocking* socket whose one thread sends and
half-closes while another thread waits in recv(); with splicing on, that recv() fails with EAGAIN.

    .venv/bin/python bench/splice.py                 # 3 rounds x 50 echoes, 20 blocking-reader tries
    .venv/bin/python bench/splice.py --rounds 1 -n 10

Prints a table and writes bench/results/splice.json. Everything it creates is removed on exit.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import platform
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 1 << 20
PORT = 9000
INBOUND_PORT = 15006  # enrolment registers the pod's inbound proxy listener, so something must listen here
APP_UID = 1000


# --- in-pod roles (this script re-executed inside the netns) ---------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while chunk := self.request.recv(65536):
            self.request.sendall(chunk)
        self.request.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve() -> None:
    inbound = socket.create_server(("0.0.0.0", INBOUND_PORT))
    with _Server(("127.0.0.1", PORT), _Echo) as server:
        print("ready", flush=True)
        server.serve_forever()
    inbound.close()


def _payload(size: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(256)) * (size // 256) + bytes(size % 256)


def echo_client(count: int, size: int) -> dict:
    """`count` echoes with a socket timeout: CPython then polls and retries EAGAIN, like an event loop."""
    data = _payload(size)
    want = hashlib.sha256(data).digest()
    intact = 0
    started = time.monotonic()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", PORT), timeout=30) as s:
            sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while chunk := s.recv(65536):
                got += chunk
            sender.join()
        intact += hashlib.sha256(got).digest() == want
    return {"echoes": count, "intact": intact, "seconds": time.monotonic() - started}


def blocking_client(count: int, size: int) -> dict:
    """The hazard: a blocking socket, one thread sending then half-closing, another blocked in recv()."""
    data = _payload(size)
    outcome = {"intact": 0, "eagain": 0, "other_error": 0, "damaged": 0}
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", PORT))
        s.settimeout(None)  # blocking: recv() may only return data, EOF or a real error
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got, result = bytearray(), None
        try:
            while chunk := s.recv(65536):
                got += chunk
        except BlockingIOError:
            result = "eagain"
        except OSError:
            result = "other_error"
        sender.join()
        s.close()
        outcome[result or ("intact" if bytes(got) == data else "damaged")] += 1
    return outcome


# --- the bench (host side) -----------------------------------------------------------------------------------


def run(rounds: int, count: int, blocking_tries: int) -> dict:
    from meshcni.config import PodConfig
    from meshcni.datapath.ebpf import EbpfDatapath
    from meshcni.datapath.interceptor import PodNet
    from meshcni.sys import cgroup, proc

    tag = uuid.uuid4().hex[:6]
    cg = cgroup.ensure(cgroup.unified_root() / f"meshcni-bench-splice-{tag}")
    pin_dir = Path(f"/sys/fs/bpf/meshcni-bench-splice-{tag}")
    ns = f"mcni-bench-splice-{tag}"
    ns_path = f"/var/run/netns/{ns}"
    server = None
    dp = None
    try:
        dp = EbpfDatapath.load(pin_dir, cgroup=cg)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.243.0.1/32", "dev", "lo"], check=True)
        pod = PodNet(key=tag, netns=ns_path, ips=(ipaddress.ip_address("10.243.0.1"),), config=PodConfig(),
                     name="bench", namespace="bench")
        server = proc.spawn([sys.executable, __file__, "--serve"], netns=ns_path, cgroup=cg, uid=APP_UID,
                            gid=APP_UID, stdout=subprocess.PIPE)
        assert server.stdout.readline().strip() == b"ready"

        def in_pod(*args: str) -> dict:
            done = proc.run([sys.executable, __file__, *args], netns=ns_path, cgroup=cg, uid=APP_UID,
                            gid=APP_UID, timeout=600)
            return json.loads(done.stdout)

        def enrol(splice: bool) -> None:
            dp.splice = splice
            dp.capture(pod)

        samples = {"off": [], "on": []}
        spliced_bytes = 0
        for r in range(rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                enrol(mode == "on")
                before = dp.counters(pod)["bytes_spliced"]
                got = in_pod("--echo", str(count), str(MIB))
                if mode == "on":
                    spliced_bytes += dp.counters(pod)["bytes_spliced"] - before
                samples[mode].append(got)
        hazard = {}
        for mode in ("off", "on"):
            enrol(mode == "on")
            hazard[mode] = in_pod("--blocking", str(blocking_tries), str(MIB))
        return {"samples": samples, "spliced_bytes": spliced_bytes, "blocking_reader": hazard}
    finally:
        if server is not None:
            proc.stop(server, grace=1)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if dp is not None:
            dp.unload()
        for pid in cgroup.pids(cg):
            proc.stop(proc.ref(pid), grace=1)
        cgroup.remove(cg)


def summarize(result: dict, count: int) -> dict:
    out = {}
    for mode, runs in result["samples"].items():
        rates = [2 * count * MIB / s["seconds"] / MIB for s in runs]  # MiB of payload moved per second
        out[mode] = {"median_mib_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
                     "max": round(max(rates), 1), "intact": sum(s["intact"] for s in runs),
                     "echoes": sum(s["echoes"] for s in runs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--count", type=int, default=50, help="1 MiB echoes per mode per round")
    parser.add_argument("--blocking-tries", type=int, default=20)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--blocking", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if args.echo:
        return print(json.dumps(echo_client(*args.echo)))
    if args.blocking:
        return print(json.dumps(blocking_client(*args.blocking)))

    result = run(args.rounds, args.count, args.blocking_tries)
    summary = summarize(result, args.count)
    print(f"same-pod loopback echo, {args.count} x 1 MiB each way per round, {args.rounds} rounds")
    print(f"{'splice':<8}{'MiB/s (median)':>16}{'min':>10}{'max':>10}{'intact':>12}")
    for mode, s in summary.items():
        print(f"{mode:<8}{s['median_mib_s']:>16}{s['min']:>10}{s['max']:>10}{s['intact']:>7}/{s['echoes']}")
    print(f"bytes spliced while on: {result['spliced_bytes']}")
    print("blocking reader (send + SHUT_WR in one thread, blocking recv in another):")
    for mode, h in result["blocking_reader"].items():
        print(f"  splice {mode}: {h}")
    report = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
              "config": vars(args), "summary": summary, **result}
    out = REPO / "bench" / "results" / "splice.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
