"""Pure tests (no root needed) of the lab's renderers and parsers: conflist, CNI result, HAProxy config and
`show stat`, payload. They live beside the lab's root tests because the lab's test files are kept together;
they carry no `root` mark and run anywhere.
"""

from __future__ import annotations

import pytest

from meshcni.lab import cni, haproxy, nginx
from meshcni.lab.payload import BLOCK, payload
from meshcni.lab.state import LabError, LabNames, check_name

SHOW_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,status,\n"
    "outbound,FRONTEND,,,0,1,4096,3,630,1200,OPEN,\n"
    "outbound_http,orig,0,0,0,1,,2,420,800,no check,\n"
    "outbound_http,BACKEND,0,0,0,1,410,2,420,800,UP,\n"
    "inbound,FRONTEND,,,0,0,4096,0,0,0,OPEN,\n"
    "\n"
)


def test_show_stat_is_parsed_into_frontend_and_backend_session_totals():
    rows = haproxy.parse_show_stat(SHOW_STAT)
    assert len(rows) == 4
    assert haproxy.frontend_sessions(rows) == {"outbound": 3, "inbound": 0}
    assert haproxy.backend_sessions(rows) == {"outbound_http": 2}


def test_show_stat_without_its_header_is_an_error():
    with pytest.raises(LabError, match="unexpected"):
        haproxy.parse_show_stat("Unknown command\n")


def test_conflist_is_bridge_then_loopback_and_chaining_appends():
    c = cni.build_conflist("n", "mcnilab7", "10.233.7.0/24", "/s/ipam", extra=[{"type": "meshcni"}])
    assert [p["type"] for p in c["plugins"]] == ["bridge", "loopback", "meshcni"]
    bridge = c["plugins"][0]
    assert (bridge["isGateway"], bridge["ipMasq"], bridge["hairpinMode"]) == (True, False, True)
    assert bridge["ipam"]["dataDir"] == "/s/ipam"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.233.7.0/24", "gateway": "10.233.7.1"}]]


def test_pod_address_takes_the_sandbox_interface_not_the_bridge():
    result = {
        "interfaces": [{"name": "mcnilab7"}, {"name": "veth1"}, {"name": "eth0", "mac": "m", "sandbox": "/n"}],
        "ips": [{"interface": 0, "address": "10.233.7.1/24"}, {"interface": 2, "address": "10.233.7.5/24"}],
    }
    assert cni.pod_address(result) == ("10.233.7.5", "m")
    with pytest.raises(LabError):
        cni.pod_address({"interfaces": result["interfaces"], "ips": result["ips"][:1]})


def test_haproxy_config_routes_app_ports_to_http_and_the_rest_to_tcp():
    from pathlib import Path

    text = haproxy.render(haproxy.ProxySpec("a", "10.0.0.3", (80, 8080), Path("/s/a.sock")))
    assert "use_backend outbound_http if { dst_port 80 8080 }" in text
    assert "use_backend inbound_http if { dst_port 80 8080 }" in text
    assert text.count("server orig 0.0.0.0 source 127.0.0.6") == 2
    assert "server peer 10.0.0.3:15106" in text and "stats socket /s/a.sock" in text
    tcp_only = haproxy.render(haproxy.ProxySpec("a", "10.0.0.3", (), Path("/s/a.sock")))
    # without app ports the capture listeners stay raw TCP (only the benchmark's routed listeners route)
    assert "use_backend outbound_http" not in tcp_only and "use_backend inbound_http" not in tcp_only
    assert "use_backend routed_out_http if { dst_port 15103 }" in tcp_only


def test_tcp_mode_listeners_on_the_request_path_delay_the_ack_of_the_request_like_http_ones():
    from pathlib import Path

    text = haproxy.render(haproxy.ProxySpec("a", "10.0.0.3", (80,), Path("/s/a.sock")))
    for frontend in ("outbound", "inbound", "routed_out", "routed_in"):
        body = text.split(f"\nfrontend {frontend}\n", 1)[1].split("\n\n", 1)[0]
        assert "mode tcp" in body and "option tcp-smart-accept" in body, frontend


def test_nginx_config_keeps_every_path_under_the_pod_dir():
    from pathlib import Path

    text = nginx.render("b", "10.0.0.3", Path("/lab/pods/b"))
    file_directives = ("pid", "error_log", "root") + tuple(f"{t}_temp_path" for t in nginx.TEMP_DIRS)
    paths = [ln.split()[1].rstrip(";") for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in file_directives]
    assert len(paths) == len(file_directives)
    assert all(p.startswith("/lab/pods/b/") for p in paths)
    assert "daemon off;" in text and 'return 200 "pod=b ip=10.0.0.3 peer=$remote_addr\\n";' in text


def test_payload_is_deterministic_prefix_stable_and_never_repeats_a_block():
    big = payload(4096)
    assert payload(100) == big[:100] and len(payload(1 << 20)) == 1 << 20
    blocks = {big[i : i + BLOCK] for i in range(0, len(big), BLOCK)}
    assert len(blocks) == len(big) // BLOCK


@pytest.mark.parametrize("name", ["", "-x", "x-", "Upper", "a" * 33, "a_b"])
def test_bad_lab_names_are_rejected(name):
    with pytest.raises(LabError):
        check_name(name)


def test_names_derived_from_the_lab_name():
    n = LabNames("demo")
    assert (n.netns(1), n.pod(1), n.cgroup_dir, n.bridge(42)) == ("mcni-lab-demo-1", "b", "meshcni-lab-demo", "mcnilab42")
    assert len(n.bridge(255)) <= 15  # IFNAMSIZ - 1
