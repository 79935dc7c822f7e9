"""Parquet snapshots of the events the worker consumes, for offline retraining.

Schema (one row per user per file; zstd):
    user_id          string
    partition        int32     input partition
    first_offset     int64     smallest input offset in the row
    last_offset      int64     largest input offset in the row
    offsets          list<int64>   one per event, ascending
    item_ids         list<string>
    event_types      list<int8>    0 = click, 1 = purchase
    timestamps_ms    list<int64>   event time, epoch ms
    snapshot_time    timestamp[ms, UTC]

Layout: <root>/dt=YYYY-MM-DD/hour=HH/p<partition>-<first offset>-<last offset>.parquet, the
hour being the events' own hour (UTC). The name depends only on the events it holds, so a
snapshot redone after a crash rewrites the same file. Each file is written under a hidden
temporary name, closed, then renamed: readers never see a partial file. Readers
(`models/data.py`) drop duplicates by (partition, offset).

Durability: the snapshot agent acks an input event only after the file holding it is written,
and Faust commits an offset only when every agent acked it; what was not written is delivered
again after a crash.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from models.events import Event

log = logging.getLogger(__name__)

# the snapshot consumer asks the broker for at least this much per fetch, waiting up to
# SNAPSHOT_FETCH_WAIT_MS: snapshots are written once a minute, and with aiokafka's defaults
# (any data at once) it fetched a few records at a time at live rates, each fetch and its
# decoding work on the worker's event loop (worker CPU per event at ~1,400 events/s: see README)
SNAPSHOT_FETCH_MIN_BYTES = 256 * 1024
SNAPSHOT_FETCH_WAIT_MS = 500

# a flush also happens once this many events are buffered: writing them takes the GIL for a
# while (~0.25 s per 50,000 events), and smaller flushes keep each stall of the worker short
FLUSH_EVENTS = 50_000

SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("partition", pa.int32()),
    ("first_offset", pa.int64()),
    ("last_offset", pa.int64()),
    ("offsets", pa.list_(pa.int64())),
    ("item_ids", pa.list_(pa.string())),
    ("event_types", pa.list_(pa.int8())),
    ("timestamps_ms", pa.list_(pa.int64())),
    ("snapshot_time", pa.timestamp("ms", tz="UTC")),
])


class Buffer:
    """Events waiting for the next snapshot, one list per column.

    Not a list of event objects: those lived until the next flush, and Python's cyclic GC runs a
    full collection each time its long-lived objects grow by a quarter. Measured in the worker
    (bench e2e, gc callbacks): with ~100,000 such objects buffered, a full collection every
    1.5-2 s under a backlog and every ~5 s at half load, 17-63 ms each, freeing nothing; the
    event loop stood still meanwhile (the p99 stalls in README). Strings and ints are not tracked
    by the collector, so six lists of them cost it nothing however long they grow."""

    __slots__ = ("user_id", "partition", "offset", "item_id", "event_type", "timestamp_ms")

    def __init__(self) -> None:
        for column in self.__slots__:
            setattr(self, column, [])

    def add(self, partition: int, offset: int, event: Event) -> None:
        self.user_id.append(event.user_id)
        self.partition.append(partition)
        self.offset.append(offset)
        self.item_id.append(event.item_id)
        self.event_type.append(event.event_type)
        self.timestamp_ms.append(event.timestamp_ms)

    def extend(self, other: Buffer) -> None:
        for column in self.__slots__:
            getattr(self, column).extend(getattr(other, column))

    def __len__(self) -> int:
        return len(self.offset)

    def to_arrow(self) -> pa.Table:
        return pa.table({
            "user_id": pa.array(self.user_id, pa.string()),
            "partition": pa.array(self.partition, pa.int32()),
            "offset": pa.array(self.offset, pa.int64()),
            "item_id": pa.array(self.item_id, pa.string()),
            "event_type": pa.array(self.event_type, pa.int8()),
            "timestamp_ms": pa.array(self.timestamp_ms, pa.int64()),
        })


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """A local folder or a pyarrow.fs URI (s3://bucket/prefix, file:///...)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return pafs.LocalFileSystem(), str(path)


HOUR_MS = 3_600_000


def _hour_dir(ts_ms: int) -> str:
    return _hour_dir_of(ts_ms // HOUR_MS)


@functools.lru_cache(maxsize=4096)
def _hour_dir_of(hours: int) -> str:
    t = datetime.fromtimestamp(hours * 3600, tz=UTC)
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


def to_table(flat: pa.Table, snapshot_ms: int) -> pa.Table:
    """Buffered events (`Buffer.to_arrow()`) -> one row per (user, partition), rows in order of
    their first offset, each row's events in offset order. Grouped by pyarrow, not in Python:
    this runs on a thread beside the worker's event loop, and Python loops here held the GIL for
    ~2 s per 200,000 events, which stalled the loop (recommendation latency) for as long."""
    flat = flat.sort_by([("partition", "ascending"), ("offset", "ascending")])
    rows = flat.group_by(["user_id", "partition"], use_threads=False).aggregate([
        ("offset", "min"), ("offset", "max"), ("offset", "list"), ("item_id", "list"),
        ("event_type", "list"), ("timestamp_ms", "list"),
    ]).sort_by([("offset_min", "ascending"), ("partition", "ascending")])
    return pa.table({
        "user_id": rows["user_id"],
        "partition": rows["partition"],
        "first_offset": rows["offset_min"],
        "last_offset": rows["offset_max"],
        "offsets": rows["offset_list"],
        "item_ids": rows["item_id_list"],
        "event_types": rows["event_type_list"],
        "timestamps_ms": rows["timestamp_ms_list"],
        "snapshot_time": pa.array([snapshot_ms] * rows.num_rows, pa.timestamp("ms", tz="UTC")),
    }, schema=SCHEMA)


def write_atomic(filesystem: pafs.FileSystem, path: str, table: pa.Table) -> int:
    """Write under a hidden temporary name, then rename. -> bytes written."""
    folder, name = path.rsplit("/", 1)
    filesystem.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.tmp-{os.getpid()}"
    with filesystem.open_output_stream(tmp) as out:
        pq.write_table(table, out, compression="zstd")
    if isinstance(filesystem, pafs.LocalFileSystem):
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
    filesystem.move(tmp, path)
    return filesystem.get_file_info(path).size


def write_snapshot(root: str, events: Buffer) -> list[tuple[str, int, int]]:
    """Write `events`, one file per input partition and event hour -> [(relative path, rows, bytes)]."""
    flat = events.to_arrow()
    if flat.num_rows == 0:
        return []
    flat = flat.append_column("hour", pc.divide(flat["timestamp_ms"], HOUR_MS))  # timestamps > 0: floor
    filesystem, base = open_root(root)
    now_ms = int(time.time() * 1000)
    written = []
    keys = flat.group_by(["partition", "hour"], use_threads=False).aggregate([])
    for part, hour in zip(keys["partition"].to_pylist(), keys["hour"].to_pylist(), strict=True):
        group = flat.filter(pc.and_(pc.equal(flat["partition"], part), pc.equal(flat["hour"], hour)))
        bounds = pc.min_max(group["offset"])
        rel = f"{_hour_dir_of(hour)}/p{part:03d}-{bounds['min'].as_py():012d}-{bounds['max'].as_py():012d}.parquet"
        table = to_table(group, now_ms)
        size = write_atomic(filesystem, f"{base}/{rel}", table)
        written.append((rel, table.num_rows, size))
    return written


@dataclass
class FileInfo:
    path: str  # relative to the root
    rows: int
    users: int
    events: int
    first_ms: int
    last_ms: int
    size: int


def list_files(root: str) -> list[FileInfo]:
    """Every snapshot file under `root` (hidden temporary files excluded)."""
    filesystem, base = open_root(root)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(base):].lstrip("/")
        if info.type != pafs.FileType.File or not rel.endswith(".parquet") or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        table = pq.read_table(info.path, filesystem=filesystem, columns=["user_id", "timestamps_ms"])
        flat = pc.list_flatten(table["timestamps_ms"])
        out.append(FileInfo(rel, table.num_rows, len(pc.unique(table["user_id"])), len(flat),
                            pc.min(flat).as_py() or 0, pc.max(flat).as_py() or 0, info.size))
    return out


def compact(root: str, before_ms: int | None = None) -> list[tuple[str, int]]:
    """Merge the files of each partition within each past hour into one file.

    Rows are kept as they are, so a reader (which drops duplicates by partition and offset)
    sees the same events. The merged file is written atomically before the small ones are
    removed; a crash in between leaves duplicates that readers drop. -> [(new file, merged)]
    """
    filesystem, base = open_root(root)
    now_hour = _hour_dir(before_ms if before_ms is not None else int(time.time() * 1000))
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in list_files(root):
        hour_dir, name = f.path.rsplit("/", 1)
        if hour_dir >= now_hour:
            continue  # the current hour may still be written to
        groups[(hour_dir, name.split("-")[0])].append(f.path)
    merged = []
    for (hour_dir, part), paths in sorted(groups.items()):
        if len(paths) < 2:
            continue
        table = pa.concat_tables([pq.read_table(f"{base}/{p}", filesystem=filesystem) for p in paths])
        first = pc.min(table["first_offset"]).as_py()
        last = pc.max(table["last_offset"]).as_py()
        target = f"{hour_dir}/{part}-{first:012d}-{last:012d}.parquet"
        write_atomic(filesystem, f"{base}/{target}", table)
        for p in paths:
            if p != target:
                filesystem.delete_file(f"{base}/{p}")
        merged.append((target, len(paths)))
    return merged


def snapshot_group(app_id: str) -> str:
    """The snapshot consumer's own consumer group."""
    return f"{app_id}-snapshots"


class SnapshotConsumer:
    """Reads the events topic in its own consumer group (<app_id>-snapshots) and commits an
    offset only after the Parquet file holding the event is written. Independent of Faust's
    acks: the worker's own commits are never held back by snapshots, and after a crash the
    snapshot group re-reads what was not written."""

    def __init__(self, settings, metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pending = Buffer()
        self.offsets: dict = {}  # TopicPartition -> next offset to commit
        self.consumer = None
        self.stopping = False
        self.done = None  # asyncio.Event set when run() has flushed and closed

    def _client_options(self) -> dict:
        s = self.settings
        opts = {"bootstrap_servers": s.bootstrap_servers, "security_protocol": s.security_protocol}
        if s.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                        sasl_plain_password=s.sasl_password)
        if s.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            opts["ssl_context"] = ssl.create_default_context(cafile=s.ssl_cafile or None)
        return opts

    async def run(self) -> None:
        import asyncio

        from aiokafka import AIOKafkaConsumer
        from aiokafka.abc import ConsumerRebalanceListener

        from models.errors import BadRecord
        from pipeline.records import decode_event

        owner = self

        class FlushOnRevoke(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                await owner.flush()

            async def on_partitions_assigned(self, assigned):
                pass

        self.done = asyncio.Event()
        s = self.settings
        self.consumer = AIOKafkaConsumer(group_id=snapshot_group(s.app_id), enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_min_bytes=SNAPSHOT_FETCH_MIN_BYTES,
                                         fetch_max_wait_ms=SNAPSHOT_FETCH_WAIT_MS, **self._client_options())
        self.consumer.subscribe([s.events_topic], listener=FlushOnRevoke())
        await self.consumer.start()
        last_flush = time.monotonic()
        try:
            while not self.stopping:
                # a few hundred records at a time: decoding runs on the worker's event loop
                batches = await self.consumer.getmany(timeout_ms=200, max_records=500)
                now_ms = int(time.time() * 1000)
                for tp, messages in batches.items():
                    for m in messages:
                        try:
                            event = decode_event(m.key, m.value, s.max_record_bytes, now_ms)
                        except BadRecord:
                            event = None  # a dead letter: the worker sends it to the DLQ
                        if event is not None:
                            self.pending.add(m.partition, m.offset, event)
                        self.offsets[tp] = m.offset + 1
                if time.monotonic() - last_flush >= s.snapshot_interval or len(self.pending) >= FLUSH_EVENTS:
                    await self.flush()
                    last_flush = time.monotonic()
            await self.flush()
        finally:
            await self.consumer.stop()
            self.done.set()

    async def flush(self) -> None:
        """Write what is buffered, then commit those offsets; on failure keep it and retry later."""
        import asyncio

        if not self.offsets:
            return
        batch, offsets = self.pending, dict(self.offsets)
        self.pending = Buffer()  # events read while this one is written go to the next
        started = time.perf_counter()
        try:
            written = await asyncio.get_running_loop().run_in_executor(
                None, write_snapshot, self.settings.snapshot_root, batch) if batch else []
        except Exception as e:  # disk full, permissions, object store errors: retried at the next flush
            self.metrics.snapshot_failures.inc()
            log.error("snapshot: writing %d events failed (%s); will retry", len(batch), type(e).__name__)
            batch.extend(self.pending)
            self.pending = batch
            return
        await self.consumer.commit(offsets)
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

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop reading, write and commit what is buffered."""
        import asyncio

        self.stopping = True
        if self.done is not None:
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                log.error("snapshot: final flush did not finish within %.0fs", timeout)
