"""`recur snapshots ls` and `recur snapshots compact` (what is in the snapshot folder; merging each past
hour's small files), and the newest events a restarted worker rebuilds trending from. The files
themselves: `pipeline/snapshot_files.py`."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.snapshot_files import (
    NAME,
    STALE_TEMPORARY_SECONDS,
    TEMPORARY,
    distinct_events,
    entries,
    flatten,
    hour_dir,
    is_snapshot,
    open_root,
    write_events,
)


@dataclass
class FileInfo:
    path: str  # relative to the root
    rows: int
    users: int
    events: int  # events in this file
    first_ms: int
    last_ms: int
    size: int


@dataclass
class Listing:
    files: list[FileInfo]
    distinct_events: int  # over all files: each (partition, offset) once
    temporary_files: int


def list_files(root: str) -> Listing:
    """Every snapshot file under `root`, and the distinct events over all of them."""
    filesystem, base = open_root(root)
    out, keys, temporary = [], [], 0
    for rel, info in entries(filesystem, base):
        if TEMPORARY.match(rel.rsplit("/", 1)[-1]):
            temporary += 1
        if not is_snapshot(rel):
            continue
        table = pq.read_table(info.path, filesystem=filesystem, columns=["user_id", "partition", "offsets", "timestamps_ms"])
        times = pc.list_flatten(table["timestamps_ms"])
        out.append(FileInfo(rel, table.num_rows, len(pc.unique(table["user_id"])), len(times),
                            pc.min(times).as_py() or 0, pc.max(times).as_py() or 0, info.size))
        parents = pc.list_parent_indices(table["offsets"])
        keys.append(pa.table({"partition": pc.take(table["partition"], parents),
                              "offset": pc.list_flatten(table["offsets"])}))
    distinct = 0
    if keys:
        distinct = pa.concat_tables(keys).group_by(["partition", "offset"], use_threads=False).aggregate([]).num_rows
    return Listing(out, distinct, temporary)


def compact(root: str, before_ms: int | None = None) -> list[tuple[str, int]]:
    """Merge the files of each partition within each past hour into one file, each event once
    (copies left by versions before 0.2 are dropped), and remove stale temporary files.

    The merged file is written atomically before the small ones are removed; a crash in between
    leaves copies that the next `compact` (and every reader of recur) drops. -> [(new file, merged)]
    """
    filesystem, base = open_root(root)
    now = time.time()
    now_hour = hour_dir(int(now * 1000) if before_ms is None else before_ms)
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for rel, info in entries(filesystem, base):
        name = rel.rsplit("/", 1)[-1]
        if TEMPORARY.match(name) and info.mtime is not None and now - info.mtime.timestamp() > STALE_TEMPORARY_SECONDS:
            filesystem.delete_file(info.path)
            continue
        match = NAME.match(name)
        if match and is_snapshot(rel) and "/" in rel and rel.rsplit("/", 1)[0] < now_hour:
            groups[(rel.rsplit("/", 1)[0], int(match.group(1)))].append(rel)
    merged = []
    for (folder, _part), paths in sorted(groups.items()):
        if len(paths) < 2:
            continue
        flat = distinct_events(flatten(pa.concat_tables(
            [pq.read_table(f"{base}/{p}", filesystem=filesystem) for p in paths])))
        target, _, _ = write_events(filesystem, base, folder, flat, int(time.time() * 1000))
        for p in paths:
            if p != target:
                filesystem.delete_file(f"{base}/{p}")
        merged.append((target, len(paths)))
    return merged


def recent_items(root: str, n: int) -> list[str]:
    """The items of the newest `n` events in the snapshots (by event time), oldest first: what
    rebuilds the cold-start trending window after a restart. Reads the newest hours only."""
    filesystem, base = open_root(root)
    by_hour: dict[str, list[str]] = defaultdict(list)
    for rel, info in entries(filesystem, base):
        if is_snapshot(rel) and "/" in rel:
            by_hour[rel.rsplit("/", 1)[0]].append(info.path)
    flat = None
    for hour in sorted(by_hour, reverse=True):
        tables = [flatten(pq.read_table(path, filesystem=filesystem)) for path in by_hour[hour]]
        flat = distinct_events(pa.concat_tables(tables if flat is None else [flat, *tables]))
        if flat.num_rows >= n:
            break
    if flat is None:
        return []
    flat = flat.sort_by([("timestamp_ms", "ascending"), ("partition", "ascending"), ("offset", "ascending")])
    return flat["item_id"].to_pylist()[-n:] if n else []
