"""The snapshot files: Parquet schema, atomic writes, listing, compaction and crash clean-up.

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
hour being the events' own hour (UTC). Each file is written under a hidden temporary name
(`.p<partition>-....parquet.tmp-<pid>`), closed, then renamed: readers never see a partial file.

Exactly once in the files: the snapshot consumer commits a partition's offset only after every
file holding its events is written. Whatever a crash left behind (files of a flush that was not
committed, temporary files) is at or past the offset the consumer will read again from, so
before it reads a partition it removes exactly that (`remove_uncommitted`); the events are then
written again, once. One snapshot folder per events topic: the names do not hold the topic.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from models.data import DEFAULT_SESSION_GAP_S, Session, sessionize
from models.errors import DataError
from models.events import Event

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
HOUR_MS = 3_600_000
NAME = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")
TEMPORARY = re.compile(r"^\.(p(\d+)-.*)\.tmp-\d+$")
STALE_TEMPORARY_SECONDS = 900  # `compact` removes temporary files older than this (a write takes seconds)


class Buffer:
    """Events waiting for the next snapshot, one list per column.

    Not a list of event objects: those lived until the next flush, and Python's cyclic GC runs a
    full collection each time its long-lived objects grow by a quarter. Measured in the worker
    (bench e2e, gc callbacks): with ~100,000 such objects buffered, a full collection every
    1.5-2 s under a backlog and every ~5 s at half load, 17-63 ms each, freeing nothing; the
    event loop stood still meanwhile. Strings and ints are not tracked by the collector, so six
    lists of them cost it nothing however long they grow."""

    __slots__ = ("user_id", "partition", "offset", "item_id", "event_type", "timestamp_ms")
    user_id: list[str]
    partition: list[int]
    offset: list[int]
    item_id: list[str]
    event_type: list[int]
    timestamp_ms: list[int]

    def __init__(self) -> None:
        for column in self.__slots__:
            setattr(self, column, [])

    def add(self, partition: int, offset: int, event: Event, user_id: str | None = None) -> None:
        """Buffer `event`; its user is stored as `user_id` when given (a pseudonym)."""
        self.user_id.append(event.user_id if user_id is None else user_id)
        self.partition.append(partition)
        self.offset.append(offset)
        self.item_id.append(event.item_id)
        self.event_type.append(event.event_type)
        self.timestamp_ms.append(event.timestamp_ms)

    def extend(self, other: Buffer) -> None:
        for column in self.__slots__:
            getattr(self, column).extend(getattr(other, column))

    def without(self, partitions: set[int]) -> Buffer:
        """The events of every other partition."""
        return self._keep([n for n, p in enumerate(self.partition) if p not in partitions])

    def without_users(self, users: set[str]) -> Buffer:
        """The events of every other user (as stored: pseudonyms when a key is set)."""
        return self._keep([n for n, u in enumerate(self.user_id) if u not in users])

    def _keep(self, keep: list[int]) -> Buffer:
        out = Buffer()
        for column in self.__slots__:
            values = getattr(self, column)
            setattr(out, column, [values[n] for n in keep])
        return out

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


def hour_dir(ts_ms: int) -> str:
    return _hour_dir_of(ts_ms // HOUR_MS)


@functools.lru_cache(maxsize=4096)
def _hour_dir_of(hours: int) -> str:
    t = datetime.fromtimestamp(hours * 3600, tz=UTC)
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


def to_table(flat: pa.Table, snapshot_ms: int) -> pa.Table:
    """Events, one per row (`Buffer.to_arrow()`, `flatten()`) -> one row per (user, partition),
    rows in order of their first offset, each row's events in offset order. Grouped by pyarrow,
    not in Python: this runs on a thread beside the worker's event loop, and Python loops here
    held the GIL for ~2 s per 200,000 events, which stalled the loop (recommendation latency)."""
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


def flatten(table: pa.Table) -> pa.Table:
    """Snapshot rows -> one row per event (the columns of `Buffer.to_arrow()`)."""
    parents = pc.list_parent_indices(table["offsets"])
    return pa.table({
        "user_id": pc.take(table["user_id"], parents),
        "partition": pc.take(table["partition"], parents),
        "offset": pc.list_flatten(table["offsets"]),
        "item_id": pc.list_flatten(table["item_ids"]),
        "event_type": pc.list_flatten(table["event_types"]),
        "timestamp_ms": pc.list_flatten(table["timestamps_ms"]),
    })


def distinct_events(flat: pa.Table) -> pa.Table:
    """Flat events -> the first copy of each (partition, offset)."""
    numbered = flat.append_column("row", pa.array(range(flat.num_rows), pa.int64()))
    first = numbered.group_by(["partition", "offset"], use_threads=False).aggregate([("row", "min")])
    return flat.take(first["row_min"])  # in any order: `to_table` sorts


def file_name(partition: int, first: int, last: int) -> str:
    return f"p{partition:03d}-{first:012d}-{last:012d}.parquet"


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


def write_events(filesystem: pafs.FileSystem, base: str, folder: str, flat: pa.Table, now_ms: int) -> tuple[str, int, int]:
    """Events of one partition and hour -> one file named by their offsets; -> (relative path, rows, bytes)."""
    bounds = pc.min_max(flat["offset"])
    rel = f"{folder}/{file_name(flat['partition'][0].as_py(), bounds['min'].as_py(), bounds['max'].as_py())}"
    table = to_table(flat, now_ms)
    return rel, table.num_rows, write_atomic(filesystem, f"{base}/{rel}", table)


def write_snapshot(root: str, events: Buffer) -> list[tuple[str, int, int]]:
    """Write `events`, one file per input partition and event hour -> [(relative path, rows, bytes)].
    A failure part-way leaves some files written; the caller removes them (`remove_uncommitted`)."""
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
        written.append(write_events(filesystem, base, _hour_dir_of(hour), group.drop_columns(["hour"]), now_ms))
    return written


def entries(filesystem: pafs.FileSystem, base: str) -> list[tuple[str, pafs.FileInfo]]:
    """(path relative to the root, info) of every file under the root, sorted."""
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(((i.path[len(base):].lstrip("/"), i) for i in infos if i.type == pafs.FileType.File),
                  key=lambda e: e[0])


def is_snapshot(rel: str) -> bool:
    return rel.endswith(".parquet") and not any(p.startswith((".", "_")) for p in rel.split("/"))


@dataclass
class Cleanup:
    files_removed: int = 0  # whole files of events not yet committed
    files_trimmed: int = 0  # files that held committed and uncommitted events, rewritten
    events_removed: int = 0
    temporary_removed: int = 0


def remove_uncommitted(root: str, positions: dict[int, int]) -> Cleanup:
    """{partition: offset the consumer reads again from} -> remove every event of those partitions
    at or past that offset from the files, and the partitions' temporary files. Run before the
    partitions are read (they are then written again), by the consumer that owns them."""
    filesystem, base = open_root(root)
    done = Cleanup()
    for rel, info in entries(filesystem, base):
        folder, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        tmp = TEMPORARY.match(name)
        if tmp and int(tmp.group(2)) in positions:
            filesystem.delete_file(info.path)
            done.temporary_removed += 1
            continue
        match = NAME.match(name)
        if not match or not is_snapshot(rel) or int(match.group(1)) not in positions:
            continue
        part, first, last = (int(g) for g in match.groups())
        position = positions[part]
        if last < position:
            continue
        flat = flatten(pq.read_table(info.path, filesystem=filesystem))
        keep = flat.filter(pc.less(flat["offset"], position))
        done.events_removed += flat.num_rows - keep.num_rows
        if keep.num_rows:  # a compacted file can hold both: keep what is committed
            new_rel, _, _ = write_events(filesystem, base, folder, keep, int(time.time() * 1000))
            done.files_trimmed += 1
            if new_rel == rel:
                continue
        else:
            done.files_removed += 1
        filesystem.delete_file(info.path)
    return done


HOUR_FOLDER = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")
WINDOW_MARGIN_HOURS = 24  # hour folders read before a window: sessions that began earlier keep their start


def _hour_of(rel: str) -> int | None:
    """The event hour (hours since the epoch) of a file under dt=YYYY-MM-DD/hour=HH/, else None."""
    m = HOUR_FOLDER.search(rel)
    if not m:
        return None
    return int(datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H").replace(tzinfo=UTC).timestamp()) // 3600


def files_in_window(root: str, window_s: float) -> tuple[pafs.FileSystem, list[str], int]:
    """The snapshot files of the event hours within `window_s` (plus a day) of the newest hour
    folder -> (filesystem, paths, files left out): a retraining run reads a week, not every
    hour ever kept."""
    filesystem, base = open_root(root)
    files = [(rel, info.path) for rel, info in entries(filesystem, base) if is_snapshot(rel)]
    hours = [_hour_of(rel) for rel, _ in files]
    known = [h for h in hours if h is not None]
    if not known:
        return filesystem, [path for _, path in files], 0
    cutoff = max(known) - int(window_s // 3600) - 1 - WINDOW_MARGIN_HOURS
    kept = [path for (_, path), h in zip(files, hours) if h is None or h >= cutoff]
    return filesystem, kept, len(files) - len(kept)


def read_events(root: str | Path, window_s: float | None = None) -> list[Event]:
    """Every event in the snapshot files under `root` (with `window_s`: only the files of the
    hours `files_in_window` keeps), each (partition, offset) once, in file order; event ids are
    "<partition>-<offset>" (what the worker names events without one)."""
    import pyarrow.dataset as ds

    try:
        if window_s is not None:
            filesystem, paths, _ = files_in_window(str(root), window_s)
            if not paths:
                return []
            dataset = ds.dataset(paths, filesystem=filesystem, format="parquet")
        else:
            dataset = ds.dataset(str(root), format="parquet", partitioning="hive", exclude_invalid_files=True)
        table = dataset.to_table(columns=["user_id", "partition", "offsets", "item_ids", "event_types", "timestamps_ms"])
    except Exception as e:  # pyarrow raises several unrelated types here
        raise DataError(f"read parquet: cannot read snapshots under {root}: {e}") from None
    seen: set[tuple[int, int]] = set()
    events = []
    for row in table.to_pylist():
        part = row["partition"]
        for off, item, etype, ts in zip(row["offsets"], row["item_ids"], row["event_types"], row["timestamps_ms"]):
            if (part, off) in seen:
                continue
            seen.add((part, off))
            events.append(Event(row["user_id"], item, int(etype), int(ts), event_id=f"{part}-{off}"))
    return events


def read_sessions(root: str | Path, session_gap_s: float = DEFAULT_SESSION_GAP_S,
                  window_s: float | None = None) -> list[Session]:
    """The snapshots' events cut into sessions (by user, at `session_gap_s` of inactivity), by
    start time; with `window_s` only from the files of the newest hours (`files_in_window`)."""
    if not Path(root).exists() and "://" not in str(root):
        raise DataError(f"read: {root} does not exist")
    sessions = sessionize(read_events(root, window_s), session_gap_s)
    sessions.sort(key=lambda s: (s.times[0], s.key))
    return sessions
