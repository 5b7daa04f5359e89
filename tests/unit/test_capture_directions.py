"""Pure tests of one-direction capture: iptables renders only its half, eBPF sets only its flag."""

from __future__ import annotations

import pytest

from meshcni.config import Mode, PodConfig
from meshcni.datapath import layout as L
from meshcni.datapath.directions import BOTH, NONE, Direction, directions
from meshcni.datapath.ebpf import _pod_struct
from meshcni.datapath.iptables import (
    IN_REDIRECT,
    INBOUND,
    OUR_CHAINS,
    OUTPUT,
    REDIRECT,
    build_rules,
    capture_document,
    chains_for,
    diff_rules,
    render_rules,
)
from meshcni.sys.iptables import Family, parse_save

IN = frozenset({Direction.INBOUND})
OUT = frozenset({Direction.OUTBOUND})
CONFIG = PodConfig(exclude_inbound_ports=(9000,), exclude_outbound_ports=(5432,))


def _live(document: str):
    return parse_save(document, "nat")


def test_both_is_the_default_output():
    for family in Family:
        assert render_rules(CONFIG, family, BOTH) == render_rules(CONFIG, family)
        assert chains_for(BOTH) == OUR_CHAINS


def test_inbound_only_has_prerouting_and_no_output():
    rules = build_rules(CONFIG, Family.IPV4, IN)
    chains = {r.chain for r in rules}
    assert chains == {"PREROUTING", INBOUND, IN_REDIRECT}
    text = render_rules(CONFIG, Family.IPV4, IN)
    assert f":{OUTPUT} " not in text and f":{REDIRECT} " not in text
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in text
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 9000 -j RETURN" in text


def test_outbound_only_has_output_and_no_prerouting():
    rules = build_rules(CONFIG, Family.IPV4, OUT)
    assert {r.chain for r in rules} == {"OUTPUT", OUTPUT, REDIRECT, IN_REDIRECT}
    text = render_rules(CONFIG, Family.IPV4, OUT)
    assert "PREROUTING" not in text and f":{INBOUND} " not in text
    assert "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in text


def test_the_two_halves_make_the_whole_in_order():
    whole = build_rules(CONFIG, Family.IPV4)
    halves = build_rules(CONFIG, Family.IPV4, IN) + build_rules(CONFIG, Family.IPV4, OUT)
    # ISTIO_IN_REDIRECT's one rule is in both halves (outbound's hairpin uses it too)
    assert sorted(set(r.line() for r in halves)) == sorted(r.line() for r in whole)
    assert [r for r in whole if r in halves] == whole


def test_no_direction_or_mode_off_renders_nothing():
    assert build_rules(CONFIG, Family.IPV4, NONE) == []
    assert render_rules(CONFIG.with_mode(Mode.OFF), Family.IPV4, IN) == ""


def test_moving_outbound_away_deletes_its_chains_in_the_same_transaction():
    live = _live(render_rules(CONFIG, Family.IPV4))
    doc = capture_document(CONFIG, Family.IPV4, live, IN).splitlines()
    assert "-D OUTPUT -p tcp -j ISTIO_OUTPUT" in doc
    flushes = [line for line in doc if line.startswith(("-F", "-X"))]
    assert flushes == ["-F ISTIO_REDIRECT", "-F ISTIO_OUTPUT", "-X ISTIO_REDIRECT", "-X ISTIO_OUTPUT"]
    assert f":{OUTPUT} - [0:0]" not in doc


def test_diff_reports_the_other_directions_chain_as_a_leftover():
    live = _live(render_rules(CONFIG, Family.IPV4))
    problems = diff_rules(CONFIG, Family.IPV4, live, IN)
    assert "IPv4 nat: chain ISTIO_OUTPUT exists although that direction is not captured by iptables" in problems
    assert diff_rules(CONFIG, Family.IPV4, _live(render_rules(CONFIG, Family.IPV4, IN)), IN) == []
    assert diff_rules(CONFIG, Family.IPV4, _live(render_rules(CONFIG, Family.IPV4, OUT)), OUT) == []


def test_ebpf_flags_follow_directions():
    def flags(dirs, config=CONFIG):
        return _pod_struct(3, config, False, dirs).flags & (L.F_CAPTURE_OUTBOUND | L.F_CAPTURE_INBOUND)

    assert flags(BOTH) == L.F_CAPTURE_OUTBOUND | L.F_CAPTURE_INBOUND
    assert flags(OUT) == L.F_CAPTURE_OUTBOUND
    assert flags(IN) == L.F_CAPTURE_INBOUND
    assert flags(NONE) == 0
    assert flags(BOTH, CONFIG.with_mode(Mode.IPTABLES)) == 0
    assert bytes(_pod_struct(3, CONFIG, True)) == bytes(_pod_struct(3, CONFIG, True, BOTH))


def test_directions_parse_names_and_reject_others():
    assert directions(["inbound", Direction.OUTBOUND]) == BOTH
    with pytest.raises(ValueError, match="sideways"):
        directions(["sideways"])
