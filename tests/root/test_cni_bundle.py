"""The self-contained plugin bundle (dist/meshcni-cni/) on a node without Python: run with an empty
environment apart from CNI_* (`env -i`), VERSION and a real ADD/DEL against the fake agent in a throwaway
netns; and a check that nothing heavy (grpc, pyroute2, bcc, click) was bundled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cni_fake_agent import FakeAgent  # noqa: E402

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "dist" / "meshcni-cni" / "meshcni"
PREV = {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "mtu": 1500}],
        "ips": [{"interface": 0, "address": "10.239.0.42/24", "gateway": "10.239.0.1"}]}


@pytest.fixture(scope="module")
def bundle() -> Path:
    """Build the bundle with the project script (also when it is merely stale), as CI would."""
    sources = list((REPO / "meshcni" / "cni").glob("*.py"))
    if not BUNDLE.exists() or max(p.stat().st_mtime for p in sources) > BUNDLE.stat().st_mtime:
        subprocess.run([str(REPO / "scripts" / "build-plugin.sh")], check=True, capture_output=True, timeout=600)
    return BUNDLE


def run_bare(bundle: Path, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess:
    """`env -i` + the CNI_* variables only: no PATH, no PYTHONPATH, no HOME, no venv."""
    argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), str(bundle)]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=30, cwd="/")


@pytest.fixture
def netns(unique_id):
    name = f"mcni-cni-bundle-{unique_id}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_version_with_an_empty_environment(bundle) -> None:
    proc = run_bare(bundle, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("version", ["0.3.1", "1.1.0"])
def test_add_and_del_with_an_empty_environment(bundle, netns, tmp_path, version) -> None:
    with FakeAgent(str(tmp_path / "agent.sock")) as agent:
        conf = {"cniVersion": version, "name": "mcnitest", "type": "meshcni", "agentSocket": agent.socket_path,
                "pendingDir": str(tmp_path / "pending"), "prevResult": PREV}
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bare-1", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop"}
        proc = run_bare(bundle, env, json.dumps(conf).encode())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert out["cniVersion"] == version
        assert out["ips"][0]["address"] == "10.239.0.42/24"
        assert ("version" in out["ips"][0]) == (version == "0.3.1")
        assert ("mtu" in out["interfaces"][0]) == (version == "1.1.0")
        assert agent.enrolled[("bare-1", "eth0")]["pod_name"] == "web-0"

        proc = run_bare(bundle, {**env, "CNI_COMMAND": "DEL"}, json.dumps(conf).encode())
        assert proc.returncode == 0 and proc.stdout == b""
        assert agent.enrolled == {}


def test_errors_are_json_not_tracebacks(bundle, tmp_path) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bare-2", "CNI_NETNS": "/proc/self/ns/mnt", "CNI_IFNAME": "eth0"}
    proc = run_bare(bundle, env, json.dumps({"cniVersion": "1.0.0", "prevResult": PREV}).encode())
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 4
    assert b"Traceback" not in proc.stdout + proc.stderr
    proc = run_bare(bundle, {**env, "CNI_NETNS": "/proc/self/ns/net"}, b'{"cniVersion": "1.0.0", "prevResult": ')
    assert json.loads(proc.stdout)["code"] == 6


def test_bundle_carries_no_heavy_modules(bundle) -> None:
    viewer = Path(sys.executable).parent / "pyi-archive_viewer"
    listing = subprocess.run([str(viewer), "--list", "--recursive", str(bundle)], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    modules = {line.split("'")[-2] for line in listing.splitlines() if line.count("'") >= 2}
    assert "meshcni.cni.plugin" in modules and "http.client" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in {"grpc", "pyroute2", "bcc", "click", "psutil"})
    assert heavy == []
    internal = {p.name for p in (bundle.parent / "_internal").iterdir()}
    assert not any(name.startswith(("grpc", "pyroute2", "bcc", "click")) for name in internal)
