"""The worker's batched sends (`pipeline/producing.py`), against aiokafka's real batch builder
and partitioner; the producer itself is a stand-in that records what it was handed."""

from __future__ import annotations

import asyncio
import random
import uuid

import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from pipeline.producing import PartitionBatches, murmur2, partitions_for


class FakeProducer:
    def __init__(self, batch_bytes: int = 16384, partitions: int = 4) -> None:
        self.batch_bytes = batch_bytes
        self.topic_partitions = set(range(partitions))
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, 0, is_transactional=False)

    async def partitions_for(self, topic: str) -> set[int]:
        return self.topic_partitions

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future:
        assert batch._closed, "a submitted batch is closed, so that no other send joins it"
        records = [(r.key, r.value) for r in DefaultRecordBatch(bytearray(batch._build()))]
        self.sent.append((topic, partition, records))
        future = asyncio.get_running_loop().create_future()
        future.set_result(len(self.sent))
        return future


def test_records_go_out_one_batch_per_partition_in_the_order_they_came():
    async def run():
        producer = FakeProducer()
        out = PartitionBatches(producer, "recs")
        for n in range(10):
            out.add(n % 3, f"u{n}".encode(), f"v{n}".encode())
        return producer, await out.submit(), await out.submit()

    producer, sent, again = asyncio.run(run())
    assert [(p, count) for p, count, _ in sent] == [(0, 4), (1, 3), (2, 3)]
    assert [(t, p) for t, p, _ in producer.sent] == [("recs", 0), ("recs", 1), ("recs", 2)]
    assert producer.sent[0][2] == [(b"u0", b"v0"), (b"u3", b"v3"), (b"u6", b"v6"), (b"u9", b"v9")]
    assert again == []  # submitted batches are not sent twice


def test_a_full_batch_goes_first_and_the_next_record_starts_another():
    async def run():
        producer = FakeProducer(batch_bytes=2000)
        out = PartitionBatches(producer, "changelog")
        for n in range(12):  # ~500-byte records: 3 or 4 to a 2,000-byte batch
            out.add(1, f"u{n}".encode(), bytes([n]) * 500)
        return producer, await out.submit()

    producer, sent = asyncio.run(run())
    counts = [count for _, count, _ in sent]
    assert len(sent) >= 3 and sum(counts) == 12 and all(p == 1 for p, _, _ in sent)
    keys = [k for _, _, records in producer.sent for k, _ in records]
    assert keys == [f"u{n}".encode() for n in range(12)]  # order kept across batches


def test_a_record_larger_than_a_batch_goes_alone_in_one_of_its_own():
    async def run():
        producer = FakeProducer(batch_bytes=100)
        out = PartitionBatches(producer, "recs")
        out.add(0, b"u1", b"x" * 50)
        out.add(0, b"u2", b"y" * 5000)
        out.add(0, b"u3", b"z" * 10)
        return producer, await out.submit()

    producer, sent = asyncio.run(run())
    assert [count for _, count, _ in sent] == [1, 1, 1]
    assert [len(records[0][1]) for _, _, records in producer.sent] == [50, 5000, 10]


def test_murmur2_is_kafkas_for_keys_of_every_length():
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 41))) for _ in range(3000)]
    keys += [f"u{n}".encode() for n in range(1000)] + [str(uuid.UUID(int=rng.getrandbits(128))).encode()
                                                         for _ in range(200)]
    assert murmur2(keys).tolist() == [aiokafka_murmur2(k) & 0xFFFFFFFF for k in keys]
    # the Java client's own test vectors (org.apache.kafka.common.utils.UtilsTest), as signed ints
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829, b"abc": 479470107}
    assert murmur2(list(vectors)).astype(np.int32).tolist() == list(vectors.values())


@pytest.mark.parametrize("partitions", [1, 3, 4, 12])
def test_partitions_are_the_ones_aiokafkas_default_partitioner_picks_for_the_key(partitions):
    parts = list(range(partitions))
    keys = [f"u{n}".encode() for n in range(2000)]
    chosen = partitions_for(keys, parts)
    assert chosen == [DefaultPartitioner()(k, parts, parts) for k in keys]
    if partitions > 1:  # spread over every partition, not all on one
        assert set(chosen) == set(parts)
    assert partitions_for([], parts) == []
