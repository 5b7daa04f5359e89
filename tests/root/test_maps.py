"""Root tests: `meshcni maps` on a lab's real datapath, through the agent: every map is described with its
kernel type and how full it is, and a map's entries decode to what the agent says about its pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meshcni.datapath.maps import SPECS
from meshcni.lab import traffic
from tests.root.lab_fixture import captured_lab

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    with captured_lab(f"t-maps-{os.getpid() % 100000}") as state:
        yield state


@pytest.fixture(scope="module")
def client(lab):
    from meshcni.agent.client import AgentClient
    from meshcni.lab import agent as lab_agent

    with AgentClient(str(lab_agent.paths(lab)["socket"])) as c:
        yield c


def test_every_map_is_described_with_its_type_and_fill(lab, client):
    d = client.maps()
    assert d["pin_dir"] == lab.bpf_pin_dir
    by_name = {m["name"]: m for m in d["maps"]}
    assert list(by_name) == [spec.name for spec in SPECS]
    assert all(m["pinned"] for m in d["maps"])
    types = {name: m["type"] for name, m in by_name.items()}
    assert types["mcni_socks_v1"] == "sockhash" and types["mcni_listeners_v1"] == "sockmap"
    assert types["mcni_events_v1"] == "ringbuf" and types["mcni_accepted_origdst_v1"] == "sk_storage"
    assert types["mcni_cidrs_v1"] == "lpm_trie" and types["mcni_counters_v1"] == "percpu_array"
    # two IPv4 pods: two enrolments, two pod IPs, two inbound listeners; nothing unread in the ring
    assert [by_name[n]["entries"] for n in ("mcni_pods_v1", "mcni_pod_ips_v1", "mcni_listeners_v1")] == [2, 2, 2]
    assert by_name["mcni_events_v1"]["entries"] == 0
    assert by_name["mcni_accepted_origdst_v1"]["entries"] is None  # per socket: not listable
    assert by_name["mcni_pod_config_v1"]["entries"] is None  # an array: every slot exists


def test_entries_decode_to_what_the_agent_says_about_its_pods(lab, client):
    pods = {p["slot"]: p for p in client.list_pods()}
    ips = client.maps("mcni_pod_ips_v1")["entries"]
    assert sorted((e["key"], e["value"]) for e in ips) == sorted((p["ips"][0], slot) for slot, p in pods.items())
    config = client.maps("mcni_pod_config_v1")["entries"]
    assert sorted(e["key"] for e in config) == sorted(pods)
    assert {(e["value"]["proxy_uid"], e["value"]["outbound_port"], e["value"]["inbound_port"]) for e in config} \
        == {(1337, 15001, 15006)}
    assert all({"capture_outbound", "capture_inbound", "splice"} <= set(e["value"]["flag_names"]) for e in config)
    listeners = client.maps("mcni_listeners_v1")["entries"]
    assert sorted((e["key"]["slot"], e["key"]["family"]) for e in listeners) == sorted((s, 4) for s in pods)
    assert all(e["value"]["socket_cookie"] > 0 for e in listeners)


def test_counters_are_summed_over_cpus_and_match_the_counters_verb(lab, client):
    a, b = lab.pods
    assert traffic.request(lab, a, b.ip, 80, "/")["status"] == 200
    by_slot = {e["key"]: e["value"] for e in client.maps("mcni_counters_v1")["entries"]}
    slots = {p["pod_name"]: p["slot"] for p in client.list_pods()}
    for pod in client.counters():
        assert by_slot[slots[pod["pod_name"]]] == pod["counters"]
    assert by_slot[slots[a.name]]["outbound_captured"] >= 1


def test_limit_truncates_and_bad_names_are_refused(client):
    from meshcni.agent.client import AgentCallError

    d = client.maps("mcni_pods_v1", limit=1)
    assert len(d["entries"]) == 1 and d["truncated"] is True
    with pytest.raises(AgentCallError) as exc:
        client.maps("mcni_no_such_map")
    assert exc.value.code.name == "NOT_FOUND"
    with pytest.raises(AgentCallError) as exc:
        client.maps("mcni_accepted_origdst_v1")
    assert exc.value.code.name == "INVALID_ARGUMENT" and "socket storage" in exc.value.message


def test_cli_prints_the_table_and_json(lab):
    from meshcni.lab import agent as lab_agent

    argv = [sys.executable, "-m", "meshcni", "maps", "--socket", str(lab_agent.paths(lab)["socket"])]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "mcni_pods_v1" in text and "2/1024" in text and "sockhash" in text
    d = json.loads(subprocess.run(argv + ["mcni_pods_v1", "-o", "json"], capture_output=True, text=True,
                                  timeout=60, check=True).stdout)
    assert len(d["entries"]) == 2
