"""bench/capture_profile.py's arithmetic: perf's report parsed into samples per function, functions put in
the right group, samples turned into CPU µs per request, and the differences ranked, so a published
breakdown cannot come from a misread report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import capture_profile as cp  # noqa: E402

REPORT = """\
# Total Lost Samples: 0
#
# Samples: 9K of event 'cpu-clock:ppp'
# Event count (approx.): 4502251125
#
# Overhead       Samples  Symbol
# ........  ............  ..........................................
#
    40.00%          4000  [k] pv_native_safe_halt
    10.00%          1000  [.] process_stream
     5.00%           500  [k] tcp_v4_rcv
     2.00%           200  [k] htab_lru_map_update_elem
     1.00%           100  [k] bpf_prog_43f58421989abb84_mcni_sockops
     1.00%           100  [k] sk_psock_init
     1.00%           100  [k] _raw_spin_lock_bh
     0.50%            50  [k] lookup_nulls_elem_raw
     0.01%             1  [.] 0x00007f3b54082df0

"""


def test_the_report_becomes_samples_per_function_marked_kernel_or_user():
    samples = cp.parse_report(REPORT)
    assert samples["[k] pv_native_safe_halt"] == 4000
    assert samples["[.] process_stream"] == 1000
    assert samples["[k] bpf_prog_43f58421989abb84_mcni_sockops"] == 100
    assert samples["[.] 0x00007f3b54082df0"] == 1  # an unresolved user address is still user time
    assert sum(samples.values()) == 6051  # the header and blank lines count nothing


@pytest.mark.parametrize("function, group", [
    ("[k] pv_native_safe_halt", "idle"),
    ("[k] default_idle_call", "idle"),
    ("[.] process_stream", "user"),
    ("[.] bpf_looking_user_symbol", "user"),  # user space never counts as capture, whatever its name
    ("[k] htab_lru_map_update_elem", "capture"),
    ("[k] bpf_prog_8036499a2bfca803_mcni_sk_lookup", "capture"),
    ("[k] __cgroup_bpf_run_filter_sock_ops", "capture"),
    ("[k] sk_psock_destroy", "capture"),
    ("[k] tcp_bpf_sendmsg", "capture"),
    ("[k] sock_hash_lookup_elem_raw", "capture"),
    ("[k] lookup_nulls_elem_raw", "capture"),
    ("[k] tcp_v4_rcv", "network stack"),
    ("[k] veth_xmit", "network stack"),
    ("[k] br_nf_pre_routing", "network stack"),
    ("[k] _raw_spin_lock_bh", "kernel other"),
    ("[k] finish_task_switch.isra.0", "kernel other"),
    ("[k] bpf_inode_storage_free", "kernel other"),  # runs for every inode, meshcni loaded or not
    ("[k] __bpf_prog_enter_recur", "kernel other"),
    ("[k] kmem_cache_alloc_lru_noprof", "kernel other"),  # the slab's list_lru, not a BPF LRU map
    ("[k] bpf_lru_pop_free", "capture"),
])
def test_functions_fall_in_their_group(function, group):
    assert cp.group_of(function) == group


def test_samples_become_cpu_microseconds_per_request_by_group():
    us = cp.per_request(cp.parse_report(REPORT), requests=1000, frequency=1000)
    # 1 sample at 1000 Hz is 1 ms of one CPU; over 1000 requests, 1 µs per request
    assert us["[k] tcp_v4_rcv"] == pytest.approx(500.0)
    groups = cp.summarize(us)
    assert groups["idle"] == pytest.approx(4000.0)
    assert groups["capture"] == pytest.approx(450.0)  # lru update, program, psock, hash bucket walk
    assert groups["user"] == pytest.approx(1001.0)
    assert groups["network stack"] == pytest.approx(500.0)
    assert groups["kernel other"] == pytest.approx(100.0)
    assert groups["busy"] == pytest.approx(2051.0)  # everything but idle
    with pytest.raises(cp.ProfileError):
        cp.per_request(cp.parse_report(REPORT), requests=0, frequency=1000)


def test_differences_rank_by_size_either_way_and_leave_idle_out():
    base = {"[k] pv_native_safe_halt": 10.0, "[k] tcp_v4_rcv": 5.0, "[k] sk_alloc": 1.0}
    other = {"[k] pv_native_safe_halt": 99.0, "[k] tcp_v4_rcv": 2.0, "[k] sk_psock_init": 1.5, "[k] sk_alloc": 1.1}
    rows = cp.difference(base, other, top=2)
    assert rows == [("[k] tcp_v4_rcv", 5.0, 2.0), ("[k] sk_psock_init", 0.0, 1.5)]
