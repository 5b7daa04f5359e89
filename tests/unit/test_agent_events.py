"""The agent's event hub: one tap while anyone watches, every event to every watcher, a cap on watchers, and
a slow watcher losing only its own events, counted.

The tap is a stand-in fed by the test (the kernel's side is tests/root/test_events.py).
"""

from __future__ import annotations

import threading

import pytest

from meshcni.agent import events as hub_mod
from meshcni.agent.core import AgentError
from meshcni.agent.events import EventHub
from meshcni.datapath.events import ConnectionEvent


def event(n: int) -> ConnectionEvent:
    return ConnectionEvent(time_ns=n, slot=0, kind="outbound_captured", reason="", family=4, src="", sport=0,
                           dst="10.0.0.3", dport=80, pid=1, uid=65534, comm="curl")


class FakeTap:
    opened: list["FakeTap"] = []

    def __init__(self, pin_dir):
        self.pending: list[list[ConnectionEvent]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.kernel_lost = 0
        FakeTap.opened.append(self)

    def feed(self, batch):
        with self.cond:
            self.pending.append(batch)
            self.cond.notify_all()

    def read(self, timeout=0.0, limit=0):
        with self.cond:
            if not self.pending:
                self.cond.wait(timeout)
            return self.pending.pop(0) if self.pending else []

    def lost(self):
        return self.kernel_lost

    def close(self):
        self.closed = True


@pytest.fixture
def hub(monkeypatch, tmp_path):
    FakeTap.opened = []
    monkeypatch.setattr(hub_mod, "EventTap", FakeTap)
    monkeypatch.setattr(hub_mod.events, "switch_off", lambda pin_dir: None)
    monkeypatch.setattr(hub_mod, "READ_WAIT_S", 0.01)
    h = EventHub(tmp_path)
    yield h
    h.close()


def drain(watcher, want: int) -> list[ConnectionEvent]:
    got: list[ConnectionEvent] = []
    for _ in range(want + 200):  # bounded: each wait returns at the latest after its timeout
        if len(got) >= want:
            break
        got += watcher.next_batch(timeout=0.01)
    return got


def test_every_watcher_gets_every_event_from_one_tap(hub):
    first, second = hub.watch(), hub.watch()
    assert len(FakeTap.opened) == 1
    FakeTap.opened[0].feed([event(1), event(2)])
    FakeTap.opened[0].feed([event(3)])
    assert [e.time_ns for e in drain(first, 3)] == [1, 2, 3]
    assert [e.time_ns for e in drain(second, 3)] == [1, 2, 3]


def test_the_last_watcher_to_leave_closes_the_tap_and_the_next_one_opens_a_new_one(hub):
    first, second = hub.watch(), hub.watch()
    tap = FakeTap.opened[0]
    first.close()
    assert not tap.closed
    second.close()
    second.close()  # leaving twice is harmless
    assert tap.closed and hub.watching == 0
    hub.watch()
    assert len(FakeTap.opened) == 2 and not FakeTap.opened[1].closed


def test_watchers_are_capped(hub):
    for _ in range(hub_mod.MAX_WATCHERS):
        hub.watch()
    with pytest.raises(AgentError) as exc:
        hub.watch()
    assert exc.value.kind == "exhausted" and exc.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_a_slow_watcher_loses_only_its_own_events_and_is_told_how_many(hub, monkeypatch):
    monkeypatch.setattr(hub_mod, "QUEUE_BATCHES", 8)
    slow, fast = hub.watch(), hub.watch()
    for n in range(hub_mod.QUEUE_BATCHES + 5):
        FakeTap.opened[0].feed([event(n)])
        assert drain(fast, 1)[0].time_ns == n  # keeps up
    assert len(drain(slow, hub_mod.QUEUE_BATCHES)) == hub_mod.QUEUE_BATCHES
    assert slow.dropped == 5 and fast.dropped == 0
    FakeTap.opened[0].kernel_lost = 7  # the kernel's full-ring drops count for everyone watching
    assert (slow.dropped, fast.dropped) == (12, 7)


def test_without_an_ebpf_datapath_watching_is_refused():
    with pytest.raises(AgentError) as exc:
        EventHub(None).watch()
    assert exc.value.grpc_code == "FAILED_PRECONDITION"
