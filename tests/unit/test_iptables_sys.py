"""Unit tests for the iptables system layer (tool names, backend choice, restore error messages) and the
netns path checks it relies on. Nothing here changes the machine."""

from __future__ import annotations

import pytest

from meshcni.sys import iptables as ipt
from meshcni.sys.errors import NamespaceNotFound
from meshcni.sys.iptables import Backend, Family
from meshcni.sys.netns import check_netns, nsenter_argv, run_in_netns


def test_tool_names_match_debian_executables():
    assert ipt.tool(Backend.NFT, Family.IPV4, "restore") == "iptables-nft-restore"
    assert ipt.tool(Backend.LEGACY, Family.IPV6, "save") == "ip6tables-legacy-save"
    assert ipt.tool("nft", Family.IPV6, "restore") == "ip6tables-nft-restore"


@pytest.mark.parametrize(
    "nft,legacy,expected",
    [(0, 0, Backend.NFT), (5, 0, Backend.NFT), (0, 3, Backend.LEGACY), (4, 4, Backend.NFT), (2, 9, Backend.LEGACY)],
)
def test_choose_backend_prefers_the_one_holding_more_rules(nft, legacy, expected):
    assert ipt.choose_backend(nft, legacy) is expected


def test_count_rules_counts_appends_only():
    text = "*nat\n:OUTPUT ACCEPT [0:0]\n:X - [0:0]\n-A OUTPUT -j X\n-A X -j RETURN\nCOMMIT\n# -A comment\n"
    assert ipt.count_rules(text) == 2


def test_override_and_environment_win_over_detection(monkeypatch):
    monkeypatch.setenv(ipt.BACKEND_ENV, "legacy")
    assert ipt.detect_backend() is Backend.LEGACY
    assert ipt.detect_backend("NFT") is Backend.NFT


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(ipt.BACKEND_ENV, raising=False)
    with pytest.raises(ipt.IptablesError, match="'xtables' is not one of nft, legacy"):
        ipt.detect_backend("xtables")


@pytest.mark.parametrize(
    "spec,target",
    [
        ("-p tcp -j ISTIO_OUTPUT", "ISTIO_OUTPUT"),
        ("-o lo -m owner ! --uid-owner 1337 -j RETURN", "RETURN"),
        ("-g ISTIO_INBOUND", "ISTIO_INBOUND"),
        ("-p tcp -m tcp --dport 22", None),
        ("-p tcp -j REDIRECT --to-ports 15001", "REDIRECT"),
    ],
)
def test_rule_target(spec, target):
    assert ipt.rule_target(spec) == target


def test_restore_error_names_the_offending_input_line():
    stderr = (
        "iptables-restore v1.8.9 (legacy): Couldn't load target `ISTIO_X':No such file or directory\n\n"
        "Error occurred at line: 2\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n"
    )
    message = ipt._explain(stderr, "*nat\n-D OUTPUT -p tcp -j ISTIO_X\nCOMMIT\n")
    assert message.startswith("iptables-restore v1.8.9 (legacy): Couldn't load target `ISTIO_X'")
    assert message.endswith("(input line 2: '-D OUTPUT -p tcp -j ISTIO_X')")


def test_jumps_to_finds_jumps_from_any_foreign_chain():
    table = ipt.parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:MINE - [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A MINE -g ISTIO_OUTPUT\n-A MINE -j RETURN\n"
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n",
        "nat",
    )
    assert table.jumps_to({"ISTIO_OUTPUT", "ISTIO_REDIRECT"}) == [
        ("OUTPUT", "-p tcp -j ISTIO_OUTPUT"),
        ("MINE", "-g ISTIO_OUTPUT"),
    ]


@pytest.mark.parametrize("path", ["/nonexistent/netns", "/etc/hostname", "/proc/self/ns/mnt"])
def test_check_netns_rejects_what_is_not_a_netns(path):
    with pytest.raises(NamespaceNotFound):
        check_netns(path)


def test_check_netns_accepts_our_own_netns():
    check_netns("/proc/self/ns/net")


def test_run_in_missing_netns_is_namespace_not_found():
    with pytest.raises(NamespaceNotFound, match="does not exist"):
        run_in_netns("/var/run/netns/mcni-does-not-exist", ["true"])


def test_nsenter_argv_sets_ids_after_entering():
    assert nsenter_argv("/run/netns/a", ["id", "-u"], uid=1000, gid=1001) == [
        "nsenter", "--net=/run/netns/a", "--setgid=1001", "--setuid=1000", "--", "id", "-u",
    ]
