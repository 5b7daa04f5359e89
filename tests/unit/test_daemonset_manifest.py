"""daemonset/meshcni.yaml: the invariants a broken manifest would violate on a real cluster.

No cluster runs here, so these check what kubectl and the kubelet would only find at deploy time: every
mount has a volume, every hostPath has a sensible type, propagation is legal, RBAC is read-only on pods,
the install-cni args are flags `meshcni install-cni --help` really accepts (and, with host paths moved to
tmp, really install), the agent args are flags the agent documents, and ports and paths agree across the
agent, install-cni, the probes, the Prometheus annotations and the Dockerfile.

AGENT_FLAGS is the agent's documented flag list as this manifest relies on it; keep it in step with
meshcni/cli/agent.py (when the `agent` command is registered, the test also checks against it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml
from click.testing import CliRunner

from meshcni.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "daemonset" / "meshcni.yaml"
DOCKERFILE = ROOT / "daemonset" / "Dockerfile"

AGENT_FLAGS = {"--kube", "--node-name", "--kubeconfig", "--metrics-address", "--bpf-dir", "--cgroup",
               "--state-dir", "--socket", "--cni-socket", "--pending-dir", "--mode", "--log-level",
               "--handoff-dir", "--hold-listeners"}
# host path → (hostPath type, mount propagation or None, container that mounts it)
EXPECTED_HOST_PATHS = {
    "/opt/cni/bin": ("DirectoryOrCreate", None, "install-cni"),
    "/etc/cni/net.d": ("DirectoryOrCreate", None, "install-cni"),
    "/var/lib/meshcni/install": ("DirectoryOrCreate", None, "install-cni"),
    "/sys/fs/bpf": ("DirectoryOrCreate", "Bidirectional", "agent"),
    "/sys/fs/cgroup": ("Directory", "HostToContainer", "agent"),
    "/var/run/meshcni": ("DirectoryOrCreate", None, "agent"),
    "/var/lib/meshcni": ("DirectoryOrCreate", None, "agent"),
    "/var/run/netns": ("DirectoryOrCreate", "HostToContainer", "agent"),
}
VALID_HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                        "BlockDevice"}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return docs["DaemonSet"]["spec"]["template"]["spec"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] if c["name"] == name)


def flag_values(args: list[str]) -> dict[str, str | None]:
    """--flag value / --flag=value / --switch → {flag: value or None}; args[0] is the sub-command."""
    out: dict[str, str | None] = {}
    i = 1
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"stray argument {arg!r}"
        if "=" in arg:
            name, value = arg.split("=", 1)
            out[name] = value
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[arg] = args[i + 1]
            i += 2
        else:
            out[arg] = None
            i += 1
    return out


def under_mount(path: str, c: dict) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in c.get("volumeMounts", []))


def test_objects_and_namespace(docs):
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
    assert docs["ServiceAccount"]["metadata"]["namespace"] == "kube-system"
    assert docs["DaemonSet"]["metadata"]["namespace"] == "kube-system"


def test_rbac_is_read_only_on_pods(docs, pod):
    rules = docs["ClusterRole"]["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": docs["ClusterRole"]["metadata"]["name"]}
    sa = docs["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert pod["serviceAccountName"] == sa["name"]


def test_daemonset_runs_on_every_node_as_node_critical(docs, pod):
    spec = docs["DaemonSet"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # no key, no effect: tolerates every taint
    assert {c["name"] for c in pod["containers"]} == {"agent", "install-cni"}


def test_every_mount_has_a_volume_and_every_volume_is_mounted(pod):
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert len(volumes) == len(pod["volumes"])
    mounted = set()
    for c in pod["containers"]:
        paths = [m["mountPath"] for m in c["volumeMounts"]]
        assert len(paths) == len(set(paths)), f"{c['name']} mounts a path twice"
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']} mounts undefined volume {m['name']}"
            mounted.add(m["name"])
    assert mounted == set(volumes)


def test_host_paths_types_and_propagation(pod):
    volumes = {v["name"]: v for v in pod["volumes"]}
    seen = {}
    for name, v in volumes.items():
        assert set(v) == {"name", "hostPath"}, f"{name} is not a hostPath volume"
        assert v["hostPath"].get("type", "") in VALID_HOSTPATH_TYPES
        seen[v["hostPath"]["path"]] = (name, v["hostPath"]["type"])
    assert set(seen) == set(EXPECTED_HOST_PATHS)
    for path, (htype, propagation, owner) in EXPECTED_HOST_PATHS.items():
        name, actual_type = seen[path]
        assert actual_type == htype, path
        mounts = [(c, m) for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == name]
        assert [c["name"] for c, _ in mounts] == [owner], path
        c, m = mounts[0]
        assert m.get("mountPropagation") == propagation, path
        if propagation == "Bidirectional":  # the API server rejects it in an unprivileged container
            assert c["securityContext"]["privileged"] is True


def test_install_cni_args_are_real_flags(pod):
    args = container(pod, "install-cni")["args"]
    assert args[0] == "install-cni"
    result = CliRunner().invoke(main, ["install-cni", "--help"])
    assert result.exit_code == 0, result.output
    documented = set(re.findall(r"--[a-z][a-z-]+", result.output))
    flags = flag_values(args)
    unknown = set(flags) - documented
    assert not unknown, f"install-cni does not accept {sorted(unknown)}"
    assert "--uninstall" not in flags and "--no-watch" not in flags  # it must stay up to watch


def test_install_cni_args_really_install(pod, tmp_path):
    """The manifest's exact args, host paths moved under tmp and --watch turned into --no-watch."""
    args = container(pod, "install-cni")["args"]
    flags = flag_values(args)
    (tmp_path / "etc/cni/net.d").mkdir(parents=True)
    conflist = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge"}]}
    (tmp_path / "etc/cni/net.d/10-net.conflist").write_text(json.dumps(conflist))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "meshcni").write_text("#!/bin/sh\nexit 0\n")
    (bundle / "meshcni").chmod(0o755)

    def local(value: str) -> str:
        if value == flags["--plugin-source"]:
            return str(bundle)
        return str(tmp_path / value.removeprefix("/host/")) if value.startswith("/host/") else value

    run_args = ["--no-watch" if a == "--watch" else (a if a.startswith("--") else local(a)) for a in args]
    result = CliRunner().invoke(main, run_args)
    assert result.exit_code == 0, result.output
    chained = json.loads((tmp_path / "etc/cni/net.d/10-net.conflist").read_text())
    assert [p["type"] for p in chained["plugins"]] == ["bridge", "meshcni"]
    assert chained["plugins"][1]["agentSocket"] == flags["--agent-socket"]
    assert chained["plugins"][1]["failurePolicy"] == flags["--failure-policy"]
    assert (tmp_path / "opt/cni/bin/meshcni").exists()


