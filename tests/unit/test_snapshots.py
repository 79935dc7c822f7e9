import asyncio
import gc

import pyarrow.parquet as pq
import pytest
from aiokafka import TopicPartition

from models.events import Event
from pipeline.cli import main
from pipeline.snapshot_files import (
    SCHEMA,
    Buffer,
    read_events,
    read_sessions,
    remove_uncommitted,
    to_table,
    write_snapshot,
)
from pipeline.snapshot_tools import compact, list_files, recent_items

HOUR = 3_600_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR  # start of an hour


def _applied(part, off, user, item, t, etype=0):
    return part, off, Event(user, item, etype, t)


def _buffer(events):
    buf = Buffer()
    for part, off, event in events:
        buf.add(part, off, event)
    return buf


def test_files_are_named_by_partition_hour_and_offsets_and_rewrite_in_place(tmp_path):
    evs = [_applied(0, 5, "a", "i1", T0 + 1), _applied(0, 6, "b", "i2", T0 + 2), _applied(0, 7, "a", "i3", T0 + 3),
           _applied(1, 9, "c", "i4", T0 + HOUR + 5)]
    written = write_snapshot(str(tmp_path), _buffer(evs))
    paths = sorted(p for p, _, _ in written)
    assert paths == ["dt=2023-11-14/hour=22/p000-000000000005-000000000007.parquet",
                     "dt=2023-11-14/hour=23/p001-000000000009-000000000009.parquet"]
    write_snapshot(str(tmp_path), _buffer(evs[:3]))  # redone after a crash: same name, no duplicate file
    assert len(list_files(str(tmp_path)).files) == 2
    table = pq.read_table(tmp_path / paths[0])
    assert table.schema.equals(SCHEMA, check_metadata=False) or set(SCHEMA.names) <= set(table.schema.names)
    rows = {r["user_id"]: r for r in table.to_pylist()}
    assert rows["a"]["offsets"] == [5, 7] and rows["a"]["item_ids"] == ["i1", "i3"]
    assert rows["a"]["first_offset"] == 5 and rows["a"]["last_offset"] == 7
    assert not list(tmp_path.rglob(".*tmp*"))


def test_rows_group_each_users_events_in_offset_order_whatever_order_they_arrive_in():
    evs = [_applied(2, 12, "b", "i5", T0 + 9, 1), _applied(2, 10, "a", "i1", T0 + 1), _applied(2, 14, "c", "i7", T0 + 4),
           _applied(2, 11, "b", "i2", T0 + 2), _applied(2, 13, "a", "i3", T0 + 3)]
    table = to_table(_buffer(evs).to_arrow(), T0 + 100)
    assert table.schema.equals(SCHEMA)
    assert table.column("user_id").to_pylist() == ["a", "b", "c"]  # by each row's first offset
    a, b, c = table.to_pylist()
    assert (a["offsets"], a["item_ids"], a["event_types"], a["timestamps_ms"]) == ([10, 13], ["i1", "i3"], [0, 0],
                                                                                   [T0 + 1, T0 + 3])
    assert (b["first_offset"], b["last_offset"], b["item_ids"], b["event_types"]) == (11, 12, ["i2", "i5"], [0, 1])
    assert c["offsets"] == [14] and c["partition"] == 2
    assert {r["snapshot_time"].timestamp() * 1000 for r in (a, b, c)} == {T0 + 100}


def test_reader_drops_duplicates_and_orders_by_time(tmp_path):
    write_snapshot(str(tmp_path), _buffer([_applied(0, 1, "a", "x", T0 + 1), _applied(0, 2, "a", "y", T0 + 2)]))
    write_snapshot(str(tmp_path), _buffer([_applied(0, 2, "a", "y", T0 + 2), _applied(0, 3, "a", "z", T0 + 3)]))  # overlap
    (tmp_path / "dt=2023-11-14" / "hour=22" / ".half-written.parquet.tmp-1").write_bytes(b"PAR1 garbage")
    events = read_events(tmp_path)
    assert sorted((e.item_id, e.event_id) for e in events) == [("x", "0-1"), ("y", "0-2"), ("z", "0-3")]
    sessions = read_sessions(tmp_path)
    assert [s.items for s in sessions] == [["x", "y", "z"]]


