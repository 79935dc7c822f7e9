"""The snapshot consumer: reads the events topic in its own consumer group and writes Parquet
snapshots of it for offline retraining (the files: `pipeline/snapshot_files.py`).

Durability: an offset is committed only after every file holding events before it is written;
what was not written is read again after a crash, and what a crash left half-done is removed
first (`remove_uncommitted`), so every event ends up in exactly one file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError

from models.errors import BadRecord
from pipeline import security
from pipeline.records import decode_event, decode_forget, encode_forget_report
from pipeline.snapshot_files import Buffer, remove_uncommitted, write_snapshot
from pipeline.snapshot_privacy import expire, forget_rows, pseudonymizer
from pipeline.snapshot_writer import SnapshotWriter

log = logging.getLogger(__name__)

# the snapshot consumer asks the broker for at least this much per fetch, waiting up to
# SNAPSHOT_FETCH_WAIT_MS: snapshots are written once a minute, and with aiokafka's defaults
# (any data at once) it fetched a few records at a time at live rates, each fetch and its
# decoding work on the worker's event loop (see docs)
SNAPSHOT_FETCH_MIN_BYTES = 256 * 1024
SNAPSHOT_FETCH_WAIT_MS = 500

# a flush also happens once this many events are buffered: the worker pickles them for the writer
# process (11 - 17 ms of its GIL per 46,000 events; building the files in a thread of the worker's
# instead cost its event loop ~60 ms), and smaller flushes keep each of those pauses short
FLUSH_EVENTS = 50_000


EXPIRE_EVERY_S = 600.0  # the retention limit is applied at most this often (and at start)


@dataclass
class ForgetRequest:
    stored_id: str  # the user id as the snapshots store it (a pseudonym when a key is set)
    request_id: str
    requested_s: float  # the request record's timestamp


def snapshot_group(app_id: str) -> str:
    """The snapshot consumer's own consumer group."""
    return f"{app_id}-snapshots"


