"""A batch's records for one topic, sent a partition at a time with aiokafka's batch API.

`producer.send()` costs several microseconds a record in Python: a metadata wait, the
partitioner, a future for the record, and later one more callback to resolve it. The worker
sends two records per event (the user's new state to the changelog, the recommendation), so it
builds one aiokafka `BatchBuilder` per partition instead (~0.3 µs a record) and hands each to
`send_batch`: one future per partition and batch. Records keep their order within a partition,
and `producer.flush()` waits for these batches like any other, so faust's flush before it
commits input offsets still covers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

_default_partitioner = DefaultPartitioner()


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's (and the Java client's) default partitioner picks for `key`:
    murmur2 of the key over the topic's partitions."""
    return _default_partitioner(key, list(partitions), list(partitions))


class PartitionBatches:
    """Records for `topic`, grouped by partition, for one `submit()`."""

    def __init__(self, producer, topic: str) -> None:  # noqa: ANN001 - an aiokafka AIOKafkaProducer
        self.producer = producer
        self.topic = topic
        self._open: dict[int, Any] = {}  # partition -> its aiokafka BatchBuilder being filled
        self._full: list[tuple[int, Any]] = []  # (partition, builder) filled up, in order

    async def partitions(self) -> list[int]:
        """The topic's partitions, as the producer's metadata knows them (fetched if unknown)."""
        return sorted(await self.producer.partitions_for(self.topic))

    def add(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        builder = self._open.get(partition)
        if builder is None:
            builder = self._open[partition] = self.producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value) is not None:
            return
        self._full.append((partition, builder))  # full: its successor takes the record (an empty
        # batch takes any one record; the broker's own size limit then applies to it)
        builder = self._open[partition] = self.producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value) is None:
            raise ValueError(f"a record of {len(value or b'')} bytes does not fit in one producer batch")

    async def submit(self) -> list[tuple[int, int, asyncio.Future]]:
        """Queue every batch with the producer, in the order the records came per partition.
        -> [(partition, records, future)]: each future resolves to the batch's RecordMetadata
        (its `offset` is the first record's) once the broker has it."""
        batches = self._full + list(self._open.items())
        self._full, self._open = [], {}
        sent = []
        for partition, builder in batches:
            count = builder.record_count()
            builder.close()  # nothing else may join it: its records are counted
            sent.append((partition, count, await self.producer.send_batch(builder, self.topic, partition=partition)))
        return sent
