"""Golden tests for the iptables interceptor's rendering, one file per annotation combination and family.

The golden files are iptables-restore documents (also valid iptables-save text); regenerate them with
`UPDATE_GOLDEN=1 pytest tests/unit/test_iptables_render.py` and review the diff. Structural tests below
check the properties the goldens only show: Istio's rule order, family separation, and the pure
transaction builders that make capture idempotent and release exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshcni.config import Mode, PodConfig
from meshcni.datapath.iptables import (
    OUR_CHAINS,
    build_rules,
    capture_document,
    diff_rules,
    release_document,
    render_rules,
)
from meshcni.sys.iptables import Family, Table, parse_save

GOLDEN_DIR = Path(__file__).parent / "golden" / "iptables"
P = "traffic.sidecar.istio.io/"

CASES = {
    "defaults": {},
    "include-inbound-list": {P + "includeInboundPorts": "9090,8080,15021"},
    "include-inbound-empty": {P + "includeInboundPorts": ""},
    "exclude-inbound": {P + "excludeInboundPorts": "22,3306"},
    "exclude-outbound-ports": {P + "excludeOutboundPorts": "443,22"},
    "include-outbound-ports": {P + "includeOutboundPorts": "5432,6379", P + "includeOutboundIPRanges": ""},
    "include-outbound-cidrs": {P + "includeOutboundIPRanges": "10.96.0.0/12,192.168.0.0/16,fd00:10:96::/112"},
    "exclude-outbound-cidrs": {P + "excludeOutboundIPRanges": "169.254.169.254/32,10.0.0.0/8,fd00::/8"},
    "include-outbound-cidrs-loopback": {P + "includeOutboundIPRanges": "127.1.2.3/32"},
    "inject-false": {"sidecar.istio.io/inject": "false"},
    "mode-off": {"meshcni.io/mode": "off"},
}


def config_for(case: str) -> PodConfig:
    if case == "custom-proxy":
        return PodConfig(mode=Mode.IPTABLES, proxy_uid=2000, proxy_gid=3000, outbound_port=16001, inbound_port=16006)
    return PodConfig.from_annotations(CASES[case], PodConfig(mode=Mode.IPTABLES))


ALL_CASES = sorted(CASES) + ["custom-proxy"]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / f"{name}.golden"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"rendering differs from {path.name}"


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6], ids=["v4", "v6"])
@pytest.mark.parametrize("case", ALL_CASES)
def test_golden(case, family):
    check_golden(f"{case}.v{int(family)}", render_rules(config_for(case), family))


def test_golden_dir_has_no_orphans():
    expected = {f"{case}.v{v}.golden" for case in ALL_CASES for v in (4, 6)}
    assert {p.name for p in GOLDEN_DIR.glob("*.golden")} == expected


@pytest.mark.parametrize("case", ["inject-false", "mode-off"])
def test_no_sidecar_renders_nothing(case):
    assert render_rules(config_for(case), Family.IPV4) == ""
    assert build_rules(config_for(case), Family.IPV6) == []


def _lines(case, family=Family.IPV4):
    return [line for line in render_rules(config_for(case), family).splitlines() if line.startswith("-A ")]


def test_defaults_follow_istio_order():
    lines = _lines("defaults")
    assert lines[0] == "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN"
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in lines
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in lines
    out = [line for line in lines if line.startswith("-A ISTIO_OUTPUT")]
    assert out[0] == "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"
    assert out[-2] == "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"
    assert out[-1] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"
    inbound = [line for line in lines if line.startswith("-A ISTIO_INBOUND")]
    for port in (15020, 15021, 15090):
        assert f"-A ISTIO_INBOUND -p tcp -m tcp --dport {port} -j RETURN" in inbound
    # The catch-all redirect comes after every exclusion.
    assert inbound[-1] == "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"
    assert lines.count("-A PREROUTING -p tcp -j ISTIO_INBOUND") == 1
    assert lines.count("-A OUTPUT -p tcp -j ISTIO_OUTPUT") == 1


def test_owner_rules_cover_app_calling_itself():
    out = _lines("defaults")
    uid = [line for line in out if "uid-owner" in line]
    assert uid == [
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337"
        " -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    ]
    assert len([line for line in out if "gid-owner 1337" in line]) == 3


def test_loopback_include_keeps_app_to_self_capturable():
    out = _lines("include-outbound-cidrs-loopback")
    assert not [line for line in out if "-o lo -m owner !" in line]
    assert out[-1] == "-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT"


def test_exclusion_beats_inclusion_of_the_same_inbound_port():
    inbound = [line for line in _lines("include-inbound-list") if line.startswith("-A ISTIO_INBOUND")]
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in inbound
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 9090 -j ISTIO_IN_REDIRECT" in inbound
    assert not [line for line in inbound if "15021" in line]


def test_empty_inbound_include_has_no_prerouting_jump():
    assert not [line for line in _lines("include-inbound-empty") if line.startswith("-A PREROUTING")]


def test_exclude_outbound_ports_come_before_owner_rules():
    out = [line for line in _lines("exclude-outbound-ports") if line.startswith("-A ISTIO_OUTPUT")]
    assert out[:2] == [
        "-A ISTIO_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
        "-A ISTIO_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
    ]


def test_families_are_separated():
    v4 = render_rules(config_for("exclude-outbound-cidrs"), Family.IPV4)
    v6 = render_rules(config_for("exclude-outbound-cidrs"), Family.IPV6)
    assert "fd00::/8" not in v4 and "10.0.0.0/8" in v4
    assert "fd00::/8" in v6 and "10.0.0.0/8" not in v6 and "127.0.0" not in v6
    assert "-s ::6/128 -o lo -j RETURN" in v6 and "-d ::1/128 -j RETURN" in v6


def test_include_cidrs_of_the_other_family_only_redirect_nothing():
    v4 = _lines("include-outbound-cidrs", Family.IPV4)
    v6 = _lines("include-outbound-cidrs", Family.IPV6)
    assert [line for line in v4 if line.endswith("-j ISTIO_REDIRECT") and "-d" in line] == [
        "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT",
        "-A ISTIO_OUTPUT -d 192.168.0.0/16 -j ISTIO_REDIRECT",
    ]
    assert [line for line in v6 if line.endswith("-j ISTIO_REDIRECT")] == [
        "-A ISTIO_OUTPUT -d fd00:10:96::/112 -j ISTIO_REDIRECT"
    ]


# --- transactions and verification against a parsed live table -----------------------------------------

FOREIGN = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sat Nov 21 10:00:00 2026
*filter
:INPUT ACCEPT [10:600]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:KEEP_ME - [0:0]
-A OUTPUT -d 192.0.2.0/24 -j RETURN
-A POSTROUTING -j KEEP_ME
-A KEEP_ME -o eth9 -j MASQUERADE
COMMIT
# Completed on Sat Nov 21 10:00:00 2026
"""


