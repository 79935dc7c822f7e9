"""Batched reads and writes of the user-state table's local store.

Faust's table API reads and writes one key at a time through several layers (a sensor call,
a membership test and a second lookup per read, key and value serializers, the current event's
partition per write): ~20-30 µs a key, as much as the model step per event. The agent reads and
writes a whole batch, so on RocksDB this goes straight to each partition's database: a get per
key to read (rocksdict's multi-get was slower), one write batch per partition to write. A user's state lives
in the database of the partition of that user's events (the table's partition: the events topic
is keyed by user id and the table uses the partitioner), which is where faust itself files a
write made while one of the user's events is current. Any other store (`memory://`), or a
table whose serializers would change the bytes, goes through the table as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from faust.types import EventT

from pipeline import faust_internals as internals

COUNT_CHUNK = 2_000  # keys counted between two turns of the event loop (~0.5 ms)
COUNT_SHARE = 0.05  # at most this share of the event loop's time goes to counting


class StateStore:
    def __init__(self, table) -> None:  # noqa: ANN001 - a faust Table with bytes keys and values
        self.table = table
        self.direct = internals.raw_rocksdb(table)
        if self.direct:
            from rocksdict import WriteBatch

            self._write_batch = WriteBatch

    def read(self, keys: dict[bytes, int]) -> dict[bytes, bytes | None]:
        """{key: partition} -> {key: stored value, None where there is none}."""
        if not self.direct:
            return {key: self.table.get(key) for key in keys}
        by_partition: dict[int, list[bytes]] = {}
        for key, partition in keys.items():
            by_partition.setdefault(partition, []).append(key)
        found: dict[bytes, bytes | None] = {}
        for partition, part_keys in by_partition.items():
            # a get per key: rocksdict's get of a list (a multi-get) took 1.6 - 2.0 times as long
            # a key (256 of 100,000 keys, faust's options)
            get = internals.partition_db(self.table, partition).get
            for key in part_keys:
                found[key] = get(key)
        return found

    def write(self, items: Iterable[tuple[bytes, bytes, EventT]], bind: Callable[[EventT], None]) -> None:
        """Store (key, value, event) triples, each in the partition of its event.
        `bind(event)` makes `event` faust's current event (the table path files a write under it)."""
        if not self.direct:
            data = self.table.data
            for key, value, event in items:
                bind(event)
                data[key] = value
            return
        batches: dict[int, Any] = {}
        for key, value, event in items:
            partition = event.message.partition
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self._write_batch(raw_mode=True)
            batch.put(key, value)
        for partition, batch in batches.items():
            internals.partition_db(self.table, partition).write(batch)

    def delete(self, key: bytes, partition: int) -> bool:
        """Remove one user's state from the local store (the caller sends the changelog's
        tombstone). -> whether there was one."""
        if not self.direct:
            return self.table.data.pop(key, None) is not None
        db = internals.partition_db(self.table, partition)
        existed = db.get(key) is not None
        if existed:
            db.delete(key)
        return existed

    async def count(self, share: float = COUNT_SHARE) -> int:
        """Users with state in the partitions this worker owns, exactly: every key of each
        partition's database, in chunks, pausing after each so that counting takes at most
        `share` of the event loop. Counting is ~0.23 s of work per million users (100,000: 23
        ms); at full speed, ten million users would take ~2.3 s of a loop that is ~90% busy at
        half load, all at once, and the events behind it would wait. At 5%, a million users take
        ~5 s. Not RocksDB's `estimate-num-keys`: that counts every overwrite
        not yet compacted (1,247 for 233 users). Users written during the count may be left out."""
        if not self.direct:
            return len(self.table)
        skip = internals.offset_key(self.table)
        total = 0
        for db in list(internals.active_dbs(self.table)):
            keys = db.keys()
            while True:
                started = time.perf_counter()
                chunk = list(islice(keys, COUNT_CHUNK))
                if not chunk:
                    break
                total += len(chunk) - chunk.count(skip)
                await asyncio.sleep((time.perf_counter() - started) * (1 / share - 1))
        return total
