"""What a lab is made of, as one JSON file in its state directory.

`up` records every resource the moment it exists (write-ahead, one atomic rename per change), so `down` from a
fresh process — or after an `up` that died half-way — knows exactly what to remove. Names are derived from the
lab name in one place (`LabNames`), so teardown can also find resources by convention when the file is gone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshcni.sys.proc import ProcessRef

DEFAULT_STATE_ROOT = Path("/var/run/meshcni/lab")
STATE_FILE = "state.json"
STATE_VERSION = 1
LAB_NAMESPACE = "lab"  # the Kubernetes namespace lab pods claim to live in (CNI_ARGS K8S_POD_NAMESPACE)
NETNS_DIR = Path("/var/run/netns")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class LabError(RuntimeError):
    """A lab operation failed; the message says which step and why."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise LabError(
            f"lab name {name!r} must be 1-32 characters of a-z, 0-9 and '-', starting and ending alphanumeric"
        )
    return name


@dataclass(frozen=True)
class LabNames:
    """Every host-visible name a lab uses, derived from its name (and its subnet index for the bridge)."""

    lab: str

    @property
    def netns_prefix(self) -> str:
        return f"mcni-lab-{self.lab}-"

    def netns(self, index: int) -> str:
        return f"{self.netns_prefix}{index}"

    def pod(self, index: int) -> str:
        # Pods are named a, b, c, ... so the demo reads naturally; past z they become p26, p27, ...
        return chr(ord("a") + index) if index < 26 else f"p{index}"

    def container_id(self, index: int) -> str:
        return f"mcni-lab-{self.lab}-{index}"

    @property
    def cgroup_dir(self) -> str:
        return f"meshcni-lab-{self.lab}"

    @property
    def bpf_pin_dir(self) -> Path:
        return Path(f"/sys/fs/bpf/meshcni-lab-{self.lab}")

    @staticmethod
    def bridge(subnet_index: int) -> str:
        return f"mcnilab{subnet_index}"


@dataclass
class PodState:
    index: int
    name: str
    netns: str  # path, e.g. /var/run/netns/mcni-lab-x-0
    container_id: str
    ifname: str = "eth0"
    ip: str | None = None
    mac: str | None = None
    cni_added: bool = False  # ADD was attempted: DEL must run even if ADD failed half-way (CNI spec)
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    captured: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["processes"] = {k: v.to_dict() for k, v in self.processes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PodState":
        d = dict(d)
        d["processes"] = {k: ProcessRef.from_dict(v) for k, v in d.get("processes", {}).items()}
        return cls(**d)


@dataclass
class LabState:
    name: str
    state_dir: str
    subnet: str
    subnet_index: int
    bridge: str
    cgroup: str
    capture: bool
    proxy_http_ports: list[int]
    conflist: dict
    cni_path: list[str] = field(default_factory=lambda: ["/usr/lib/cni"])
    host_ip_forward_before: str | None = None
    bpf_pin_dir: str | None = None
    pods: list[PodState] = field(default_factory=list)
    use_agent: bool = False  # pods are enrolled by the lab's own agent through the meshcni CNI plugin
    agent_mode: str = "ebpf"  # the agent's node mode
    hold_listeners: bool = False  # the agent holds each sidecar's listeners; HAProxy runs via proxy-exec
    agent_process: dict | None = None  # ProcessRef.to_dict() of the running agent
    agent_metrics: str | None = None  # host:port of its /metrics
    phase: str = "creating"  # creating -> ready; "failed" after a rolled-back up
    version: int = STATE_VERSION

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / STATE_FILE

    def pod(self, name: str) -> PodState:
        for p in self.pods:
            if p.name == name:
                return p
        raise LabError(f"lab {self.name} has no pod {name!r} (pods: {', '.join(p.name for p in self.pods)})")

    def save(self) -> None:
        data = asdict(self)
        data["pods"] = [p.to_dict() for p in self.pods]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> "LabState | None":
        path = Path(state_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read lab state {path}: {exc}") from exc
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab state {path} has version {data.get('version')}, expected {STATE_VERSION}")
        data["pods"] = [PodState.from_dict(p) for p in data.get("pods", [])]
        return cls(**data)


def default_state_dir(name: str) -> Path:
    return DEFAULT_STATE_ROOT / name
