"""Engine lanes: batches cut when a lane frees up, failures and cancellations kept apart."""

import asyncio
import threading
import time

import pytest

from asrops.serve.lanes import EngineLanes


class SlowDecoder:
    """Records each batch; takes `seconds` per batch, like an engine would."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.batches: list[tuple[int, list]] = []
        self.lock = threading.Lock()

    def __call__(self, lane: int, items: list, deliver) -> list:
        time.sleep(self.seconds)
        with self.lock:
            self.batches.append((lane, list(items)))
        return [f"done {item}" for item in items]


def test_a_lone_request_is_decoded_alone_and_at_once():
    decoder = SlowDecoder(0.0)
    lanes = EngineLanes(decoder, lanes=2, max_batch_size=8, key=lambda item: "same")

    async def one():
        start = time.perf_counter()
        result = await lanes.run(["a"])
        return result, time.perf_counter() - start

    result, elapsed = asyncio.run(one())
    assert result == ["done a"]
    assert decoder.batches == [(0, ["a"])] or decoder.batches == [(1, ["a"])]
    assert elapsed < 1.0


def test_requests_waiting_for_a_busy_lane_are_batched_together():
    decoder = SlowDecoder(0.2)
    lanes = EngineLanes(decoder, lanes=1, max_batch_size=4, key=lambda item: "same")

    async def scenario():
        first = asyncio.create_task(lanes.run([0]))
        await asyncio.sleep(0.05)  # the lane is now busy with request 0
        rest = [asyncio.create_task(lanes.run([i])) for i in range(1, 7)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert first == ["done 0"] and rest == [[f"done {i}"] for i in range(1, 7)]
    assert [items for _, items in decoder.batches] == [[0], [1, 2, 3, 4], [5, 6]]


def test_two_lanes_decode_side_by_side():
    decoder = SlowDecoder(0.3)
    lanes = EngineLanes(decoder, lanes=2, max_batch_size=1, key=lambda item: "same")

    async def scenario():
        start = time.perf_counter()
        await asyncio.gather(lanes.run(["a"]), lanes.run(["b"]))
        return time.perf_counter() - start

    elapsed = asyncio.run(scenario())
    assert sorted(lane for lane, _ in decoder.batches) == [0, 1]
    assert elapsed < 0.55  # one after the other would take 0.6 s


def test_only_requests_with_the_same_key_share_a_batch():
    decoder = SlowDecoder(0.1)
    lanes = EngineLanes(decoder, lanes=1, max_batch_size=8, key=lambda item: item[0])

    async def scenario():
        blocker = asyncio.create_task(lanes.run(["x0"]))
        await asyncio.sleep(0.03)
        await asyncio.gather(*(lanes.run([name]) for name in ["a1", "b1", "a2", "b2", "a3"]))
        await blocker

    asyncio.run(scenario())
    assert [items for _, items in decoder.batches] == [["x0"], ["a1", "a2", "a3"], ["b1", "b2"]]


def test_a_decoder_bug_fails_its_batch_and_the_lane_keeps_serving():
    calls = []

    def decode(lane, items, deliver):
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("engine bug")
        return [item.upper() for item in items]

    lanes = EngineLanes(decode, lanes=1, max_batch_size=8, key=lambda item: "same")

    async def scenario():
        with pytest.raises(RuntimeError, match="engine bug"):
            await lanes.run(["boom"])
        return await lanes.run(["ok"])

    assert asyncio.run(scenario()) == ["OK"]


def test_a_cancelled_request_is_not_decoded():
    decoder = SlowDecoder(0.2)
    lanes = EngineLanes(decoder, lanes=1, max_batch_size=8, key=lambda item: "same")

    async def scenario():
        blocker = asyncio.create_task(lanes.run(["first"]))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(lanes.run(["cancelled"]))
        kept = asyncio.create_task(lanes.run(["kept"]))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await blocker
        return await kept

    assert asyncio.run(scenario()) == ["done kept"]
    assert [items for _, items in decoder.batches] == [["first"], ["kept"]]
    assert lanes.queued == 0


def test_a_request_delivered_early_is_answered_before_its_batch_is_done():
    """The engine hands back a finished clip at once; its caller does not wait for the batch."""
    release = threading.Event()

    def decode(lane, items, deliver):
        assert items == ["quick", "slow"]  # one batch
        deliver(0, "quick done")
        release.wait(5)  # the slow clip is still being decoded
        return ["ignored" if item == "quick" else f"{item} done" for item in items]

    lanes = EngineLanes(decode, lanes=1, max_batch_size=8, key=lambda item: "same")

    async def scenario():
        quick = asyncio.create_task(lanes.run(["quick"]))
        slow = asyncio.create_task(lanes.run(["slow"]))
        answered = await asyncio.wait_for(quick, 2)
        assert not slow.done()
        release.set()
        return answered, await slow

    assert asyncio.run(scenario()) == (["quick done"], ["slow done"])


def test_an_audio_that_breaks_the_engine_fails_alone_in_the_model_server():
    """ModelServer._decode: a batch whose engine call raises is retried one request at a time;
    the request delivered before the failure is not decoded again, the bad one gets an error."""
    import numpy as np

    from asrops.engines.types import DecodeOptions, Transcription
    from asrops.serve.model_server import ModelRequest, ModelServer, _Work

    calls, delivered = [], {}

    class BreakableEngine:
        def transcribe(self, audios, options, on_segments, pack, on_done):
            calls.append([len(a) for a in audios])
            for i, audio in enumerate(audios):
                if len(audio) == 3:
                    raise RuntimeError("engine bug")
                on_done(i, Transcription(text=f"{len(audio)} samples", segments=[], duration_s=0.1))

    class NoMetrics:
        def batch(self, size, queued):
            pass

    server = object.__new__(ModelServer.func_or_class)
    server.engine, server.metrics, server.version_id, server.pack_windows = BreakableEngine(), NoMetrics(), "v", False
    server.lanes = EngineLanes(server._decode, lanes=1, max_batch_size=8, key=lambda item: "same")
    work = [_Work(ModelRequest(pcm16=np.zeros(n, np.int16), options=DecodeOptions())) for n in (5, 3, 7)]
    replies = server._decode(0, work, lambda i, reply: delivered.setdefault(i, reply))
    assert calls == [[5, 3, 7], [3], [7]]  # the first was answered before the failure: not decoded again
    assert [r.transcription.text if r.transcription else r.error for r in replies] == [
        "5 samples", "the model failed on this audio", "7 samples"]
    assert set(delivered) == {0, 2} and delivered[0] is replies[0] and delivered[2] is replies[2]
