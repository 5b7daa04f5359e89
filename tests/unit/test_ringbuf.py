"""The ring buffer reader's record walk, on a ring laid out by hand the way the kernel lays it out: the
producer page, then the data pages twice (so a wrapped record reads in one piece). What the kernel writes is
covered by tests/root/test_events.py."""

from __future__ import annotations

import struct

from meshcni.sys.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER_SIZE, consume

PAGE = 64  # any offset works for the walk; the real one is the page size
SIZE = 64  # data size, a power of two


class Ring:
    def __init__(self, start: int = 0):
        self.consumer = bytearray(8)
        self.producer = bytearray(PAGE + 2 * SIZE)
        self.prod = start
        struct.pack_into("<Q", self.consumer, 0, start)

    def write(self, payload: bytes, flags: int = 0) -> None:
        record = struct.pack("<II", len(payload) | flags, 0) + payload
        record += b"\0" * (-len(record) % 8)
        for i, byte in enumerate(record):  # both copies of the data pages, like the double mapping
            at = (self.prod + i) % SIZE
            self.producer[PAGE + at] = byte
            self.producer[PAGE + SIZE + at] = byte
        self.prod += len(record)
        struct.pack_into("<Q", self.producer, 0, self.prod)

    def read(self, limit: int = 0) -> list[bytes]:
        return consume(self.consumer, self.producer, PAGE, SIZE, limit)

    @property
    def cons(self) -> int:
        return struct.unpack_from("<Q", self.consumer, 0)[0]


def test_reads_committed_records_in_order_and_advances_past_them():
    ring = Ring()
    ring.write(b"first")
    ring.write(b"second!!")
    assert ring.read() == [b"first", b"second!!"]
    assert ring.cons == ring.prod == (HEADER_SIZE + 8) + (HEADER_SIZE + 8)
    assert ring.read() == []


def test_a_discarded_record_is_skipped_and_a_busy_one_stops_the_walk():
    ring = Ring()
    ring.write(b"gone", DISCARD_BIT)
    ring.write(b"kept")
    ring.write(b"pending", BUSY_BIT)
    ring.write(b"after")
    assert ring.read() == [b"kept"]
    assert ring.cons == 2 * (HEADER_SIZE + 8)  # stopped at the reserved record, which must not be skipped


def test_a_record_that_wraps_around_the_end_reads_whole():
    ring = Ring(start=SIZE - HEADER_SIZE - 8)  # the header fits before the end, the payload wraps
    ring.write(b"0123456789abcdef")
    assert ring.read() == [b"0123456789abcdef"]


def test_limit_leaves_the_rest_for_the_next_read():
    ring = Ring()
    for word in (b"a", b"b", b"c"):
        ring.write(word)
    assert ring.read(limit=2) == [b"a", b"b"]
    assert ring.read() == [b"c"]
