"""Batched reads and writes of the user-state table's local store.

Faust's table API reads and writes one key at a time through several layers (a sensor call,
a membership test and a second lookup per read, key and value serializers, the current event's
partition per write): ~20-30 µs a key, as much as the model step per event. The agent reads and
writes a whole batch, so on RocksDB this goes straight to each partition's database: one
multi-get per partition to read, one write batch per partition to write. A user's state lives
in the database of the partition of that user's events (the table's partition: the events topic
is keyed by user id and the table uses the partitioner), which is where faust itself files a
write made while one of the user's events is current. Any other store (`memory://`), or a
table whose serializers would change the bytes, goes through the table as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from faust.types import EventT


class StateStore:
    def __init__(self, table) -> None:  # noqa: ANN001 - a faust Table with bytes keys and values
        self.table = table
        store = table.data
        self.direct = (
            bool(getattr(store, "use_rocksdict", False))
            and hasattr(store, "_db_for_partition")
            and store._encode_key(b"k") == b"k"
            and store._encode_value(b"v") == b"v"
        )
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
            found.update(zip(part_keys, self.table.data._db_for_partition(partition).get(part_keys)))
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
        batches: dict[int, object] = {}
        for key, value, event in items:
            partition = event.message.partition
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self._write_batch(raw_mode=True)
            batch.put(key, value)
        for partition, batch in batches.items():
            self.table.data._db_for_partition(partition).write(batch)