def live_with_capture(config: PodConfig, extra_jumps: int = 0) -> Table:
    """The nat table as iptables-save would show it after our rules were applied to FOREIGN."""
    table = parse_save(FOREIGN, "nat")
    for rule in build_rules(config, Family.IPV4):
        table.chains.setdefault(rule.chain, "-")
        table.rules.setdefault(rule.chain, []).append(rule.spec)
    for _ in range(extra_jumps):
        table.rules["OUTPUT"].append("-p tcp -j ISTIO_OUTPUT")
    return table


def test_parse_save_reads_chains_and_rules_and_ignores_comments():
    table = parse_save(FOREIGN, "nat")
    assert list(table.chains) == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KEEP_ME"]
    assert table.chains["OUTPUT"] == "ACCEPT" and table.chains["KEEP_ME"] == "-"
    assert table.rules["KEEP_ME"] == ["-o eth9 -j MASQUERADE"]
    assert parse_save(FOREIGN, "filter").rules["INPUT"] == ["-p tcp -m tcp --dport 22 -j ACCEPT"]
    assert parse_save(FOREIGN, "mangle").chains == {}


def test_capture_document_on_a_clean_table_only_adds():
    config = config_for("defaults")
    document = capture_document(config, Family.IPV4, parse_save(FOREIGN, "nat"))
    assert document == render_rules(config, Family.IPV4)
    assert "KEEP_ME" not in document and "192.0.2.0" not in document


