"""The batch handler: decode a batch, call the core's step once, write state back, send recommendations.

    events (faust agent, pipeline/agents.py)
      -> BatchHandler.handle: pipeline/records.py decodes each record (bad ones -> dead-letter topic)
      -> pipeline/state_store.py reads the users' states, a batch at a time
      -> models/online.py OnlineRecommender.process -> models/lstm.py step (the one step)
      -> pipeline/state_store.py + the changelog: new states
      -> pipeline/records.py encodes each Recommendation -> the recommendations topic
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from faust.types import EventT

from models.artifacts import Artifact
from models.errors import BadRecord
from models.online import InputEvent, OnlineRecommender, UserState
from models.scorers import Scorer
from pipeline import faust_internals as internals
from pipeline.app import Streams
from pipeline.batching import records_after
from pipeline.config import Settings
from pipeline.metrics import Metrics, observe_many
from pipeline.model_watch import ItemCoverage
from pipeline.producing import PartitionBatches, partitions_for
from pipeline.records import decode_event, dlq_headers, encode_recommendation
from pipeline.state_store import StateStore

log = logging.getLogger(__name__)


class BatchHandler:
    def __init__(self, streams: Streams, recommender: OnlineRecommender, metrics: Metrics, settings: Settings) -> None:
        self.streams = streams
        self.recommender = recommender
        self.metrics = metrics
        self.settings = settings
        self._store: StateStore | None = None  # made on first use: the table's store exists once the app runs
        self.coverage = ItemCoverage(metrics.known_items)
        self._model_info()

    def _model_info(self) -> None:
        """`recur_model_info{version, scorer}`: the live model and the scorer that ranks its items
        ("none" while cold), so that an operator sees a worker that fell back to a slower one."""
        live = self.recommender.model is not None
        self.metrics.model.info({"version": self.recommender.version,
                                 "scorer": self.recommender.scorer.name if live else "none"})

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = StateStore(self.streams.state)
        return self._store

    def swap_model(self, artifact: Artifact, scorer: Scorer) -> None:
        """Make a loaded and checked model, with the scorer built for it, the live one. Called on
        the event loop, so between two batches: the step is synchronous and a batch never sees
        half a swap."""
        old, new = self.recommender.version, artifact.version
        self.recommender.use(artifact, scorer)
        self.coverage.reset()
        self._model_info()
        self.metrics.model_swaps.inc()
        log.info("model: swapped %s -> %s (scorer %s); users re-warm on their next event", old, new, scorer.name)

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
        out = PartitionBatches(internals.kafka_producer(self.streams.app), self.settings.recommendations_topic)
        rec_partitions = await out.partitions()
        encoded = [encode_recommendation(rec, sent_ms) for rec in recs]
        # keyed by user, in the partition producer.send would pick for the key
        for (key, value), partition in zip(encoded, partitions_for([key for key, _ in encoded], rec_partitions)):
            out.add(partition, key, value)
        event_ms = np.array([rec.event_timestamp for rec in recs], dtype=np.int64)
        observe_many(self.metrics.e2e_seconds, np.maximum(0, sent_ms - event_ms) / 1000.0)
        await out.submit()
        for strategy, n in Counter([rec.strategy for rec in recs]).items():
            self.metrics.recommendations.labels(strategy).inc(n)
        m = self.metrics
        m.batch_size.observe(len(valid))
        for etype, n in stats.by_type.items():
            m.events.labels("purchase" if etype else "click").inc(n)
        m.duplicates.inc(stats.duplicates)
        m.unknown_items.inc(stats.unknown_items)
        version = self.recommender.version  # a swap happens between batches: one version per batch
        m.hits.labels(version).inc(stats.hits)
        m.hit_opportunities.labels(version).inc(stats.hit_opportunities)
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
        (`pipeline/state_store.py`); the changelog records go straight to the producer, one
        batch per partition of the user's events (the table's partition,
        `pipeline/producing.py`); the changelog offset the store remembers for recovery is
        written once per partition when the broker has acknowledged its batch. Faust flushes
        the producer before it commits input offsets, so a batch's events are committed only
        after its state is durable. The table stores raw bytes (see `pipeline/app.py`), so
        store and changelog hold the same bytes."""
        if not changed:
            return
        table = self.streams.state
        records = [(user.encode(), state.encode(), source[user]) for user, state in changed.items()]
        self.store.write(records, bind)
        out = PartitionBatches(internals.kafka_producer(self.streams.app),
                               table.changelog_topic.get_topic_name())  # public: Topic.get_topic_name()
        for key, value, event in records:
            out.add(event.message.partition, key, value)
        by_partition: dict[int, list[tuple[int, asyncio.Future]]] = {}
        for partition, count, future in await out.submit():
            by_partition.setdefault(partition, []).append((count, future))
        for partition, sent in by_partition.items():
            count, last = sent[-1]  # a partition's batches in order: its last record ends the last one

            def persisted(done: asyncio.Future, partition: int = partition, count: int = count,
                          last: asyncio.Future = last) -> None:
                if done.cancelled() or done.exception() is not None:
                    return  # the producer reports send errors itself; recovery then reads more
                internals.set_persisted_offset(table, partition, last.result().offset + count - 1)

            (last if len(sent) == 1 else asyncio.gather(*(f for _, f in sent))).add_done_callback(persisted)

    def _lag(self, last_offsets: dict) -> None:
        for tp, waiting in records_after(self.streams.app.consumer, last_offsets).items():
            self.metrics.lag.labels(str(tp.partition)).set(waiting)
