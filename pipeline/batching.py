"""The agent's events in batches, read off faust's queue, and the backlog test that sizes them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from faust.types import EventT

from pipeline import faust_internals as internals

log = logging.getLogger(__name__)


def records_after(consumer, newest: dict) -> dict:  # noqa: ANN001 - faust's consumer
    """{tp: offset} -> {tp: records on the broker past that offset}, by the consumer's last known
    high-water marks; a partition with none known yet (no fetch answered) is left out."""
    waiting = {}
    for tp, offset in newest.items():
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # faust raises before a partition's first fetch
            continue
        if highwater is not None:
            waiting[tp] = max(0, highwater - offset - 1)
    return waiting


def broker_backlog(app, threshold: int) -> Callable[[list[EventT]], bool]:  # noqa: ANN001
    """-> behind(batch): True when at least `threshold` records past the batch's newest ones
    already sit on the broker (by the consumer's last known high-water marks): the worker is
    working through a backlog rather than keeping up with live events."""

    def behind(batch: list[EventT]) -> bool:
        newest: dict = {}
        for event in reversed(batch):
            msg = event.message
            if msg.tp not in newest:
                newest[msg.tp] = msg.offset
        return sum(records_after(app.consumer, newest).values()) >= threshold

    return behind


async def batches(stream, max_batch: int, max_wait: float, backlog_wait: float = 0.0,  # noqa: ANN001
                  behind: Callable[[list[EventT]], bool] | None = None) -> AsyncIterator[list[EventT]]:
    """The agent's events in batches: everything already queued (up to `max_batch`) at once,
    and after the first event at most `max_wait` seconds for more. When `behind(batch)` says
    the worker is in a backlog, up to `backlog_wait` seconds from the first event: those events
    are late already, and larger steps cost less per event (faust hands a backlog over at
    ~6,000 events/s, so a 20 ms window made batches of ~110).

    Reads the agent's channel queue directly instead of `stream.take_events()`, which
    moves events into its buffer one at a time, tens of microseconds each, and only
    while it waits `within` seconds: under a backlog its batches were as small as what
    faust delivered in that window (~100 events), and a small `within` made them smaller.
    What faust's stream does with each event it takes, this does too: an event fetched
    before the current rebalance (another generation, or taken while flow is suspended) is
    left out, because faust seeks back and the partition's owner reads it again; every
    other event is marked in flight, so that a rebalance waits for its batch to be acked
    before it commits and hands partitions over. Nothing is acked here: the caller acks
    each batch after it is processed."""
    app = stream.app
    queue = internals.agent_queue(stream)
    loop = asyncio.get_running_loop()

    def current(event: EventT) -> bool:
        if internals.take(app, event):
            return True
        log.debug("worker: left out an event fetched before the rebalance (partition %d offset %d)",
                  event.message.partition, event.message.offset)
        return False

    while True:
        try:
            first_event = await queue.get()
        except StopAsyncIteration:  # faust stops the channel: the worker is shutting down
            return
        if not current(first_event):
            continue
        batch = [first_event]
        first = loop.time()
        deadline, asked = first + max_wait, behind is None or backlog_wait <= max_wait
        while len(batch) < max_batch:
            try:
                event = queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    if asked or behind is None or not behind(batch):
                        break
                    asked, deadline = True, first + backlog_wait  # asked once per batch
                    continue
                await asyncio.sleep(min(left, 0.002))  # let the consumer deliver more
                continue
            if current(event):
                batch.append(event)
        yield batch
