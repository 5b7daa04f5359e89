"""ADD latency of the meshcni CNI plugin as a runtime sees it: exec → result on stdout → exit.

Runs the installed bundle (default dist/meshcni-cni/meshcni; build it with scripts/build-plugin.sh) N times
with an empty environment apart from CNI_* against a real `meshcni agent` (private cgroup, bpffs dir and
sockets; the pod is a real network namespace enrolled into the eBPF datapath), each ADD for a new
container id followed by an untimed DEL, and reports p50/p90/p99/max. For comparison it also times VERSION
(pure startup, no agent call) and, unless --no-module, `python -m meshcni.cni`. `--fake-agent` uses the
stand-in from tests/cni_fake_agent.py instead, which answers immediately: the plugin's own cost alone.
Prints a table and writes bench/results/cni_add.json.

    .venv/bin/python bench/cni_add.py -n 200 [--fake-agent]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _agent import private_agent  # noqa: E402
from cni_fake_agent import FakeAgent  # noqa: E402

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": ""}],
        "ips": [{"interface": 0, "address": "10.239.0.9/24", "gateway": "10.239.0.1"}]}


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, round(p / 100 * len(sorted_ms)))
    return sorted_ms[min(rank, len(sorted_ms)) - 1]


def summarize(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(ms[-1], 2), "mean_ms": round(statistics.fmean(ms), 2)}


def measure(argv: list[str], base_env: dict[str, str], conf: dict, command: str, n: int, agent) -> list[float]:
    samples = []
    for i in range(n):
        env = {**base_env, "CNI_COMMAND": command, "CNI_CONTAINERID": f"bench-{command.lower()}-{i}"}
        stdin = json.dumps(conf).encode()
        start = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=30)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed ({argv[0]}): {proc.stdout.decode()} {proc.stderr.decode()}")
        samples.append(elapsed)
        if command == "ADD":
            subprocess.run(argv, input=stdin, env={**env, "CNI_COMMAND": "DEL"}, capture_output=True, timeout=30, check=True)
    if command == "ADD" and agent.leftovers():
        raise SystemExit(f"DEL left {agent.leftovers()} enrolment(s) behind")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="ADDs per variant (default 200)")
    parser.add_argument("--plugin", default=str(REPO / "dist" / "meshcni-cni" / "meshcni"))
    parser.add_argument("--no-module", action="store_true", help="skip the python -m meshcni.cni comparison")
    parser.add_argument("--fake-agent", action="store_true", help="time against the stand-in agent (plugin cost only)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cni_add.json"))
    args = parser.parse_args()
    if not os.access(args.plugin, os.X_OK):
        raise SystemExit(f"no plugin at {args.plugin}; run scripts/build-plugin.sh")

    variants = [("bundle", [args.plugin], {})]
    if not args.no_module:
        variants.append(("python -m", [sys.executable, "-m", "meshcni.cni"], {"PYTHONPATH": str(REPO)}))

    rows = []
    with tempfile.TemporaryDirectory(prefix="meshcni-bench-") as tmp, _agent(args.fake_agent, tmp) as agent:
        conf = {"cniVersion": "1.0.0", "name": "bench", "type": "meshcni", "agentSocket": agent.cni_socket,
                "pendingDir": os.path.join(tmp, "pending"), "prevResult": PREV}
        base_env = {"CNI_NETNS": agent.netns, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
                    "CNI_ARGS": "K8S_POD_NAME=bench;K8S_POD_NAMESPACE=default"}
        for name, argv, extra in variants:
            env = {**base_env, **extra}
            measure(argv, env, conf, "ADD", 5, agent)  # warm the page cache
            for command in ("VERSION", "ADD"):
                rows.append({"variant": name, "command": command, **summarize(measure(argv, env, conf, command, args.n, agent))})

    print(f"{'variant':<10} {'command':<8} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['command']:<8} {r['n']:>5} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}")
    report = {
        "benchmark": "cni_add",
        "what": "exec-to-exit latency of the meshcni plugin against "
                + ("the fake agent (tests/cni_fake_agent.py)" if args.fake_agent else "a real meshcni agent"),
        "agent": "fake" if args.fake_agent else "real",
        "target": "ADD p50 <= 150 ms, p99 <= 300 ms",
        "plugin": args.plugin,
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_1m": os.getloadavg()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


class _RealAgentTarget:
    """A real agent and one real netns standing in for the pod (each ADD enrols it under a new id)."""

    def __init__(self, agent, namespaces: list[str]):
        self._agent = agent
        self.cni_socket = str(agent.cni_socket)
        self.netns = namespaces[0]

    def leftovers(self) -> int:
        return len(list((self._agent.state_dir / "pods").glob("*.json")))


class _FakeAgentTarget:
    def __init__(self, agent: FakeAgent):
        self._agent = agent
        self.cni_socket = agent.socket_path
        self.netns = f"/proc/{os.getpid()}/ns/net"  # the fake agent only records it

    def leftovers(self) -> int:
        return len(self._agent.enrolled)


class _agent:
    def __init__(self, fake: bool, tmp: str):
        self._inner = FakeAgent(os.path.join(tmp, "agent.sock")) if fake else private_agent(netns_count=1)
        self._fake = fake

    def __enter__(self):
        inner = self._inner.__enter__()
        return _FakeAgentTarget(inner) if self._fake else _RealAgentTarget(*inner)

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


if __name__ == "__main__":
    main()
