"""Engine lanes: batches are cut when an engine is free, not when requests arrive.

Why not `@serve.batch`: it closes a batch a fixed wait after its first request arrives, even
while the engine is still busy with the previous batch, so under steady load (requests arriving
a few tens of milliseconds apart) it queued batches of one behind each other (measured: batch
size 1.0-1.6 at 16 concurrent clients), and it answers a batch only when all of it is done.
Here a lane that finishes takes every waiting request with the same decode options, up to the
batch limit, so batches grow with the load and a lone request never waits. A request is
answered as soon as its own transcription is done (`deliver`), not when its whole batch is:
one clip's temperature fallback (up to six more decodings) does not hold its batch-mates.

Two lanes on a CPU replica keep both cores busy while one lane runs Python between ONNX
calls (measured on 2 cores, 32 clips: 1 lane 7.5-9.3 RTFx, 2 lanes 10.1-12.0 RTFx).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    key: Hashable
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


Deliver = Callable[[int, R], None]
"""`deliver(i, result)`: item i of a batch is answered now, before its batch-mates (any thread)."""


class EngineLanes(Generic[T, R]):
    """Runs `decode(lane, items, deliver) -> results` in worker threads, one batch per lane at a time.

    `decode` must return one result per item and must not raise for a single bad item (the
    caller isolates failures); it may `deliver` an item's result early (its caller is answered
    then; the returned result of that item is ignored). `key` says which items may share a batch.
    """

    def __init__(self, decode: Callable[[int, list[T], Deliver], list[R]], lanes: int, max_batch_size: int,
                 key: Callable[[T], Hashable]):
        self._decode = decode
        self._key = key
        self.lanes = lanes
        self.max_batch_size = max_batch_size
        self._waiting: deque[_Waiting[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self.busy = 0
        """Lanes decoding right now."""

    @property
    def queued(self) -> int:
        """Requests waiting for a free lane."""
        return len(self._waiting)

    async def run(self, items: list[T]) -> list[R]:
        """Queue `items`; returns their results once lanes have decoded them."""
        self._start()
        waiting = [_Waiting(item, self._key(item)) for item in items]
        self._waiting.extend(waiting)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(w.future for w in waiting)))
        finally:
            for w in waiting:  # cancelled by the caller: don't decode it
                if not w.future.done():
                    w.future.cancel()

    def _start(self) -> None:
        if self._wakeup is None:  # created lazily: it must belong to the replica's event loop
            self._wakeup = asyncio.Event()
            self._workers = [asyncio.create_task(self._lane(i)) for i in range(self.lanes)]

    def _take(self) -> list[_Waiting[T, R]]:
        """The oldest live request and every later one with its key, up to the batch limit."""
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()
        if not self._waiting:
            return []
        key = self._waiting[0].key
        batch = [w for w in self._waiting if w.key == key and not w.future.done()][: self.max_batch_size]
        taken = {id(w) for w in batch}
        self._waiting = deque(w for w in self._waiting if id(w) not in taken and not w.future.done())
        return batch

    async def _lane(self, lane: int) -> None:
        while True:
            batch = self._take()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            loop = asyncio.get_running_loop()

            def deliver(i: int, result: R, batch=batch, loop=loop) -> None:  # in the lane's thread
                loop.call_soon_threadsafe(_settle, batch[i].future, result)

            self.busy += 1
            try:
                results = await asyncio.to_thread(self._decode, lane, [w.item for w in batch], deliver)
            except Exception as exc:  # a bug in decode: fail this batch, keep the lane alive
                results = [exc] * len(batch)
            finally:
                self.busy -= 1
            for w, result in zip(batch, results, strict=True):
                _settle(w.future, result)


def _settle(future: asyncio.Future, result) -> None:
    """Answer a waiting caller, unless it was answered (delivered early) or went away."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
