"""RawMap's scans against real kernel maps: batch lookups across several batches return exactly what was
written (keys, values, no duplicates), for the hash maps the datapath sweeps on release, the per-CPU array
the counters live in and a SOCKMAP (no batch lookup: key by key). The maps are anonymous: closing the fd frees
them, nothing is pinned; the SOCKMAP's sockets only listen on loopback."""

from __future__ import annotations

import ctypes
import os
import socket

import pytest

from meshcni.preflight import rawbpf
from meshcni.sys import bpf

pytestmark = pytest.mark.root

MAP_HASH, MAP_PERCPU_ARRAY, MAP_SOCKMAP = 1, 6, 15


class Key(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("port", ctypes.c_uint16), ("dir", ctypes.c_uint8), ("_pad", ctypes.c_uint8)]


@pytest.fixture
def hash_map():
    fd = rawbpf.map_create(MAP_HASH, ctypes.sizeof(Key), 4, 4096, name="mcni_t_hash")
    m = bpf.RawMap(fd, "mcni_t_hash", Key, ctypes.c_uint32)
    try:
        yield m
    finally:
        m.close()


def test_a_scan_over_several_batches_returns_every_entry_once(hash_map):
    written = {(slot, port): slot * 100_000 + port for slot in range(100) for port in (80, 443, 15020, 15021, 9000,
                                                                                     8080, 15090)}
    assert len(written) > 2 * bpf._BATCH  # more than one batch, and a last partial one
    for (slot, port), value in written.items():
        hash_map.update(Key(slot=slot, port=port, dir=1), ctypes.c_uint32(value))
    items = hash_map.items()
    got = {(k.slot, k.port): v.value for k, v in items}
    assert len(items) == len(written) and got == written
    assert sorted((k.slot, k.port) for k in hash_map.keys()) == sorted(written)


def test_an_empty_map_scans_to_nothing(hash_map):
    assert hash_map.items() == [] and hash_map.keys() == []


def test_deleting_one_slots_entries_by_scan_leaves_the_others(hash_map):
    for slot in range(3):
        for port in range(200):
            hash_map.update(Key(slot=slot, port=port, dir=0), ctypes.c_uint32(port))
    for key in hash_map.keys():
        if key.slot == 1:
            hash_map.delete(key)
    assert sorted({k.slot for k in hash_map.keys()}) == [0, 2]
    assert len(hash_map.items()) == 400


def test_delete_where_sweeps_one_slot_across_batches_by_key_or_by_value(hash_map):
    for slot in range(4):
        for port in range(300):  # 1,200 entries: five batches
            hash_map.update(Key(slot=slot, port=port, dir=0), ctypes.c_uint32(slot))
    slot2 = bytes(ctypes.c_uint32(2))
    assert hash_map.delete_where(lambda key, _v: key[:4] == slot2) == 300
    assert hash_map.delete_where(lambda _k, value: value == bytes(ctypes.c_uint32(3))) == 300
    assert hash_map.delete_where(lambda key, _v: key[:4] == slot2) == 0
    assert sorted({k.slot for k in hash_map.keys()}) == [0, 1]
    assert len(hash_map.items()) == 600


def test_delete_where_works_on_a_map_type_without_batch_lookups():
    """A SOCKMAP (the listeners map) has no batch lookup: the scan goes key by key and skips empty indexes."""
    fd = rawbpf.map_create(MAP_SOCKMAP, 4, 8, 8, name="mcni_t_sockmap")
    m = bpf.RawMap(fd, "mcni_t_sockmap", ctypes.c_uint32, ctypes.c_uint64)
    listeners = []
    try:
        for index in (1, 3, 6):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            listeners.append(s)
            m.update(ctypes.c_uint32(index), ctypes.c_uint64(s.fileno()))
        assert sorted(k.value for k, _cookie in m.items()) == [1, 3, 6]  # empty indexes are skipped
        assert m.delete_where(lambda key, _cookie: key == bytes(ctypes.c_uint32(3))) == 1
        assert sorted(k.value for k, _cookie in m.items()) == [1, 6]
    finally:
        m.close()
        for s in listeners:
            s.close()


def test_per_cpu_values_come_back_per_cpu():
    ncpu = os.cpu_count() or 1
    value_type = ctypes.c_uint64 * ncpu
    fd = rawbpf.map_create(MAP_PERCPU_ARRAY, 4, 8, 300, name="mcni_t_pcpu")
    m = bpf.RawMap(fd, "mcni_t_pcpu", ctypes.c_uint32, value_type)
    try:
        m.update(ctypes.c_uint32(257), value_type(*[7 + c for c in range(ncpu)]))
        items = m.items()
        assert len(items) == 300  # an array has every index
        by_key = {k.value: list(v) for k, v in items}
        assert by_key[257] == [7 + c for c in range(ncpu)] and by_key[3] == [0] * ncpu
    finally:
        m.close()
