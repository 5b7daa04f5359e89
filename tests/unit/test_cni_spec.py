"""Version negotiation and result conversion between every pair of supported CNI versions."""

from __future__ import annotations

import itertools

import pytest

from meshcni.cni import spec
from meshcni.cni.spec import CniError

V = spec.SUPPORTED_VERSIONS
LEGACY = ("0.3.1", "0.4.0")


def sample(version: str) -> dict:
    """A dual-stack bridge-like result in the exact layout of `version`, including 1.1-only fields."""
    legacy = version in LEGACY
    ifaces = [
        {"name": "mcnitest0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/run/netns/p"},
    ]
    routes = [{"dst": "0.0.0.0/0", "gw": "10.239.0.1"}]
    if version == "1.1.0":
        ifaces[1].update(mtu=1450, socketPath="/run/x.sock", pciID="0000:00:1f.6")
        routes[0].update(mtu=1400, advmss=1360, priority=10, table=100, scope=0)
    ips = [
        {"interface": 1, "address": "10.239.0.7/24", "gateway": "10.239.0.1"},
        {"interface": 1, "address": "fd00:239::7/64", "gateway": "fd00:239::1"},
    ]
    if legacy:
        ips[0] = {"version": "4", **ips[0]}
        ips[1] = {"version": "6", **ips[1]}
    out = {"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes,
           "dns": {"nameservers": ["10.239.0.53"], "search": ["svc.local"]}}
    return out


@pytest.mark.parametrize("src,dst", list(itertools.product(V, V)))
def test_convert_every_pair(src: str, dst: str) -> None:
    out = spec.convert_result(sample(src), dst)
    assert out["cniVersion"] == dst
    addresses = [ip["address"] for ip in out["ips"]]
    assert addresses == ["10.239.0.7/24", "fd00:239::7/64"]
    assert [ip["gateway"] for ip in out["ips"]] == ["10.239.0.1", "fd00:239::1"]
    assert all(ip["interface"] == 1 for ip in out["ips"])
    if dst in LEGACY:
        assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in out["ips"])
    eth0 = out["interfaces"][1]
    assert eth0["sandbox"] == "/run/netns/p"
    both_new = src == "1.1.0" and dst == "1.1.0"
    assert ("mtu" in eth0) == both_new
    assert ("socketPath" in eth0) == both_new
    assert ("advmss" in out["routes"][0]) == both_new
    assert out["routes"][0]["gw"] == "10.239.0.1"
    assert out["dns"]["nameservers"] == ["10.239.0.53"]


@pytest.mark.parametrize("version", V)
def test_same_version_round_trip_is_identity(version: str) -> None:
    original = sample(version)
    assert spec.convert_result(original, version) == original


@pytest.mark.parametrize("a,b", list(itertools.permutations(V, 2)))
def test_there_and_back_keeps_the_common_fields(a: str, b: str) -> None:
    back = spec.convert_result(spec.convert_result(sample(a), b), a)
    expected = spec.convert_result(sample(a), a)
    if a == "1.1.0":
        # 1.1-only fields cannot survive a trip through an older version.
        for iface in expected["interfaces"]:
            for k in ("mtu", "socketPath", "pciID"):
                iface.pop(k, None)
        for r in expected["routes"]:
            for k in ("mtu", "advmss", "priority", "table", "scope"):
                r.pop(k, None)
    assert back == expected


def test_legacy_result_always_has_dns_and_new_result_omits_empty_dns() -> None:
    minimal = {"ips": [{"address": "10.0.0.2/24"}]}
    assert spec.convert_result(minimal, "0.4.0") == {
        "cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}], "dns": {}}
    assert spec.convert_result(minimal, "1.0.0") == {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}


@pytest.mark.parametrize(
    "bad,code",
    [
        ({"ips": [{"version": "6", "address": "10.0.0.2/24"}]}, 7),  # family mismatch
        ({"ips": [{"address": "not-an-ip"}]}, 7),
        ({"ips": [{"address": "10.0.0.2/24", "interface": 3}]}, 7),  # index past interfaces
        ({"ips": "10.0.0.2/24"}, 7),
        ({"interfaces": [{"mac": "x"}]}, 7),
        ({"routes": [{"gw": "1.1.1.1"}]}, 7),
        ({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}, 1),
        ([], 7),
    ],
)
def test_invalid_results_are_rejected_with_a_code(bad: object, code: int) -> None:
    with pytest.raises(CniError) as info:
        spec.normalize_result(bad)
    assert info.value.code == code


def test_version_info_echoes_supported_request_else_latest() -> None:
    assert spec.version_info("0.4.0") == {"cniVersion": "0.4.0", "supportedVersions": list(V)}
    assert spec.version_info("0.2.0")["cniVersion"] == spec.LATEST
    assert spec.version_info(None)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(
    "requested,offered,expected",
    [
        ("1.1.0", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"], "1.0.0"),  # Debian 12's plugins
        ("1.0.0", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"], "1.0.0"),
        ("0.4.0", ["0.3.0", "1.0.0"], "0.3.0"),
        ("0.3.1", ["0.1.0", "0.2.0"], None),
    ],
)
def test_highest_common_version(requested: str, offered: list[str], expected: str | None) -> None:
    assert spec.highest_common(requested, offered) == expected


@pytest.mark.parametrize("text", ["1.0", "1.0.0.0", "a.b.c", "", "1..0"])
def test_parse_version_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        spec.parse_version(text)


def test_require_supported() -> None:
    spec.require_supported("1.1.0")
    with pytest.raises(CniError) as info:
        spec.require_supported("0.3.0")
    assert info.value.code == spec.ERR_INCOMPATIBLE_VERSION
