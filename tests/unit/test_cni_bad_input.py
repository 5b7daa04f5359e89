"""The plugin as a runtime execs it (`python -m meshcni.cni`) fed bad input: every case must end in the
exact spec error code, one valid error JSON object on stdout, a non-zero exit, nothing enrolled in the
(fake, real-socket) agent, and no Python traceback anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cni_fake_agent import FakeAgent  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NETNS = "/proc/self/ns/net"
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": NETNS}],
        "ips": [{"interface": 0, "address": "10.239.0.9/24", "gateway": "10.239.0.1"}]}
DROP = object()  # marks a key to remove from the base env/config


def base_config(sock: str, tmp: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshcni", "agentSocket": sock,
            "pendingDir": str(tmp / "pending"), "prevResult": PREV}


BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-bad-1", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop"}


def run_plugin(env: dict, stdin: bytes) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "meshcni.cni"], input=stdin, env=full, capture_output=True,
                          timeout=30, cwd="/")


@pytest.fixture
def agent(tmp_path):
    with FakeAgent(str(tmp_path / "agent.sock")) as a:
        yield a


def regular_file(tmp: Path) -> str:
    p = tmp / "not-a-netns"
    p.write_text("x")
    return str(p)


# (id, env changes, config changes or a raw-bytes maker, expected code)
CASES = [
    ("malformed-json", {}, lambda c, t: b'{"cniVersion": "1.0.0", "name": ', 6),
    ("truncated-json", {}, lambda c, t: json.dumps(c).encode()[:60], 6),
    ("empty-stdin", {}, lambda c, t: b"", 6),
    ("whitespace-stdin", {}, lambda c, t: b"  \n ", 6),
    ("top-level-array", {}, lambda c, t: b"[1, 2]", 6),
    ("top-level-string", {}, lambda c, t: b'"meshcni"', 6),
    ("not-utf8", {}, lambda c, t: b'{"cniVersion": "\xff\xfe"}', 6),
    ("oversized-stdin", {}, lambda c, t: json.dumps(c).encode() + b" " * (1 << 20), 6),
    ("missing-prevResult", {}, {"prevResult": DROP}, 7),
    ("prevResult-not-object", {}, {"prevResult": ["10.0.0.1/24"]}, 7),
    ("prevResult-family-mismatch", {}, {"prevResult": {"ips": [{"version": "6", "address": "10.0.0.1/24"}]}}, 7),
    ("prevResult-bad-address", {}, {"prevResult": {"ips": [{"address": "10.0.0.300/24"}]}}, 7),
    ("unknown-cniVersion", {}, {"cniVersion": "9.9.9"}, 1),
    ("old-cniVersion-0.2.0", {}, {"cniVersion": "0.2.0"}, 1),
    ("missing-cniVersion", {}, {"cniVersion": DROP}, 7),
    ("cniVersion-not-string", {}, {"cniVersion": 1.0}, 7),
    ("missing-CNI_COMMAND", {"CNI_COMMAND": DROP}, {}, 4),
    ("unknown-command", {"CNI_COMMAND": "ATTACH"}, {}, 4),
    ("lowercase-command", {"CNI_COMMAND": "add"}, {}, 4),
    ("missing-CNI_CONTAINERID", {"CNI_CONTAINERID": DROP}, {}, 4),
    ("containerid-path-escape", {"CNI_CONTAINERID": "../../etc/x"}, {}, 4),
    ("missing-CNI_IFNAME", {"CNI_IFNAME": DROP}, {}, 4),
    ("ifname-too-long", {"CNI_IFNAME": "eth0123456789abc"}, {}, 4),
    ("ifname-with-slash", {"CNI_IFNAME": "et/h0"}, {}, 4),
    ("missing-CNI_NETNS", {"CNI_NETNS": DROP}, {}, 4),
    ("netns-does-not-exist", {"CNI_NETNS": "/var/run/netns/meshcni-no-such-ns"}, {}, 3),
    ("netns-regular-file", {"CNI_NETNS": regular_file}, {}, 4),
    ("netns-is-mnt-namespace", {"CNI_NETNS": "/proc/self/ns/mnt"}, {}, 4),
    ("netns-is-directory", {"CNI_NETNS": "/tmp"}, {}, 4),
    ("netns-relative", {"CNI_NETNS": "proc/self/ns/net"}, {}, 4),
    ("netns-dotdot", {"CNI_NETNS": "/proc/self/../self/ns/net"}, {}, 4),
    ("cni-args-malformed", {"CNI_ARGS": "K8S_POD_NAME"}, {}, 4),
    ("agentSocket-number", {}, {"agentSocket": 42}, 7),
    ("agentSocket-relative", {}, {"agentSocket": "run/cni.sock"}, 7),
    ("iptablesFallback-not-object", {}, {"failurePolicy": "iptables", "iptablesFallback": [15020]}, 7),
    ("iptablesFallback-unknown-key", {}, {"iptablesFallback": {"excludePorts": [1]}}, 7),
    ("iptablesFallback-port-out-of-range", {}, {"iptablesFallback": {"excludeInboundPorts": [70000]}}, 7),
    ("iptablesFallback-port-string", {}, {"iptablesFallback": {"excludeOutboundPorts": ["53"]}}, 7),
    ("failurePolicy-unknown", {}, {"failurePolicy": "sometimes"}, 7),
    ("failurePolicy-bool", {}, {"failurePolicy": True}, 7),
    ("pendingDir-list", {}, {"pendingDir": ["/tmp"]}, 7),
    ("logFile-relative", {}, {"logFile": "cni.log"}, 7),
    ("requestTimeout-string", {}, {"requestTimeoutSeconds": "10"}, 7),
    ("connectTimeout-negative", {}, {"connectTimeoutSeconds": -1}, 7),
    ("connectTimeout-bool", {}, {"connectTimeoutSeconds": True}, 7),
    ("logLevel-unknown", {}, {"logLevel": "loud"}, 7),
    ("name-number", {}, {"name": 42}, 7),
    ("runtimeConfig-list", {}, {"runtimeConfig": []}, 7),
    ("check-on-0.3.1", {"CNI_COMMAND": "CHECK"},
     {"cniVersion": "0.3.1", "prevResult": {"ips": [{"version": "4", "address": "10.0.0.1/24"}]}}, 1),
    ("status-on-1.0.0", {"CNI_COMMAND": "STATUS"}, {}, 1),
    ("gc-on-1.0.0", {"CNI_COMMAND": "GC"}, {"cni.dev/valid-attachments": []}, 1),
    ("gc-without-valid-attachments", {"CNI_COMMAND": "GC"}, {"cniVersion": "1.1.0"}, 7),
    ("gc-valid-attachments-wrong-type", {"CNI_COMMAND": "GC"},
     {"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": 5, "ifname": "eth0"}]}, 7),
]


def test_the_base_case_succeeds(agent, tmp_path) -> None:
    """The table's cases differ from this one in one thing only, so each fails for the reason it names."""
    proc = run_plugin(BASE_ENV, json.dumps(base_config(agent.socket_path, tmp_path)).encode())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["ips"][0]["address"] == "10.239.0.9/24"
    assert list(agent.enrolled) == [("ctr-bad-1", "eth0")]