def test_capture_document_replaces_every_existing_jump():
    config = config_for("defaults")
    live = live_with_capture(config, extra_jumps=2)
    lines = capture_document(config, Family.IPV4, live).splitlines()
    deletions = [line for line in lines if line.startswith("-D ")]
    assert deletions.count("-D OUTPUT -p tcp -j ISTIO_OUTPUT") == 3
    assert deletions.count("-D PREROUTING -p tcp -j ISTIO_INBOUND") == 1
    # Deletions precede the re-added jumps in the same transaction.
    assert lines.index("-A OUTPUT -p tcp -j ISTIO_OUTPUT") > max(lines.index(d) for d in deletions)
    assert [line for line in lines if line.startswith(":")] == [f":{c} - [0:0]" for c in OUR_CHAINS]


def test_capture_document_for_a_pod_turned_off_is_a_release():
    live = live_with_capture(config_for("defaults"))
    off = config_for("mode-off")
    assert capture_document(off, Family.IPV4, live) == release_document(live)


def test_release_document_removes_only_ours():
    live = live_with_capture(config_for("defaults"), extra_jumps=1)
    lines = release_document(live).splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1:4] == [
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-D OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-D OUTPUT -p tcp -j ISTIO_OUTPUT",
    ]
    flushes = [line for line in lines if line.startswith("-F ")]
    deletes = [line for line in lines if line.startswith("-X ")]
    assert sorted(flushes) == sorted(f"-F {c}" for c in OUR_CHAINS)
    assert sorted(deletes) == sorted(f"-X {c}" for c in OUR_CHAINS)
    assert lines.index(deletes[0]) > lines.index(flushes[-1])
    assert not [line for line in lines if "KEEP_ME" in line or "192.0.2.0" in line]


def test_release_document_is_none_when_nothing_of_ours_exists():
    assert release_document(parse_save(FOREIGN, "nat")) is None


def test_diff_is_empty_when_live_matches():
    config = config_for("exclude-outbound-cidrs")
    assert diff_rules(config, Family.IPV4, live_with_capture(config)) == []


def test_diff_names_missing_and_duplicated_rules():
    config = config_for("defaults")
    live = live_with_capture(config, extra_jumps=1)
    live.rules["ISTIO_OUTPUT"].remove("-m owner --uid-owner 1337 -j RETURN")
    problems = diff_rules(config, Family.IPV4, live)
    assert "IPv4 nat: missing rule '-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN'" in problems
    assert "IPv4 nat: rule '-A OUTPUT -p tcp -j ISTIO_OUTPUT' is present 1 extra time(s)" in problems
    assert len(problems) == 2


def test_diff_notices_wrong_order_and_missing_chain():
    config = config_for("defaults")
    live = live_with_capture(config)
    live.rules["ISTIO_INBOUND"].reverse()
    del live.chains["ISTIO_REDIRECT"]
    problems = diff_rules(config, Family.IPV4, live)
    assert "IPv4 nat: chain ISTIO_INBOUND has the right rules in the wrong order" in problems
    assert "IPv4 nat: chain ISTIO_REDIRECT is missing" in problems


def test_diff_for_a_config_change_lists_both_sides():
    old, new = config_for("defaults"), config_for("exclude-outbound-ports")
    problems = diff_rules(new, Family.IPV4, live_with_capture(old))
    assert problems == [
        "IPv4 nat: missing rule '-A ISTIO_OUTPUT -p tcp -m tcp --dport 22 -j RETURN'",
        "IPv4 nat: missing rule '-A ISTIO_OUTPUT -p tcp -m tcp --dport 443 -j RETURN'",
    ]


def test_diff_when_off_reports_leftovers():
    live = live_with_capture(config_for("defaults"))
    problems = diff_rules(config_for("mode-off"), Family.IPV4, live)
    assert "IPv4 nat: chain ISTIO_OUTPUT exists although capture is off" in problems
    assert "IPv4 nat: unexpected rule '-A OUTPUT -p tcp -j ISTIO_OUTPUT' (capture is off)" in problems
    assert diff_rules(config_for("mode-off"), Family.IPV4, parse_save(FOREIGN, "nat")) == []
