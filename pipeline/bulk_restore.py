"""Restore the user-state changelog into the table's RocksDB store in bulk.

When a worker is given partitions whose local store is behind their changelog (an empty disk, a
new container, partitions taken over from another worker), faust's recovery reads the missing
records one message and one event object at a time: ~9,500 records/s here, 106 s for 1,000,000
users. Before that, this module reads them with one plain consumer and writes them with one
RocksDB write batch per fetched chunk, the partition's changelog offset in the same batch, so a
crash or a rebalance mid-restore leaves every partition's store consistent with its offset. Faust
then reads on from there (the records written meanwhile). Partitions with fewer than
`bulk_restore_min_records` records to read are left to faust, until a recovery of this worker
stalled (`pipeline/recovery_watch.py`): from then on every partition with records to read is read
here. Hooked into faust's recovery by `faust_internals.restore_before_recovery`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.types import TP, TableT

from pipeline import faust_internals as internals
from pipeline import security
from pipeline.config import Settings

log = logging.getLogger(__name__)

CHUNK = 5000  # records per fetch and write batch: ~10-25 ms of the event loop each
STALL_S = 30.0  # no record for this long: leave the rest to faust
PROGRESS_S = 10.0  # a progress line this often during a long restore


@dataclass
class Threshold:
    """The records a partition must have left to read for the bulk restore to take it."""

    min_records: int

    def lower(self) -> None:
        """After a stalled recovery: take every partition that has records to read, so that they
        are read by this module's own consumer instead of the one faust's recovery waited on."""
        self.min_records = 1


def plan(tps: set[TP], offsets: dict[TP, int | None], highwaters: dict[TP, int],
         min_records: int) -> dict[TP, tuple[int, int]]:
    """{tp: (first offset to read, last offset to read)} for the partitions worth a bulk read."""
    todo = {}
    for tp in sorted(tps):
        last = highwaters.get(tp)
        if last is None or last < 0:
            continue
        stored = offsets.get(tp)
        first = stored + 1 if stored is not None and stored >= 0 else 0
        if last - first + 1 >= min_records:
            todo[tp] = (first, last)
    return todo


async def restore(settings: Settings, threshold: Threshold, table: TableT, recovery: Any, tps: set[TP],
                  offsets: dict[TP, int | None], highwaters: dict[TP, int]) -> int:
    """Read the planned partitions' records up to faust's highwaters into the store and move
    `offsets` on. -> records written."""
    if not internals.raw_rocksdb(table):
        return 0
    todo = plan(tps, offsets, highwaters, threshold.min_records)
    if not todo:
        return 0
    started = time.monotonic()
    total = sum(last - first + 1 for first, last in todo.values())
    log.info("restore: reading about %d changelog records of %d partition(s) in bulk: %s", total, len(todo),
             ", ".join(f"{tp.partition}: {first}..{last}" for tp, (first, last) in todo.items()))
    consumer = AIOKafkaConsumer(
        **security.aiokafka(settings), enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20, client_id=f"{settings.app_id}-restore")
    written = 0
    try:
        await consumer.start()
        parts = {TopicPartition(tp.topic, tp.partition): tp for tp in todo}
        consumer.assign(list(parts))
        for part, tp in parts.items():
            consumer.seek(part, todo[tp][0])
        written = await _copy(consumer, table, recovery, parts, todo, offsets, total)
    except Exception:  # noqa: BLE001 - a failed bulk read is not fatal: faust reads on from the offsets
        log.exception("restore: the bulk read stopped; faust's recovery reads on from the last offsets written")
    finally:
        await consumer.stop()
    seconds = time.monotonic() - started
    log.info("restore: %d changelog records written in bulk in %.1f s (%d records/s)", written, seconds,
             written / max(seconds, 1e-3))
    return written


async def _copy(consumer: AIOKafkaConsumer, table: TableT, recovery: Any, parts: dict[TopicPartition, TP],
                todo: dict[TP, tuple[int, int]], offsets: dict[TP, int | None], total: int = 0) -> int:
    from rocksdict import WriteBatch

    pending, written = set(parts), 0
    last_progress = last_said = time.monotonic()
    while pending:
        for part in list(pending):
            if internals.recovery_cancelled(recovery, parts[part]):
                pending.discard(part)  # a new rebalance: faust's recovery starts over with it
        if not pending:
            break
        fetched = await consumer.getmany(*pending, timeout_ms=500, max_records=CHUNK)
        for part, records in fetched.items():
            tp = parts[part]
            last = todo[tp][1]
            batch, applied, count = WriteBatch(raw_mode=True), None, 0
            for record in records:
                if record.offset > last:
                    break
                if record.value is None:
                    batch.delete(record.key)
                else:
                    batch.put(record.key, record.value)
                applied = record.offset
                count += 1
            if applied is not None:
                batch.put(*internals.persisted_offset_entry(table, applied))
                internals.partition_db(table, tp.partition).write(batch)
                offsets[tp] = applied
                written += count
                last_progress = time.monotonic()
        for part in list(pending):
            if await consumer.position(part) > todo[parts[part]][1]:
                pending.discard(part)
                _read_through(table, parts[part], todo[parts[part]][1], offsets)
        if pending and time.monotonic() - last_said > PROGRESS_S:
            last_said = time.monotonic()
            log.info("restore: %d of about %d changelog records written", written, total)
        if pending and time.monotonic() - last_progress > STALL_S:
            log.warning("restore: no changelog records for %.0f s; faust's recovery reads the rest", STALL_S)
            break
    return written


def _read_through(table: TableT, tp: TP, last: int, offsets: dict[TP, int | None]) -> None:
    """The consumer is past `last`: every record up to it is in the store. Where the partition's
    last offsets hold no record (a transaction's commit marker, records compacted away), the
    store's offset moves on to `last` as well; faust's recovery would otherwise wait for records
    at those offsets, which no consumer is ever given."""
    stored = offsets.get(tp)
    if stored is not None and stored >= last:
        return
    internals.set_persisted_offset(table, tp.partition, last)
    log.info("restore: partition %d read through offset %d (offsets %d..%d hold no record)", tp.partition, last,
             (stored if stored is not None else -1) + 1, last)
    offsets[tp] = last