def test_install_cni_writes_only_under_its_mounts(pod):
    c = container(pod, "install-cni")
    flags = flag_values(c["args"])
    for flag in ("--bin-dir", "--conf-dir", "--state-dir"):
        assert under_mount(flags[flag], c), f"{flag} {flags[flag]} is not on a volume"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_agent_args_are_documented_flags(pod):
    args = container(pod, "agent")["args"]
    assert args[0] == "agent"
    flags = flag_values(args)
    assert not set(flags) - AGENT_FLAGS, f"undocumented agent flags {sorted(set(flags) - AGENT_FLAGS)}"
    assert "--kube" in flags and flags["--kube"] is None
    agent_cmd = main.commands.get("agent")
    if agent_cmd is not None:  # the real command, once registered, has the last word
        real = {o for p in agent_cmd.params for o in p.opts + p.secondary_opts}
        assert AGENT_FLAGS <= real, f"AGENT_FLAGS lists flags the agent lacks: {sorted(AGENT_FLAGS - real)}"


def test_agent_node_name_comes_from_the_downward_api(pod):
    c = container(pod, "agent")
    assert flag_values(c["args"])["--node-name"] == "$(NODE_NAME)"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_paths_sockets_and_ports_agree(docs, pod):
    agent = container(pod, "agent")
    flags = flag_values(agent["args"])
    for flag in ("--bpf-dir", "--state-dir", "--socket", "--cni-socket", "--pending-dir"):
        assert under_mount(flags[flag], agent), f"agent {flag} {flags[flag]} is not on a volume"
    install = flag_values(container(pod, "install-cni")["args"])
    assert install["--agent-socket"] == flags["--cni-socket"]

    host, port = flags["--metrics-address"].rsplit(":", 1)
    assert host == "0.0.0.0"  # the kubelet probes the pod IP (= node IP under hostNetwork)
    probe = agent["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": int(port)}
    assert [(p["containerPort"], p["hostPort"]) for p in agent["ports"]] == [(int(port), int(port))]
    annotations = docs["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["meshcni.io/mode"] == "off"
    assert agent["securityContext"]["privileged"] is True


def test_plugin_source_is_where_the_image_puts_the_bundle(pod):
    source = flag_values(container(pod, "install-cni")["args"])["--plugin-source"]
    dockerfile = DOCKERFILE.read_text()
    assert f"COPY --from=build /src/dist/meshcni-cni {source}\n" in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/meshcni-entrypoint"]' in dockerfile
    images = {c["image"] for c in pod["containers"]}
    assert len(images) == 1, "both containers run the same image"
