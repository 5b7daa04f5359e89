"""Fan-out of the datapath's connection events to the agent's watchers (`meshcni events`, WatchEvents).

The kernel's event ring has a single reader, and the hub is it. The first watcher opens the tap, which turns
events on in the kernel, and starts one reader thread; every event goes to each watcher's bounded queue;
the last watcher to leave stops the thread and closes the tap, which turns events off again, so a node
nobody watches pays nothing for the feature. A watcher that falls behind loses events from its own queue
only, and is told how many it missed, together with those the kernel dropped on a full ring. Watchers are
capped (MAX_WATCHERS): each holds one of the gRPC server's worker threads for as long as it stays.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from meshcni.agent.core import AgentError
from meshcni.datapath import events
from meshcni.datapath.events import ConnectionEvent, EventTap
from meshcni.sys.errors import BpfError

log = logging.getLogger("meshcni.agent")

MAX_WATCHERS = 4
QUEUE_BATCHES = 1024  # batches a watcher may fall behind by before its own events are dropped
READ_WAIT_S = 0.2  # how long the reader thread blocks in epoll before it checks whether to stop


class Watcher:
    """One watcher's view: batches of events in arrival order, and how many it missed."""

    def __init__(self, hub: "EventHub"):
        self._hub = hub
        self._batches: queue.Queue[list[ConnectionEvent]] = queue.Queue(QUEUE_BATCHES)
        self.missed = 0  # batches dropped here are counted by event

    def _offer(self, batch: list[ConnectionEvent]) -> None:
        try:
            self._batches.put_nowait(batch)
        except queue.Full:
            self.missed += len(batch)

    def next_batch(self, timeout: float) -> list[ConnectionEvent]:
        """The next events, or [] when none arrived within `timeout` seconds."""
        try:
            return self._batches.get(timeout=timeout)
        except queue.Empty:
            return []

    @property
    def dropped(self) -> int:
        """Events this watcher did not get: its own overflow plus the kernel's full-ring drops since it came."""
        return self.missed + self._hub.kernel_dropped_since(self)

    def close(self) -> None:
        self._hub.leave(self)


class EventHub:
    """Owns the event tap of one pinned datapath while anyone watches."""

    def __init__(self, pin_dir: str | Path | None):
        self.pin_dir = Path(pin_dir) if pin_dir else None
        self._lock = threading.Lock()
        self._watchers: dict[Watcher, int] = {}  # watcher -> the kernel's drop count when it came
        self._tap: EventTap | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        if self.pin_dir is not None:
            try:
                events.switch_off(self.pin_dir)  # a reader that died with an earlier agent left them on
            except BpfError as exc:
                log.warning("connection events unavailable: %s", exc)

    def watch(self) -> Watcher:
        if self.pin_dir is None:
            raise AgentError("precondition", "connection events come from the eBPF datapath, which is not loaded "
                                             "on this node")
        with self._lock:
            if len(self._watchers) >= MAX_WATCHERS:
                raise AgentError("exhausted", f"{MAX_WATCHERS} watchers already; try again when one leaves")
            if self._tap is None:
                try:
                    self._tap = EventTap(self.pin_dir)
                except BpfError as exc:
                    raise AgentError("precondition", f"the datapath has no event ring ({exc}); restart the agent "
                                                     f"to load programs that have one") from exc
                self._stop.clear()
                self._reader = threading.Thread(target=self._read, args=(self._tap,), name="events",
                                                daemon=True)
                self._reader.start()
            watcher = Watcher(self)
            self._watchers[watcher] = self._tap.lost()
            return watcher

    def leave(self, watcher: Watcher) -> None:
        with self._lock:
            if self._watchers.pop(watcher, None) is None or self._watchers:
                return
            tap, reader, self._tap, self._reader = self._tap, self._reader, None, None
            self._stop.set()
        if reader is not None:
            reader.join()
        if tap is not None:
            tap.close()

    def kernel_dropped_since(self, watcher: Watcher) -> int:
        with self._lock:
            start = self._watchers.get(watcher)
            return 0 if start is None or self._tap is None else self._tap.lost() - start

    @property
    def watching(self) -> int:
        return len(self._watchers)

    def close(self) -> None:
        for watcher in list(self._watchers):
            self.leave(watcher)

    def _read(self, tap: EventTap) -> None:
        while not self._stop.is_set():
            try:
                batch = tap.read(timeout=READ_WAIT_S)
            except Exception:  # noqa: BLE001 - a broken read ends the stream, never the agent
                log.exception("reading connection events failed")
                return
            if batch:
                with self._lock:
                    watchers = list(self._watchers)
                for watcher in watchers:
                    watcher._offer(batch)
