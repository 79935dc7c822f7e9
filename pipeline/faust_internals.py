"""Every use of faust's (and aiokafka's) private internals, in one place.

recur needs a few things faust has no public API for. Each function below names what it relies
on; `tests/unit/test_faust_internals.py` checks each assumption against the installed faust, and
`pyproject.toml` pins faust-streaming (and aiokafka) to the versions these tests ran with, so an
upgrade fails loudly in CI instead of losing events in production.

Tested with faust-streaming 0.15.3, aiokafka 0.14.0, rocksdict 0.3.29.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator

import faust
import faust.transport.drivers.aiokafka as faust_aiokafka
from faust import streams as faust_streams
from faust.tables.recovery import Recovery
from faust.types import TP, EventT, TableT
from faust.types.tuples import ConsumerMessage, ack_lock
from mode.utils.futures import notify

# the bulk restore of each app (see restore_before_recovery): (recovery, tps, offsets, highwaters) -> None
RestoreHook = Callable[[Recovery, set, dict, dict], Awaitable[object]]
_RESTORE_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- the consumer ---------------------------------------------------------------------------
def limit_fetch_wait(ms: int) -> None:
    """Make faust's consumer ask the broker to hold a fetch with no new data for `ms`.

    Faust's aiokafka driver hard-codes 1,500 ms and has no setting for it. aiokafka keeps one
    fetch in flight per broker and leaves out partitions whose records are still being
    processed, so the broker holds that fetch for the full wait on partitions with nothing new
    (the table's changelog), and no new events reach the worker meanwhile: under a steady 700
    events/s the worker stalled 0.7-1.5 s every couple of seconds (p50 latency 1.3 s; 93 ms with
    a 10 ms wait). Relies on: `AIOKafkaConsumerThread._create_worker_consumer(transport)` making
    the consumer, and aiokafka reading `AIOKafkaConsumer._fetch_max_wait_ms` when it starts."""
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "recur_fetch_wait_ms", None) == ms:
        return

    def create_worker_consumer(self, transport):  # noqa: ANN001, ANN202 - faust's signature
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    create_worker_consumer.recur_fetch_wait_ms = ms
    create_worker_consumer.__wrapped__ = getattr(create, "__wrapped__", create)
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer


def seek_uncommitted_to_beginning() -> None:
    """Make faust's "seek to committed offsets" also rewind input partitions that have no
    committed offset, to their beginning (the reset policy recur uses).

    Faust drops the records it fetched while its flow was stopped (around a rebalance) and
    relies on that seek to read them again; aiokafka's `seek_to_committed` leaves a partition
    without a committed offset where the fetcher got to. A worker that took over a killed
    worker's partitions before anyone committed them fetched every record on them in that
    window and lost them all (2,788 of 6,000 events in the rebalance test under CPU load:
    position at the end, nothing delivered). Changelog partitions are left alone: recovery
    seeks those itself. Relies on: `AIOKafkaConsumerThread.seek_to_committed()` (what faust's
    `perform_seek` calls) returning `{tp: committed offset or None}`, `call_thread`, and
    `app.tables.changelog_topics`."""
    seek = faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed
    if getattr(seek, "recur_rewinds_uncommitted", False):
        return

    async def seek_to_committed(self):  # noqa: ANN001, ANN202 - faust's signature
        changelogs = set(self.app.tables.changelog_topics)
        return await self.call_thread(seek_committed_or_beginning, self._ensure_consumer(), changelogs)

    seek_to_committed.recur_rewinds_uncommitted = True
    seek_to_committed.__wrapped__ = seek
    faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed = seek_to_committed


async def seek_committed_or_beginning(consumer, changelogs: set[str]) -> dict:  # noqa: ANN001 - aiokafka's
    """On the consumer's own loop: seek every assigned partition to its committed offset, and
    the input partitions that have none to their beginning. -> {tp: committed offset or None}."""
    offsets = await consumer.seek_to_committed()
    fresh = [tp for tp, offset in offsets.items() if not (offset and offset > 0) and tp.topic not in changelogs]
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    return offsets


def hold_flow_until_seek(app: faust.App) -> None:
    """After a rebalance, keep the consumer from delivering events until recovery has sought the
    input partitions back to their committed offsets.

    Faust 0.15.3's recovery resumes the consumer's flow early (to read changelogs, or at once
    when nothing needs restoring), then resumes the input partitions, seeks (a round trip to the
    broker) and resumes the flow again, which clears the agents' queues. Events fetched in that
    window reached the queue and were cleared, while the fetcher counted them as read and its gap
    bookkeeping let the commit pass them: a worker that took over a stopped worker's partitions
    lost a few events per partition (faust-streaming issue 596 is about the same window).
    Recovery sends `on_rebalance_complete` just before it resumes the partitions and seeks, so
    stopping the flow there makes the fetcher wait for the seek. Relies on: that signal's place
    in recovery, `consumer.stop_flow()` and `flow_control.suspend()`."""

    async def hold(sender: object, **kwargs: object) -> None:
        app.consumer.stop_flow()
        app.flow_control.suspend()

    app.on_rebalance_complete.connect(hold)  # a strong reference


def restore_before_recovery(app: faust.App, hook: RestoreHook) -> None:
    """Run `hook(recovery, tps, offsets, highwaters)` in each recovery of `app`, after faust has
    read the active changelog partitions' highwaters and before it seeks them: the hook may
    restore records into the partitions' stores itself and move `offsets` ({tp: last offset in the
    store}) on, and faust's per-record recovery then reads only what is left.

    Faust's recovery turns every changelog record into a message and an event object and runs it
    through its conductor: ~9,500 records/s here, so 1,000,000 users took 106 s; the same records
    read by one consumer and written in RocksDB write batches take ~5 s. Relies on:
    `Recovery._build_offsets(consumer, tps, destination, title)` being called with title "active"
    after `active_highwaters` is built and before `_seek_offsets`, `destination` starting from
    each partition's persisted offset and keeping the larger of it and the log's start, and
    `active_highwaters[tp]` being the partition's last offset (-1 when empty)."""
    build = Recovery._build_offsets
    if not getattr(build, "recur_restores", False):

        async def _build_offsets(self, consumer, tps, destination, title):  # noqa: ANN001, ANN202 - faust's
            hook = _RESTORE_HOOKS.get(self.app)
            if hook is not None and title == "active" and tps:
                await hook(self, set(tps), destination, self.active_highwaters)
            return await build(self, consumer, tps, destination, title)

        _build_offsets.recur_restores = True
        _build_offsets.__wrapped__ = build
        Recovery._build_offsets = _build_offsets
    _RESTORE_HOOKS[app] = hook


