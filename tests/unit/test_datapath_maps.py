"""How `meshcni maps` turns the datapath's ctypes layouts into plain values (the maps themselves: the root
test tests/root/test_maps.py)."""

from __future__ import annotations

import pytest

from meshcni.datapath import layout as L
from meshcni.datapath import maps


def test_addresses_become_text_and_structures_dicts_without_padding():
    t = L.Tuple(netns=7, local=L.Ip.of("10.0.0.2"), remote=L.Ip.of("fd00::5"), local_port=80, remote_port=40000)
    assert maps.plain(t) == {"netns": 7, "local": "10.0.0.2", "remote": "fd00::5", "local_port": 80,
                             "remote_port": 40000}
    assert maps.plain(L.U32(5)) == 5


def test_every_spec_names_a_v1_map_once():
    names = [spec.name for spec in maps.SPECS]
    assert len(names) == len(set(names))
    assert all(n.startswith("mcni_") and n.endswith("_v1") for n in names)


def test_unknown_and_unlistable_maps_are_refused_before_touching_the_kernel(tmp_path):
    with pytest.raises(KeyError, match="no datapath map 'mcni_nope_v1'"):
        maps.entries(tmp_path, "mcni_nope_v1")
    with pytest.raises(ValueError, match="cannot be listed from user space"):
        maps.entries(tmp_path, "mcni_stays_on_tcp_v1")