def test_compact_merges_past_hours_without_changing_what_readers_see(tmp_path, capsys):
    for off in range(6):
        write_snapshot(str(tmp_path), _buffer([_applied(off % 2, off, f"u{off % 3}", f"i{off}", T0 + off)]))
    before = sorted((e.event_id, e.item_id, e.user_id) for e in read_events(tmp_path))
    assert len(list_files(str(tmp_path)).files) == 6
    merged = compact(str(tmp_path), before_ms=T0 + 2 * HOUR)
    assert sorted(n for _, n in merged) == [3, 3]
    assert len(list_files(str(tmp_path)).files) == 2
    assert sorted((e.event_id, e.item_id, e.user_id) for e in read_events(tmp_path)) == before
    assert main(["snapshots", "ls", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 files, 6 rows, 6 events" in out


def test_current_hour_is_left_alone(tmp_path):
    for off in range(3):
        write_snapshot(str(tmp_path), _buffer([_applied(0, off, "u", "i", T0 + off)]))
    assert compact(str(tmp_path), before_ms=T0 + 10) == []


def test_buffered_events_add_nothing_for_the_cyclic_gc_to_walk():
    # event objects kept until the next flush made Python run a full collection over them every
    # few seconds in the worker (17-63 ms pauses); the buffer holds only strings and ints
    buf = Buffer()
    gc.collect()
    before = len(gc.get_objects())
    for off in range(20_000):
        buf.add(off % 4, off, Event(f"user-{off % 5000}", f"item-{off % 700}", off % 2, T0 + off))
    gc.collect()
    assert len(buf) == 20_000
    assert len(gc.get_objects()) - before < 50  # a list of event objects: >= 20,000
    table = buf.to_arrow()
    assert table.num_rows == 20_000 and table["offset"][19_999].as_py() == 19_999
    assert table["user_id"][7].as_py() == "user-7" and table["event_type"][7].as_py() == 1


def test_events_of_two_hours_and_partitions_go_to_separate_files(tmp_path):
    evs = [_applied(p, off, f"u{off % 3}", f"i{off}", T0 + (off % 2) * HOUR + off) for p in (0, 3) for off in range(10)]
    written = write_snapshot(str(tmp_path), _buffer(evs))
    assert sorted((p, rows) for p, rows, _ in written) == [
        ("dt=2023-11-14/hour=22/p000-000000000000-000000000008.parquet", 3),
        ("dt=2023-11-14/hour=22/p003-000000000000-000000000008.parquet", 3),
        ("dt=2023-11-14/hour=23/p000-000000000001-000000000009.parquet", 3),
        ("dt=2023-11-14/hour=23/p003-000000000001-000000000009.parquet", 3)]
    assert write_snapshot(str(tmp_path / "empty"), Buffer()) == []
    assert len(read_events(tmp_path)) == 20


class _Consumer:  # the aiokafka consumer's commit, recorded
    def __init__(self):
        self.commits = []

    async def commit(self, offsets):
        self.commits.append(offsets)


def _snapshot_consumer(tmp_path, root, writer="thread"):
    from prometheus_client import CollectorRegistry

    from pipeline.config import load_settings
    from pipeline.metrics import Metrics
    from pipeline.snapshots import SnapshotConsumer

    # "thread" unless asked: most tests replace write_snapshot, which a child process would not see
    settings = load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_SNAPSHOT_DIR": str(root),
                              "RECUR_SNAPSHOT_WRITER": writer})
    snap = SnapshotConsumer(settings, Metrics(CollectorRegistry()))
    snap.consumer = _Consumer()
    return snap


TP0 = TopicPartition("events", 0)