def recovery_cancelled(recovery: Recovery, tp: TP) -> bool:
    """Whether a restore of `tp` should stop: a new rebalance began, the partition is no longer
    this worker's, or the worker is stopping. Relies on: `signal_recovery_start`, `active_tps`,
    `should_stop`."""
    return recovery.signal_recovery_start.is_set() or tp not in recovery.active_tps or recovery.should_stop



def recovery_of(app: faust.App) -> Recovery:
    """The app's table recovery service. Relies on: `app.tables.recovery`."""
    return app.tables.recovery


def recovery_progress(recovery: Recovery) -> tuple[bool, int]:
    """(whether the worker is restoring tables, changelog records its active partitions still have
    to read). Relies on: `in_recovery` and `active_remaining_total()` (the highwaters faust read
    less the offsets it has applied)."""
    return bool(recovery.in_recovery), int(recovery.active_remaining_total())


def restart_recovery(recovery: Recovery) -> None:
    """Make faust's recovery start over, as a new rebalance does: its waits end with RebalanceAgain
    and its loop reads highwaters and offsets again and seeks the changelogs back. Relies on:
    `signal_recovery_start` (what `Recovery.on_rebalance` sets and `_restart_recovery` waits for)."""
    recovery.signal_recovery_start.set()

def kafka_producer(app: faust.App):  # noqa: ANN201 - aiokafka's AIOKafkaProducer
    """The aiokafka producer under faust's (for its batch API, `pipeline/producing.py`); the
    same one faust flushes before it commits. Relies on: `Producer._ensure_producer()`."""
    return app.producer._ensure_producer()


def set_producer_buffer(app: faust.App, messages: int) -> None:
    """Table writes queue in faust's producer buffer; its default cap (100 messages) makes every
    batch wait for the changelog a hundred records at a time. Relies on: `producer.buffer.max_messages`."""
    app.producer.buffer.max_messages = messages


# -- events and the agent's queue -----------------------------------------------------------
def bind_current_event(event: EventT) -> None:
    """Make `event` the current event of this task only (faust files a table write under the
    current event's partition). Relies on: the context variable `faust.streams._current_event`.

    Not `stream._set_current_event`: that also sets the stream's attribute, which
    take_events()' background task reads to pair the next message with its event; overwriting
    it pairs a new message with an old event (one lost, one repeated)."""
    faust_streams._current_event.set(weakref.ref(event))