@pytest.mark.parametrize("name,env_change,conf_change,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(agent, tmp_path, name, env_change, conf_change, code) -> None:
    env = dict(BASE_ENV)
    for k, v in env_change.items():
        if v is DROP:
            env.pop(k)
        else:
            env[k] = v(tmp_path) if callable(v) else v
    conf = base_config(agent.socket_path, tmp_path)
    if callable(conf_change):
        stdin = conf_change(conf, tmp_path)
    else:
        for k, v in conf_change.items():
            if v is DROP:
                conf.pop(k)
            else:
                conf[k] = v
        stdin = json.dumps(conf).encode()

    proc = run_plugin(env, stdin)

    assert proc.returncode != 0
    out = proc.stdout.decode()
    error = json.loads(out)  # exactly one JSON document: anything else on stdout would break this
    assert error["code"] == code, error
    assert isinstance(error["msg"], str) and error["msg"]
    assert error["cniVersion"] in ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
    assert "Traceback" not in out and "Traceback" not in proc.stderr.decode()
    assert agent.enrolled == {}
    assert "add" not in agent.verbs()
    assert not (tmp_path / "pending").exists()


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_agent_down_closed_policy_is_try_again_and_del_still_succeeds(tmp_path) -> None:
    conf = base_config(str(tmp_path / "no-agent.sock"), tmp_path)
    proc = run_plugin(BASE_ENV, json.dumps(conf).encode())
    error = json.loads(proc.stdout)
    assert proc.returncode == 1 and error["code"] == 11 and str(tmp_path / "no-agent.sock") in error["msg"]
    proc = run_plugin({**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, json.dumps(conf).encode())
    assert proc.returncode == 0 and proc.stdout == b""


def test_agent_down_open_policy_records_pending(tmp_path) -> None:
    conf = {**base_config(str(tmp_path / "no-agent.sock"), tmp_path), "failurePolicy": "open"}
    proc = run_plugin(BASE_ENV, json.dumps(conf).encode())
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
    record = json.loads((tmp_path / "pending" / "ctr-bad-1.json").read_text())
    assert record["ips"] == ["10.239.0.9/24"] and record["pod_name"] == "web-0"
