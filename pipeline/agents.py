"""The agent: decode a batch, call the core once, write state back, send recommendations."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

from faust.types import EventT

from models.artifacts import Artifact
from models.errors import BadRecord
from models.online import InputEvent, OnlineRecommender, UserState
from pipeline import faust_internals as internals
from pipeline.app import Streams
from pipeline.config import Settings
from pipeline.metrics import Metrics
from pipeline.model_watch import ItemCoverage
from pipeline.records import decode_event, dlq_headers, encode_recommendation
from pipeline.state_store import StateStore

log = logging.getLogger(__name__)


class BatchHandler:
    def __init__(self, streams: Streams, recommender: OnlineRecommender, metrics: Metrics, settings: Settings) -> None:
        self.streams = streams
        self.recommender = recommender
        self.metrics = metrics
        self.settings = settings
        self.pending: Artifact | None = None  # a checked model waiting to be swapped in
        self._store: StateStore | None = None  # made on first use: the table's store exists once the app runs
        self.coverage = ItemCoverage(metrics.known_items)

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = StateStore(self.streams.state)
        return self._store

    def swap_model(self) -> None:
        """Between batches: make a loaded and checked model the live one."""
        if self.pending is None:
            return
        old, new = self.recommender.version, self.pending.version
        self.recommender.use(self.pending)
        self.pending = None
        self.coverage.reset()
        self.metrics.model.info({"version": new})
        self.metrics.model_swaps.inc()
        log.info("model: swapped %s -> %s; users re-warm on their next event", old, new)

    async def dead_letter(self, event: EventT, error: BadRecord) -> None:
        msg = event.message
        await self.streams.dlq.send(
            key=msg.key, value=msg.value, headers=dlq_headers(msg.topic, msg.partition, msg.offset, error)
        )
        self.metrics.dead_letters.labels(error.reason).inc()
        log.warning("dead letter: partition %d offset %d: %s", msg.partition, msg.offset, error)

    async def handle(self, batch: list[EventT], bind: Callable[[EventT], None] = lambda e: None) -> None:
        """Process one batch. `bind(event)` makes `event` faust's current event, for stores
        written through the table (see `pipeline/state_store.py`): faust files a table write
        under the current event's partition, and for a batch there is none, so each user's
        write is bound to one of that user's events (same key, same partition)."""
        self.swap_model()
        now_ms = int(time.time() * 1000)
        valid: list[InputEvent] = []
        source: dict[str, EventT] = {}
        last_offsets: dict = {}
        for event in batch:
            msg = event.message
            last_offsets[msg.tp] = msg.offset
            try:
                decoded = decode_event(msg.key, msg.value, self.settings.max_record_bytes, now_ms)
            except BadRecord as error:
                await self.dead_letter(event, error)
                continue
            valid.append(InputEvent(decoded, msg.partition, msg.offset))
            source[decoded.user_id] = event
        if not valid:
            return
        keys: dict[str, bytes] = {}
        partitions: dict[bytes, int] = {}
        for e in valid:
            user = e.event.user_id
            if user not in keys:
                keys[user] = key = user.encode()
                partitions[key] = e.partition
        stored = self.store.read(partitions)
        states = {}
        for user, key in keys.items():
            raw = stored[key]
            states[user] = UserState.decode(raw) if raw is not None else None
        started = time.perf_counter()
        changed, recs, stats = self.recommender.process(states, valid)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        await self.write_states(changed, source, bind)
        sent_ms = int(time.time() * 1000)
        producer = self.streams.app.producer  # straight to the producer: no per-record faust bookkeeping
        topic = self.settings.recommendations_topic
        strategies: Counter[str] = Counter()
        for rec in recs:
            key, value = encode_recommendation(rec, sent_ms)
            await producer.send(topic, key, value, None, None, None)
            strategies[rec.strategy] += 1
            self.metrics.e2e_seconds.observe(max(0.0, (sent_ms - rec.event_timestamp) / 1000.0))
        for strategy, n in strategies.items():
            self.metrics.recommendations.labels(strategy).inc(n)
        m = self.metrics
        m.batch_size.observe(len(valid))
        for etype, n in stats.by_type.items():
            m.events.labels("purchase" if etype else "click").inc(n)
        m.duplicates.inc(stats.duplicates)
        m.unknown_items.inc(stats.unknown_items)
        m.hits.inc(stats.hits)
        m.hit_opportunities.inc(stats.hit_opportunities)
        m.rewarmed.inc(stats.rewarmed)
        if self.recommender.model is not None:
            self.coverage.add(self.recommender.version, stats)
        self._lag(last_offsets)

    async def write_states(self, changed: dict[str, UserState], source: dict[str, EventT],
                           bind: Callable[[EventT], None]) -> None:
        """Write the batch's changed states to the local store and the table's changelog.

        What `table[key] = value` does, minus faust's per-key bookkeeping (a changelog
        future, a callback and a RocksDB write of the changelog offset for every key),
        which cost as much as the model step. The store is written a batch at a time
        (`pipeline/state_store.py`); the changelog record goes straight to the app's producer, to the partition of the
        user's events (the table's partition); the changelog offset the store remembers
        for recovery is written once per partition when the broker has acknowledged the
        batch. Faust flushes the producer before it commits input offsets, so a batch's
        events are committed only after its state is durable. The table stores raw bytes
        (see `pipeline/app.py`), so store and changelog hold the same bytes."""
        if not changed:
            return
        table = self.streams.state
        topic = table.changelog_topic.get_topic_name()  # public: Topic.get_topic_name()
        producer = self.streams.app.producer
        records = [(user.encode(), state.encode(), source[user]) for user, state in changed.items()]
        self.store.write(records, bind)
        pending = [await producer.send(topic, key, value, event.message.partition, None, None)
                   for key, value, event in records]

        def persisted(done: asyncio.Future) -> None:
            if done.cancelled() or done.exception() is not None:
                return  # the producer reports send errors itself; recovery then reads more
            last: dict[int, int] = {}
            for meta in done.result():
                last[meta.partition] = max(meta.offset, last.get(meta.partition, -1))
            for partition, offset in last.items():
                internals.set_persisted_offset(table, partition, offset)

        asyncio.gather(*pending).add_done_callback(persisted)

    def _lag(self, last_offsets: dict) -> None:
        for tp, waiting in records_after(self.streams.app.consumer, last_offsets).items():
            self.metrics.lag.labels(str(tp.partition)).set(waiting)


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
                    if asked or not behind(batch):
                        break
                    asked, deadline = True, first + backlog_wait  # asked once per batch
                    continue
                await asyncio.sleep(min(left, 0.002))  # let the consumer deliver more
                continue
            if current(event):
                batch.append(event)
        yield batch


def register(streams: Streams, handler: BatchHandler, settings: Settings) -> None:
    @streams.app.agent(streams.events, name="recommend")
    async def recommend(stream):  # noqa: ANN001 - faust passes a StreamT
        behind = broker_backlog(streams.app, settings.max_batch)
        async for batch in batches(stream, settings.max_batch, settings.max_wait, settings.backlog_wait, behind):
            try:
                await handler.handle(batch, bind=internals.bind_current_event)
            except Exception:
                # A bug must crash loudly before the batch is acked, so that it is
                # re-delivered; faust would otherwise restart the agent and move on.
                log.critical("worker: unexpected error in a batch; exiting without committing it", exc_info=True)
                logging.shutdown()
                os._exit(70)
            for event in batch:
                event.ack()  # the offset may be committed now (faust commits acked offsets in order)


def register_users_gauge(streams: Streams, handler: BatchHandler, metrics: Metrics, interval: float) -> None:
    """Users in state, counted exactly on a slow timer, never per batch."""

    @streams.app.timer(interval)
    async def count_users_in_state() -> None:
        metrics.users.set(await handler.store.count())
