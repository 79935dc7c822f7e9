"""The bulk restore's plan and its copy into the table's RocksDB store (a stand-in consumer; the
real broker path is tests/integration/test_resilience.py's restore onto an empty disk)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest
from aiokafka.structs import TopicPartition
from faust.types import TP

from pipeline import bulk_restore
from pipeline import faust_internals as internals
from pipeline.app import create_app
from pipeline.config import load_settings


@pytest.fixture
def streams(tmp_path):
    return create_app(load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_APP_ID": "recur-unit"}))


def test_the_plan_reads_from_after_the_stored_offset_to_the_highwater_when_there_is_enough():
    tps = {TP("c", 0), TP("c", 1), TP("c", 2), TP("c", 3)}
    offsets = {TP("c", 0): None, TP("c", 1): 90, TP("c", 2): 3, TP("c", 3): -1}
    highwaters = {TP("c", 0): 99, TP("c", 1): 99, TP("c", 2): -1, TP("c", 3): 9}
    assert bulk_restore.plan(tps, offsets, highwaters, min_records=10) == {TP("c", 0): (0, 99), TP("c", 3): (0, 9)}
    assert bulk_restore.plan(tps, offsets, highwaters, min_records=9)[TP("c", 1)] == (91, 99)


class Consumer:
    """Hands out records of one partition in chunks, as aiokafka's getmany does."""

    def __init__(self, part: TopicPartition, records: list, chunk: int) -> None:
        self.part, self.records, self.chunk, self.pos = part, records, chunk, 0

    async def getmany(self, *parts, timeout_ms: int, max_records: int):
        got = self.records[self.pos:self.pos + min(self.chunk, max_records)]
        self.pos += len(got)
        return {self.part: got} if got else {}

    async def position(self, part):
        return self.records[self.pos].offset if self.pos < len(self.records) else self.records[-1].offset + 1


def _record(offset: int, key: bytes, value: bytes | None):
    return SimpleNamespace(offset=offset, key=key, value=value)


def test_the_copy_writes_records_and_tombstones_with_the_offset_up_to_the_highwater_only(streams):
    table = streams.state
    changelog = table.changelog_topic.get_topic_name()
    tp, part = TP(changelog, 1), TopicPartition(changelog, 1)
    db = internals.partition_db(table, 1)
    db[b"gone"] = b"old state"
    records = [_record(5, b"a", b"a1"), _record(6, b"gone", None), _record(8, b"a", b"a2"),  # 7 compacted away
               _record(9, b"b", b"b1"), _record(10, b"late", b"after the highwater")]
    recovery = SimpleNamespace(signal_recovery_start=asyncio.Event(), active_tps={tp}, should_stop=False)
    offsets: Counter = Counter({tp: 4})
    written = asyncio.run(bulk_restore._copy(Consumer(part, records, chunk=2), table, recovery, {part: tp},
                                             {tp: (5, 9)}, offsets))
    assert written == 4 and offsets[tp] == 9
    assert (db.get(b"a"), db.get(b"b"), db.get(b"gone"), db.get(b"late")) == (b"a2", b"b1", None, None)
    assert table.data.persisted_offset(tp) == 9  # faust's recovery reads on from 10


def test_a_copy_stops_at_a_new_rebalance_with_the_store_consistent_with_its_offset(streams):
    table = streams.state
    changelog = table.changelog_topic.get_topic_name()
    tp, part = TP(changelog, 0), TopicPartition(changelog, 0)
    recovery = SimpleNamespace(signal_recovery_start=asyncio.Event(), active_tps={tp}, should_stop=False)
    records = [_record(n, f"u{n}".encode(), b"s") for n in range(10)]

    class Rebalancing(Consumer):
        async def getmany(self, *parts, timeout_ms: int, max_records: int):
            got = await super().getmany(*parts, timeout_ms=timeout_ms, max_records=max_records)
            recovery.signal_recovery_start.set()  # a rebalance begins after the first chunk
            return got

    offsets: Counter = Counter()
    written = asyncio.run(bulk_restore._copy(Rebalancing(part, records, chunk=3), table, recovery, {part: tp},
                                             {tp: (0, 9)}, offsets))
    assert written == 3 and offsets[tp] == 2 and table.data.persisted_offset(tp) == 2
    assert internals.partition_db(table, 0).get(b"u3") is None


def test_a_partition_that_ends_in_offsets_with_no_record_is_restored_up_to_its_highwater(streams):
    """Its last offset is a transaction's commit marker: no consumer is given a record there, so
    the store's offset moves to the highwater once the consumer is past it (faust's recovery
    waited for offset 3 for good)."""
    table = streams.state
    changelog = table.changelog_topic.get_topic_name()
    tp, part = TP(changelog, 2), TopicPartition(changelog, 2)
    records = [_record(0, b"a", b"a1"), _record(1, b"b", b"b1"), _record(2, b"a", b"a2")]

    class PastTheMarker(Consumer):
        async def position(self, part):
            return 4 if self.pos == len(self.records) else self.records[self.pos].offset

    recovery = SimpleNamespace(signal_recovery_start=asyncio.Event(), active_tps={tp}, should_stop=False)
    offsets: Counter = Counter({tp: -1})
    written = asyncio.run(bulk_restore._copy(PastTheMarker(part, records, chunk=2), table, recovery, {part: tp},
                                             {tp: (0, 3)}, offsets))
    assert written == 3 and offsets[tp] == 3 and table.data.persisted_offset(tp) == 3
    assert internals.partition_db(table, 2).get(b"a") == b"a2"


def test_a_lowered_threshold_plans_every_partition_with_a_record_to_read():
    tps = {TP("c", 0), TP("c", 1), TP("c", 2)}
    offsets = {TP("c", 0): -1, TP("c", 1): 16, TP("c", 2): 7}
    highwaters = {TP("c", 0): 16, TP("c", 1): 16, TP("c", 2): 9}
    threshold = bulk_restore.Threshold(5000)
    assert bulk_restore.plan(tps, offsets, highwaters, threshold.min_records) == {}
    threshold.lower()
    assert bulk_restore.plan(tps, offsets, highwaters, threshold.min_records) == {TP("c", 0): (0, 16), TP("c", 2): (8, 9)}