def agent_queue(stream: faust.StreamT) -> asyncio.Queue:
    """The queue faust's consumer fills for an agent's stream. Relies on: `stream.channel.queue`
    (an asyncio.Queue subclass; faust ends it with StopAsyncIteration when the worker stops)."""
    return stream.channel.queue


def take(app: faust.App, event: EventT) -> bool:
    """What faust's stream does with each event it takes: an event fetched before the current
    rebalance (another generation, or taken while the flow is suspended) is left out, because
    faust seeks back and the partition's owner reads it again (-> False); any other is marked in
    flight until acked, so that a rebalance waits for it before it commits (-> True). Relies on:
    `message.generation_id`, `app.consumer_generation_id`, `message.tracked`, `consumer.unacked`."""
    msg = event.message
    if msg.generation_id != app.consumer_generation_id or not app.flow_control.is_active():
        return False
    if not msg.tracked:
        msg.tracked = True
        app.consumer.unacked.add(msg)
    return True


def ack_all(app: faust.App, events: Iterable[EventT]) -> None:
    """`event.ack()` for each event of a batch, with the same bookkeeping, in one pass under one
    hold of faust's ack lock: faust's path is five calls and three lock acquisitions an event
    (Event.ack -> Message.ack -> decref -> ConsumerMessage.on_final_ack -> Consumer.ack), ~3 µs
    of the worker's ~140 in a `recur bench e2e` profile. A message is acked when its last
    reference is released; a consumer message's offset then becomes committable (unless it is
    below the committed offset or already acked), and a rebalance waiting for acks is woken once.
    Relies on: `faust.types.tuples.ack_lock`, `message.acked` / `refcount` / `tp` / `offset`,
    the consumer's `_committed_offset`, `_acked_index`, `_acked`, `_n_acked`, `_unacked_messages`,
    `_waiting_for_ack`, and `app.topics.acks_enabled_for`."""
    consumer = app.consumer
    acking = app.topics.acks_enabled_for
    committed_offsets, acked_index, acked, unacked = (consumer._committed_offset, consumer._acked_index,
                                                      consumer._acked, consumer._unacked_messages)
    woken = False
    with ack_lock:
        for event in events:
            msg = event.message
            if msg.acked:
                continue
            msg.refcount = refcount = max(msg.refcount - 1, 0)
            if refcount:
                continue
            msg.acked = True
            if not isinstance(msg, ConsumerMessage) or not acking(msg.topic):
                continue
            woken = True
            tp, offset = msg.tp, msg.offset
            committed = committed_offsets[tp]
            if committed is None or offset >= committed:
                index = acked_index[tp]
                if offset not in index:
                    unacked.discard(msg)
                    index.add(offset)
                    acked[tp].append(offset)
                    consumer._n_acked += 1
        if woken:
            notify(consumer._waiting_for_ack)


# -- the table's RocksDB store --------------------------------------------------------------
def raw_rocksdb(table: TableT) -> bool:
    """True when the table's store is faust's RocksDB store on rocksdict and keeps keys and values
    as the bytes given. Relies on: `store.use_rocksdict`, `_db_for_partition`, `_encode_key`,
    `_encode_value`."""
    store = table.data
    return (bool(getattr(store, "use_rocksdict", False)) and hasattr(store, "_db_for_partition")
            and store._encode_key(b"k") == b"k" and store._encode_value(b"v") == b"v")


def partition_db(table: TableT, partition: int):  # noqa: ANN201 - a rocksdict.Rdict
    """The rocksdict database of one table partition (opened on first use)."""
    return table.data._db_for_partition(partition)


def active_dbs(table: TableT) -> Iterator:
    """The rocksdict databases of the partitions this worker owns (not standbys). Relies on:
    `store._dbs_for_actives()`."""
    return table.data._dbs_for_actives()


def offset_key(table: TableT) -> bytes:
    """The key under which faust keeps a partition's changelog offset in its database."""
    return table.data.offset_key


def persisted_offset_entry(table: TableT, offset: int) -> tuple[bytes, bytes]:
    """The key and value faust's RocksDB store keeps a partition's changelog offset under (what
    `set_persisted_offset` writes), to put in the same write batch as the records."""
    return table.data.offset_key, str(offset).encode()


def set_persisted_offset(table: TableT, partition: int, offset: int) -> None:
    """Record that the changelog holds everything up to `offset` for `partition` (recovery reads
    on from there). Relies on: `store.set_persisted_offset(TP, offset)`."""
    table.data.set_persisted_offset(TP(table.changelog_topic.get_topic_name(), partition), offset)
