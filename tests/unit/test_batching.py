"""The agent's helpers that need no broker: batching off a queue, the backlog test."""

import asyncio
from types import SimpleNamespace

from pipeline.batching import batches, broker_backlog


class _Flow:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


def _stream(queue: asyncio.Queue, generation: int = 1) -> SimpleNamespace:
    app = SimpleNamespace(consumer=SimpleNamespace(unacked=set()), consumer_generation_id=generation, flow_control=_Flow())
    return SimpleNamespace(app=app, channel=SimpleNamespace(queue=queue))


class _Message:  # hashable, as faust's messages are (the in-flight set holds them)
    def __init__(self, offset, generation: int) -> None:
        self.partition, self.offset, self.generation_id, self.tracked = 0, offset, generation, False


def _event(offset, generation: int = 1) -> SimpleNamespace:
    return SimpleNamespace(message=_Message(offset, generation))


def _offsets(batch) -> list:
    return [e.message.offset for e in batch]


def test_batches_take_a_backlog_at_once_and_wait_briefly_for_more():
    async def scenario():
        queue = asyncio.Queue()
        stream = _stream(queue)
        for n in range(2500):
            queue.put_nowait(_event(n))
        it = batches(stream, max_batch=1000, max_wait=0.2)
        sizes = [len(await it.__anext__()) for _ in range(3)]  # the backlog: capped, in order
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, queue.put_nowait, _event("late"))  # within max_wait of the first
        loop.call_later(0.05, queue.put_nowait, _event("later"))  # still within: the batch keeps waiting
        loop.call_later(1.0, queue.put_nowait, _event("next"))  # long after: the next batch's
        queue.put_nowait(_event("first"))
        tail = await it.__anext__()
        following = await it.__anext__()
        return sizes, _offsets(tail), _offsets(following), len(stream.app.consumer.unacked)

    sizes, tail, following, in_flight = asyncio.run(scenario())
    assert sizes == [1000, 1000, 500]
    assert tail == ["first", "late", "later"] and following == ["next"]
    assert in_flight == 2504  # every event handed out is in flight until acked: a rebalance waits for it


def test_batches_leave_out_events_fetched_before_a_rebalance_and_do_not_track_them():
    async def scenario():
        queue = asyncio.Queue()
        stream = _stream(queue, generation=3)
        for n in range(5):
            queue.put_nowait(_event(n, generation=2))  # fetched in the generation before
        for n in range(5, 8):
            queue.put_nowait(_event(n, generation=3))
        it = batches(stream, max_batch=100, max_wait=0.01)
        first = await it.__anext__()
        flow = stream.app.flow_control
        flow.active = False  # a rebalance has begun: what is still queued is stale
        queue.put_nowait(_event(8, generation=3))

        def resumed():
            flow.active = True
            queue.put_nowait(_event(9, generation=3))

        asyncio.get_running_loop().call_later(0.02, resumed)
        second = await it.__anext__()
        stream.app.consumer_generation_id = 4
        queue.put_nowait(_event(10, generation=3))
        queue.put_nowait(_event(11, generation=4))
        third = await it.__anext__()
        unacked = sorted(m.offset for m in stream.app.consumer.unacked)
        return _offsets(first), _offsets(second), _offsets(third), unacked

    first, second, third, unacked = asyncio.run(scenario())
    assert first == [5, 6, 7]
    assert second == [9]  # offset 8 was taken while the flow was suspended
    assert third == [11]  # offset 10 was fetched in generation 3: the partition's owner reads it again
    assert unacked == [5, 6, 7, 9, 11]


def test_in_a_backlog_batches_wait_longer_to_fill_up():
    """Events trickling in every 30 ms: live, a batch ends after max_wait; in a backlog it
    fills to max_batch within backlog_wait (from its first event), and asks `behind` once."""

    async def one_batch(behind_now: bool):
        queue = asyncio.Queue()
        stream = _stream(queue)
        asked = []

        def behind(batch):
            asked.append(len(batch))
            return behind_now

        loop = asyncio.get_running_loop()
        for n in range(1, 6):
            loop.call_later(0.03 * n, queue.put_nowait, _event(n))
        queue.put_nowait(_event(0))
        it = batches(stream, max_batch=4, max_wait=0.01, backlog_wait=5.0, behind=behind)
        batch = await it.__anext__()
        return _offsets(batch), asked

    live, live_asked = asyncio.run(one_batch(False))
    assert live == [0] and live_asked == [1]  # ended before the event 30 ms later
    backlog, backlog_asked = asyncio.run(one_batch(True))
    assert backlog == [0, 1, 2, 3] and backlog_asked == [1]  # waited for three more, asking once


def test_broker_backlog_counts_records_past_each_partitions_newest_event():
    def event(partition: int, offset: int):
        return SimpleNamespace(message=SimpleNamespace(tp=("events", partition), offset=offset))

    highwater = {("events", 0): 2000, ("events", 1): 100}

    def hw(tp):
        if tp not in highwater:
            raise KeyError(tp)  # faust raises before a partition's first fetch
        return highwater[tp]

    behind = broker_backlog(SimpleNamespace(consumer=SimpleNamespace(highwater=hw)), threshold=1024)
    # partition 0's newest is offset 990: 1,009 records wait; partition 1's is 59: 40 wait
    assert behind([event(0, 980), event(1, 59), event(0, 990)]) is True  # 1,049 >= 1,024
    assert behind([event(0, 1020), event(1, 59)]) is False  # 979 + 40 = 1,019
    assert behind([event(2, 5)]) is False  # no high-water mark known yet