def test_a_failed_write_keeps_the_events_and_their_offsets_for_the_next_flush(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the snapshot folder should be")
    snap = _snapshot_consumer(tmp_path, blocked)
    snap.positions[TP0] = 0
    for off in range(3):
        snap.pending.add(0, off, Event("u", f"i{off}", 0, T0 + off))
    snap.offsets[TP0] = 3
    asyncio.run(snap.flush())
    assert snap.consumer.commits == [] and len(snap.pending) == 3 and snap.offsets == {TP0: 3}
    assert snap.metrics.snapshot_failures._value.get() == 1
    snap.pending.add(0, 3, Event("u", "i3", 0, T0 + 3))  # read after the failure
    snap.offsets[TP0] = 4
    blocked.unlink()
    asyncio.run(snap.flush())
    assert snap.consumer.commits == [{TP0: 4}] and len(snap.pending) == 0 and snap.offsets == {}
    assert [e.item_id for e in read_events(blocked)] == ["i0", "i1", "i2", "i3"]


def test_files_written_before_a_failure_are_removed_before_the_retry(tmp_path, monkeypatch):
    import pipeline.snapshots as snapshots

    root = tmp_path / "snap"
    snap = _snapshot_consumer(tmp_path, root)
    snap.positions[TP0] = 0
    for off in range(4):  # two hours: two files
        snap.pending.add(0, off, Event("u", f"i{off}", 0, T0 + (off // 2) * HOUR + off))
    snap.offsets[TP0] = 4

    def first_file_then_fail(root_, events):
        write_snapshot(root_, _buffer([(0, off, Event("u", f"i{off}", 0, T0 + off)) for off in range(2)]))
        raise OSError("disk full")

    monkeypatch.setattr(snapshots, "write_snapshot", first_file_then_fail)
    asyncio.run(snap.flush())
    assert len(list_files(str(root)).files) == 1 and snap.consumer.commits == []
    monkeypatch.setattr(snapshots, "write_snapshot", write_snapshot)
    snap.pending.add(0, 4, Event("u", "i4", 0, T0 + 4))  # read meanwhile: the retry covers another range
    snap.offsets[TP0] = 5
    asyncio.run(snap.flush())
    listing = list_files(str(root))
    assert snap.consumer.commits == [{TP0: 5}]
    assert sum(f.events for f in listing.files) == listing.distinct_events == 5  # each event in one file


def test_remove_uncommitted_takes_out_exactly_the_events_at_or_past_the_position(tmp_path):
    root = str(tmp_path)
    write_snapshot(root, _buffer([_applied(0, off, "a", f"i{off}", T0 + off) for off in range(0, 5)]))  # committed
    write_snapshot(root, _buffer([_applied(0, off, "b", f"i{off}", T0 + HOUR + off) for off in range(5, 9)]))  # not
    write_snapshot(root, _buffer([_applied(1, off, "c", f"i{off}", T0 + off) for off in range(0, 9)]))  # other partition
    hour = tmp_path / "dt=2023-11-14" / "hour=22"
    (hour / ".p000-000000000005-000000000009.parquet.tmp-1").write_bytes(b"PAR1 half")
    (hour / ".p001-000000000009-000000000012.parquet.tmp-1").write_bytes(b"PAR1 half")
    done = remove_uncommitted(root, {0: 5})
    assert (done.files_removed, done.files_trimmed, done.events_removed, done.temporary_removed) == (1, 0, 4, 1)
    events = sorted((e.event_id for e in read_events(tmp_path)), key=lambda i: tuple(map(int, i.split("-"))))
    assert events == [f"0-{n}" for n in range(5)] + [f"1-{n}" for n in range(9)]
    assert [p.name for p in hour.glob(".*")] == [".p001-000000000009-000000000012.parquet.tmp-1"]
    # a compacted file that holds both: the committed part stays, the rest goes
    compact(root, before_ms=T0 + 3 * HOUR)
    write_snapshot(root, _buffer([_applied(0, off, "a", f"i{off}", T0 + off) for off in range(5, 7)]))
    compact(root, before_ms=T0 + 3 * HOUR)
    done = remove_uncommitted(root, {0: 3})
    assert (done.files_trimmed, done.events_removed) == (1, 4)
    assert sorted(e.event_id for e in read_events(tmp_path) if e.event_id.startswith("0-")) == ["0-0", "0-1", "0-2"]


def test_compact_drops_copies_left_by_older_versions_and_stale_temporary_files(tmp_path, capsys):
    import os
    import time

    import pyarrow.dataset as ds

    write_snapshot(str(tmp_path), _buffer([_applied(0, off, "a", f"i{off}", T0 + off) for off in range(0, 6)]))
    write_snapshot(str(tmp_path), _buffer([_applied(0, off, "a", f"i{off}", T0 + off) for off in range(3, 9)]))
    hour = tmp_path / "dt=2023-11-14" / "hour=22"
    stale, fresh = hour / ".p000-1-2.parquet.tmp-7", hour / ".p000-3-4.parquet.tmp-8"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert main(["snapshots", "ls", "--dir", str(tmp_path)]) == 0
    assert "2 files, 2 rows, 9 events (+3 duplicate copies" in capsys.readouterr().out
    assert compact(str(tmp_path), before_ms=T0 + 2 * HOUR) == [("dt=2023-11-14/hour=22/p000-000000000000-000000000008.parquet", 2)]
    offsets = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()["offsets"].to_pylist()
    assert sorted(o for row in offsets for o in row) == list(range(9))  # each event once, for any reader
    assert not stale.exists() and fresh.exists()  # a fresh one may be a write in progress


def test_recent_items_are_the_newest_events_by_time_oldest_first(tmp_path):
    write_snapshot(str(tmp_path), _buffer([_applied(0, off, "a", f"old{off}", T0 + off) for off in range(5)]))
    write_snapshot(str(tmp_path), _buffer([_applied(1, off, "b", f"new{off}", T0 + 3 * HOUR + off) for off in range(3)]))
    write_snapshot(str(tmp_path), _buffer([_applied(1, 1, "b", "new1", T0 + 3 * HOUR + 1)]))  # an old version's copy
    assert recent_items(str(tmp_path), 4) == ["old4", "new0", "new1", "new2"]
    assert recent_items(str(tmp_path), 100) == [f"old{n}" for n in range(5)] + ["new0", "new1", "new2"]
    assert recent_items(str(tmp_path / "none"), 10) == []


def test_a_failed_position_lookup_holds_writes_until_the_leftovers_are_removed(tmp_path):
    root = tmp_path / "snap"
    write_snapshot(str(root), _buffer([_applied(0, off, "u", f"i{off}", T0 + off) for off in range(5)]))  # 2..4 uncommitted
    snap = _snapshot_consumer(tmp_path, root)
    answers = [RuntimeError("coordinator not available"), RuntimeError("still not"), 2]

    async def committed(tp):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    snap.consumer.committed = committed
    asyncio.run(snap.on_assigned({TP0}))  # aiokafka would only log an error raised here
    for off in range(2, 5):  # read again from the committed offset
        snap.pending.add(0, off, Event("u", f"i{off}", 0, T0 + off))
    snap.offsets[TP0] = 5
    asyncio.run(snap.flush())
    assert snap.consumer.commits == [] and len(snap.pending) == 3  # nothing written over the leftovers
    asyncio.run(snap.flush())
    listing = list_files(str(root))
    assert snap.consumer.commits == [{TP0: 5}]
    assert sum(f.events for f in listing.files) == listing.distinct_events == 5  # each event in one file


def test_a_rebalance_flush_waits_for_the_one_in_progress_and_a_commit_refused_by_a_rebalance_is_not_fatal(
        tmp_path, monkeypatch):
    import time as _time

    from aiokafka.errors import CommitFailedError

    import pipeline.snapshots as snapshots

    snap = _snapshot_consumer(tmp_path, tmp_path / "snap")
    snap.positions[TP0] = 0
    for off in range(3):
        snap.pending.add(0, off, Event("u", f"i{off}", 0, T0 + off))
    snap.offsets[TP0] = 3
    real_write = snapshots.write_snapshot
    calls = []

    def slow_write(root, events):  # noqa: ANN001, ANN202
        calls.append(len(events))
        if len(calls) == 1:
            _time.sleep(0.3)  # the first write is slow, the next one quick
        return real_write(root, events)

    monkeypatch.setattr(snapshots, "write_snapshot", slow_write)

    async def loop_flush_then_revoke_flush():
        first = asyncio.create_task(snap.flush())  # the loop's flush, writing
        await asyncio.sleep(0.05)
        snap.pending.add(0, 3, Event("u", "i3", 0, T0 + 3))  # read meanwhile
        snap.offsets[TP0] = 4
        await snap.flush()  # what on_partitions_revoked does
        await first

    asyncio.run(loop_flush_then_revoke_flush())
    assert snap.consumer.commits == [{TP0: 3}, {TP0: 4}]  # one after the other: never a commit going back
    assert [e.item_id for e in read_events(tmp_path / "snap")] == ["i0", "i1", "i2", "i3"]

    async def refused(offsets):  # noqa: ANN001, ANN202
        raise CommitFailedError("the group rebalanced")

    snap.consumer.commit = refused
    snap.pending.add(0, 4, Event("u", "i4", 0, T0 + 4))
    snap.offsets[TP0] = 5
    asyncio.run(snap.flush())  # logged, not raised: the partitions' next owner writes them again
    assert snap.offsets == {TP0: 5} and snap.positions[TP0] == 4  # not counted as committed


def test_a_retraining_window_reads_only_the_newest_hours_files(tmp_path):
    from pipeline.snapshot_files import files_in_window

    root = str(tmp_path / "snap")
    day = 24 * HOUR
    old = [_applied(0, off, "a", f"old{off}", T0 + off) for off in range(3)]  # 20 days before the newest
    recent = [_applied(0, 3 + off, "a", f"new{off}", T0 + 20 * day + off * HOUR) for off in range(3)]
    edge = [_applied(1, 0, "b", "edge", T0 + 20 * day - 7 * day - 12 * HOUR)]  # within the window + a day
    write_snapshot(root, _buffer(old + recent + edge))
    _, paths, left_out = files_in_window(root, 7 * 86400)
    assert left_out == 1 and len(paths) == 4  # the old hour's file is not read
    got = {e.item_id for e in read_events(root, 7 * 86400)}
    assert got == {"new0", "new1", "new2", "edge"}
    assert len(read_events(root)) == 7  # no window: everything


def test_files_are_written_by_a_child_process_that_ignores_ctrl_c_and_is_replaced_when_it_dies(tmp_path):
    import os
    import signal

    root = tmp_path / "snap"
    snap = _snapshot_consumer(tmp_path, root, writer="process")
    snap.positions[TP0] = 0

    def read_and_flush(first: int, last: int) -> None:
        for off in range(first, last):
            snap.pending.add(0, off, Event("u", f"i{off}", 0, T0 + off))
        snap.offsets[TP0] = last
        asyncio.run(snap.flush())

    read_and_flush(0, 3)
    child = snap.writer.pid()
    assert child is not None and child != os.getpid()
    assert snap.consumer.commits == [{TP0: 3}]
    os.kill(child, signal.SIGINT)  # what Ctrl-C sends the whole process group: the worker stops it, later
    read_and_flush(3, 5)
    assert snap.writer.pid() == child and snap.consumer.commits[-1] == {TP0: 5}
    os.kill(child, signal.SIGKILL)
    read_and_flush(5, 7)  # the dead child fails this write: kept, not committed, counted
    assert snap.consumer.commits[-1] == {TP0: 5} and len(snap.pending) == 2
    assert snap.metrics.snapshot_failures._value.get() == 1
    read_and_flush(7, 8)  # a new child writes what was kept and what came since
    assert snap.writer.pid() not in (None, child)
    assert snap.consumer.commits[-1] == {TP0: 8} and len(snap.pending) == 0
    listing = list_files(str(root))
    assert sum(f.events for f in listing.files) == listing.distinct_events == 8  # each event in one file
    assert sorted(e.item_id for e in read_events(root)) == [f"i{off}" for off in range(8)]
    replacement = snap.writer.pid()
    asyncio.run(snap.writer.close())
    assert snap.writer.pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(replacement, 0)  # stopped and reaped by the pool's shutdown


def test_a_writer_child_whose_worker_is_already_gone_exits_at_once():
    import os
    import subprocess
    import sys

    code = "import sys; from pipeline.snapshot_writer import _child_start; _child_start(int(sys.argv[1])); print('alive')"
    gone = subprocess.run([sys.executable, "-c", code, "-1"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0 and gone.stdout == ""  # its parent is not the worker it was started for
    alive = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True, timeout=60)
    assert alive.stdout == "alive\n"  # started by the worker named: it goes on
