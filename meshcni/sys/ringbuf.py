"""A consumer for a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF, Linux 5.8+) by mmap, without libbpf or bcc.

The kernel exposes the ring as three regions of the map fd: a consumer page the reader writes its position
to, a producer page the kernel writes its position to, and the data pages, mapped twice back to back so a
record that wraps around the end can be read in one piece. Each record starts with an 8-byte header: its
length, whose top bit says the producer has reserved but not yet committed it (stop and wait) and whose next
bit says it was discarded (skip it), and a page offset only the kernel uses. Records are 8-byte aligned.
The reader advances the consumer position only past what it has read, so a record the kernel is still
writing is never seen half-done. epoll on the map fd wakes the reader when records arrive; the ring is
single-consumer, so one process must own it (the agent) and fan records out to whoever asks.
"""

from __future__ import annotations

import mmap
import select
import struct

from meshcni.sys import bpf

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def consume(consumer: memoryview | bytearray, producer: memoryview | bytes, data_offset: int, size: int,
            limit: int = 0) -> list[bytes]:
    """Read the committed records between the consumer and producer positions, advancing the consumer
    position past each one; at most `limit` records when `limit` > 0.

    `consumer` is the consumer page (writable), `producer` the producer page followed by the data pages
    mapped twice, the data starting at `data_offset`; `size` is the data size, a power of two.
    """
    mask = size - 1
    cons = _U64.unpack_from(consumer, 0)[0]
    prod = _U64.unpack_from(producer, 0)[0]
    records: list[bytes] = []
    while cons < prod:
        at = data_offset + (cons & mask)
        length = _U32.unpack_from(producer, at)[0]
        if length & BUSY_BIT:
            break  # reserved, not yet committed: everything after it waits too
        body = length & ~(BUSY_BIT | DISCARD_BIT)
        if not length & DISCARD_BIT:
            records.append(bytes(producer[at + HEADER_SIZE:at + HEADER_SIZE + body]))
        cons += (body + HEADER_SIZE + 7) & ~7
        _U64.pack_into(consumer, 0, cons)  # the kernel may reuse the space from here on
        if limit and len(records) >= limit:
            break
    return records


class RingBuffer:
    """The single consumer of one ring buffer map, given its fd (which stays the caller's)."""

    def __init__(self, map_fd: int):
        info = bpf.map_info(map_fd)
        if info.type != bpf.MAP_RINGBUF:
            raise ValueError(f"map {info.name.decode()!r} is not a ring buffer (type {info.type})")
        self.size = info.max_entries
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=page)
        except BaseException:
            self._consumer.close()
            raise
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def poll(self, timeout: float, limit: int = 0) -> list[bytes]:
        """Records available now, or the first ones to arrive within `timeout` seconds (none on timeout)."""
        records = self.read(limit)
        if records or timeout <= 0:
            return records
        self._epoll.poll(timeout)
        return self.read(limit)

    def read(self, limit: int = 0) -> list[bytes]:
        return consume(self._consumer, self._producer, mmap.PAGESIZE, self.size, limit)

    def pending_bytes(self) -> int:
        """How far the producer is ahead of this consumer (records written and not yet read, with headers)."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def close(self) -> None:
        self._epoll.close()
        self._producer.close()
        self._consumer.close()

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def positions(map_fd: int) -> tuple[int, int]:
    """(consumer, producer) positions of a ring buffer, read without consuming (for tests and debugging)."""
    page = mmap.PAGESIZE
    with mmap.mmap(map_fd, 2 * page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as m:
        return _U64.unpack_from(m, 0)[0], _U64.unpack_from(m, page)[0]