class SnapshotConsumer:
    """Reads the events topic in its own consumer group (<app_id>-snapshots) and commits an
    offset only after the Parquet file holding the event is written. Independent of Faust's
    acks: the worker's own commits are never held back by snapshots, and after a crash the
    snapshot group re-reads what was not written."""

    def __init__(self, settings, metrics) -> None:  # noqa: ANN001 - Settings, Metrics
        self.settings = settings
        self.metrics = metrics
        self.pending = Buffer()
        self.offsets: dict[TopicPartition, int] = {}  # next offset to commit, for what is buffered
        self.positions: dict[TopicPartition, int] = {}  # where a re-read would start: the committed offset
        self.unclean: set[TopicPartition] = set()  # assigned, leftovers of a crash not yet removed
        self.consumer: AIOKafkaConsumer | None = None
        self.stopping = False
        self.done: asyncio.Event | None = None  # set when run() has flushed and closed
        self.stored_id = pseudonymizer(settings.snapshot_user_key)
        self.forgets: list[ForgetRequest] = []  # carried out at the next flush, before the commit
        self.producer: AIOKafkaProducer | None = None  # for forget reports, started on the first request
        self.last_expire = float("-inf")
        self._flushing = asyncio.Lock()  # one flush at a time: the rebalance callback's waits for the loop's
        self.writer = SnapshotWriter(settings.snapshot_writer)  # builds and writes the files, off the loop

    @property
    def _consumer(self) -> AIOKafkaConsumer:
        assert self.consumer is not None, "the snapshot consumer runs"
        return self.consumer

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Before an assigned partition is read, remove what a crash left of it (`clean`)."""
        self.unclean |= self._event_tps(assigned)
        await self.clean()

    def _event_tps(self, tps) -> set[TopicPartition]:  # noqa: ANN001 - any collection of them
        """The events topic's partitions among `tps` (the files are named by those; the forget
        topic's partitions, read too, have no files)."""
        return {tp for tp in tps if tp.topic == self.settings.events_topic}

    async def _positions(self, tps: set[TopicPartition]) -> None:
        """Where a re-read of each partition starts: the committed offset, or the log start when none."""
        committed = {tp: await self._consumer.committed(tp) for tp in tps}
        missing = [tp for tp, off in committed.items() if off is None]
        starts = await self._consumer.beginning_offsets(missing) if missing else {}
        for tp, off in committed.items():
            self.positions[tp] = off if off is not None else starts[tp]

    async def clean(self) -> bool:
        """Remove every event at or past each unclean partition's position, and its temporary
        files; -> False when that failed: nothing is written until it works (the next flush retries;
        aiokafka only logs an error raised in the assignment callback)."""
        if not self.unclean:
            return True
        try:
            await self._positions({tp for tp in self.unclean if tp not in self.positions})
            positions = {tp.partition: self.positions[tp] for tp in self.unclean}
            done = await asyncio.get_running_loop().run_in_executor(
                None, remove_uncommitted, self.settings.snapshot_root, positions)
        except Exception as e:  # broker or storage errors
            self.metrics.snapshot_failures.inc()
            log.error("snapshot: removing a crash's leftovers failed (%s); will retry", type(e).__name__)
            return False
        self.unclean.clear()
        if done.files_removed or done.files_trimmed or done.temporary_removed:
            log.info("snapshot: removed what an interrupted write left: %d events (%d files removed, %d trimmed), "
                     "%d temporary files; they are written again", done.events_removed, done.files_removed,
                     done.files_trimmed, done.temporary_removed)
        return True

    async def run(self) -> None:
        owner = self

        class OnRebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):  # noqa: ANN001, ANN202 - aiokafka's signature
                await owner.flush()
                # what a failed flush kept of these partitions is their new owner's to write
                owner.pending = owner.pending.without({tp.partition for tp in revoked})
                for tp in revoked:
                    owner.offsets.pop(tp, None)
                    owner.positions.pop(tp, None)
                    owner.unclean.discard(tp)

            async def on_partitions_assigned(self, assigned):  # noqa: ANN001, ANN202
                await owner.on_assigned(assigned)

        self.done = asyncio.Event()
        s = self.settings
        self.consumer = AIOKafkaConsumer(group_id=snapshot_group(s.app_id), enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_min_bytes=SNAPSHOT_FETCH_MIN_BYTES,
                                         fetch_max_wait_ms=SNAPSHOT_FETCH_WAIT_MS, **security.aiokafka(s))
        self.consumer.subscribe([s.events_topic, s.forget_topic], listener=OnRebalance())
        await self.consumer.start()
        last_flush = time.monotonic()
        try:
            while not self.stopping:
                # a few hundred records at a time: decoding runs on the worker's event loop
                batches = await self.consumer.getmany(timeout_ms=200, max_records=500)
                now_ms = int(time.time() * 1000)
                for tp, messages in batches.items():
                    for m in messages:
                        if tp.topic == s.forget_topic:
                            self._forget(m)
                        else:
                            try:
                                event = decode_event(m.key, m.value, s.max_record_bytes, now_ms)
                            except BadRecord:
                                event = None  # a dead letter: the worker sends it to the DLQ
                            if event is not None:
                                self.pending.add(m.partition, m.offset, event, self.stored_id(event.user_id))
                        self.offsets[tp] = m.offset + 1
                if (self.forgets or time.monotonic() - last_flush >= s.snapshot_interval
                        or len(self.pending) >= FLUSH_EVENTS):
                    await self.flush()
                    last_flush = time.monotonic()
            await self.flush()
        finally:
            await self.consumer.stop()  # may flush (the partitions are revoked): the writer still runs
            await self.writer.close()
            if self.producer is not None:
                await self.producer.stop()
            self.done.set()

    def _forget(self, m) -> None:  # noqa: ANN001 - an aiokafka ConsumerRecord
        """An erasure request: drop the user's buffered events now; their rows in the files go
        at the next flush, which comes at once."""
        try:
            key, request_id = decode_forget(m.key, m.value, m.partition, m.offset)
        except BadRecord:
            return  # the worker's forget agent sends it to the dead-letter topic
        stored = self.stored_id(key.decode(errors="replace"))
        self.pending = self.pending.without_users({stored})
        self.forgets.append(ForgetRequest(stored, request_id, (m.timestamp or 0) / 1000))

    async def flush(self) -> None:
        """Write what is buffered, then commit those offsets; on failure remove what was written
        of it, keep it and retry later. One at a time: a rebalance's flush (on revoke) waits for
        one in progress, so that commits while the partitions are still this consumer's."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if not self.offsets or not await self.clean():
            return
        batch, offsets = self.pending, dict(self.offsets)
        self.pending = Buffer()  # events read while this one is written go to the next
        started = time.perf_counter()
        try:
            written = await self.writer.run(write_snapshot, self.settings.snapshot_root, batch) if batch else []
        except Exception as e:  # disk full, permissions, object store errors: retried at the next flush
            self.metrics.snapshot_failures.inc()
            log.error("snapshot: writing %d events failed (%s); will retry", len(batch), type(e).__name__)
            batch.extend(self.pending)
            self.pending = batch
            self.unclean |= self._event_tps(offsets)  # the files written before the failure go before the retry
            return
        forgets = self.forgets
        if forgets and not await self._carry_out(forgets):
            batch.extend(self.pending)  # written but not committed: removed and written again at the retry
            self.pending = batch
            self.unclean |= self._event_tps(offsets)
            return
        self.forgets = self.forgets[len(forgets):]
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as e:
            # the group rebalanced under this batch: whoever is assigned its partitions next (maybe
            # this worker) removes the files past the committed offsets first and writes them again
            log.warning("snapshot: %d events written but not committed: the group rebalanced (%s); "
                        "they are written again by the partitions' next owner", len(batch), type(e).__name__)
            return
        await self._expire()
        self.positions.update(offsets)
        for tp, off in offsets.items():
            if self.offsets.get(tp) == off:
                del self.offsets[tp]
        m = self.metrics
        m.snapshot_seconds.observe(time.perf_counter() - started)
        m.snapshot_files.inc(len(written))
        m.snapshot_rows.inc(sum(rows for _, rows, _ in written))
        m.snapshot_bytes.inc(sum(size for _, _, size in written))
        m.snapshot_last_success.set(time.time())
        if written:
            log.info("snapshot: %d events in %d files", len(batch), len(written))

    async def _carry_out(self, forgets: list[ForgetRequest]) -> bool:
        """Remove the requested users' rows from every snapshot file and report each request;
        -> False when that failed (retried at the next flush, nothing committed meanwhile)."""
        started = time.perf_counter()
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                None, forget_rows, self.settings.snapshot_root, [f.stored_id for f in forgets])
        except Exception as e:  # storage errors
            self.metrics.snapshot_failures.inc()
            log.error("forget: removing rows from the snapshots failed (%s); will retry", type(e).__name__)
            return False
        elapsed = time.perf_counter() - started
        if self.producer is None:
            self.producer = AIOKafkaProducer(acks="all", **security.aiokafka(self.settings))
            await self.producer.start()
        now = time.time()
        for f in forgets:
            seconds = max(0.0, now - f.requested_s) if f.requested_s else elapsed
            key, value = encode_forget_report(f.request_id, "snapshots", users=len(forgets), files_scanned=done.files_scanned,
                                              files_rewritten=done.files_rewritten, files_removed=done.files_removed,
                                              rows_removed=done.rows_removed, events_removed=done.events_removed,
                                              seconds=round(seconds, 3))
            await self.producer.send_and_wait(self.settings.forget_reports_topic, value, key=key)
            self.metrics.forget_requests.labels("snapshots").inc()
            self.metrics.forget_seconds.labels("snapshots").observe(seconds)
        self.metrics.forget_rows.inc(done.rows_removed)
        log.info("forget: %d request(s): %d rows (%d events) removed from the snapshots, %d files rewritten, "
                 "%d removed, %d scanned in %.2fs", len(forgets), done.rows_removed, done.events_removed,
                 done.files_rewritten, done.files_removed, done.files_scanned, elapsed)
        return True

    async def _expire(self) -> None:
        """Apply the retention limit (RECUR_SNAPSHOT_RETENTION days), at most every EXPIRE_EVERY_S."""
        days = self.settings.snapshot_retention
        if days <= 0 or time.monotonic() - self.last_expire < EXPIRE_EVERY_S:
            return
        self.last_expire = time.monotonic()
        try:
            done = await asyncio.get_running_loop().run_in_executor(
                None, expire, self.settings.snapshot_root, days, int(time.time() * 1000))
        except Exception as e:
            log.error("snapshot: applying the retention limit failed (%s); will retry", type(e).__name__)
            return
        self.metrics.snapshot_expired.inc(done.files_removed)
        if done.files_removed:
            log.info("snapshot: %d files older than %g days deleted; oldest hour kept %s",
                     done.files_removed, days, done.oldest_kept or "none")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop reading, write and commit what is buffered."""
        self.stopping = True
        if self.done is not None:
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                log.error("snapshot: final flush did not finish within %.0fs", timeout)
