import pyarrow.parquet as pq

from models.data import read_sessions, read_snapshot_events
from models.events import Event
from pipeline.cli import main
from pipeline.snapshots import SCHEMA, Applied, compact, list_files, to_table, write_snapshot

HOUR = 3_600_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR  # start of an hour


def _applied(part, off, user, item, t, etype=0):
    return Applied(part, off, Event(user, item, etype, t))


def test_files_are_named_by_partition_hour_and_offsets_and_rewrite_in_place(tmp_path):
    evs = [_applied(0, 5, "a", "i1", T0 + 1), _applied(0, 6, "b", "i2", T0 + 2), _applied(0, 7, "a", "i3", T0 + 3),
           _applied(1, 9, "c", "i4", T0 + HOUR + 5)]
    written = write_snapshot(str(tmp_path), evs)
    paths = sorted(p for p, _, _ in written)
    assert paths == ["dt=2023-11-14/hour=22/p000-000000000005-000000000007.parquet",
                     "dt=2023-11-14/hour=23/p001-000000000009-000000000009.parquet"]
    write_snapshot(str(tmp_path), evs[:3])  # redone after a crash: same name, no duplicate file
    assert len(list_files(str(tmp_path))) == 2
    table = pq.read_table(tmp_path / paths[0])
    assert table.schema.equals(SCHEMA, check_metadata=False) or set(SCHEMA.names) <= set(table.schema.names)
    rows = {r["user_id"]: r for r in table.to_pylist()}
    assert rows["a"]["offsets"] == [5, 7] and rows["a"]["item_ids"] == ["i1", "i3"]
    assert rows["a"]["first_offset"] == 5 and rows["a"]["last_offset"] == 7
    assert not list(tmp_path.rglob(".*tmp*"))


def test_rows_group_each_users_events_in_offset_order_whatever_order_they_arrive_in():
    evs = [_applied(2, 12, "b", "i5", T0 + 9, 1), _applied(2, 10, "a", "i1", T0 + 1), _applied(2, 14, "c", "i7", T0 + 4),
           _applied(2, 11, "b", "i2", T0 + 2), _applied(2, 13, "a", "i3", T0 + 3)]
    table = to_table(evs, T0 + 100)
    assert table.schema.equals(SCHEMA)
    assert table.column("user_id").to_pylist() == ["a", "b", "c"]  # by each row's first offset
    a, b, c = table.to_pylist()
    assert (a["offsets"], a["item_ids"], a["event_types"], a["timestamps_ms"]) == ([10, 13], ["i1", "i3"], [0, 0],
                                                                                   [T0 + 1, T0 + 3])
    assert (b["first_offset"], b["last_offset"], b["item_ids"], b["event_types"]) == (11, 12, ["i2", "i5"], [0, 1])
    assert c["offsets"] == [14] and c["partition"] == 2
    assert {r["snapshot_time"].timestamp() * 1000 for r in (a, b, c)} == {T0 + 100}


def test_reader_drops_duplicates_and_orders_by_time(tmp_path):
    write_snapshot(str(tmp_path), [_applied(0, 1, "a", "x", T0 + 1), _applied(0, 2, "a", "y", T0 + 2)])
    write_snapshot(str(tmp_path), [_applied(0, 2, "a", "y", T0 + 2), _applied(0, 3, "a", "z", T0 + 3)])  # overlap
    (tmp_path / "dt=2023-11-14" / "hour=22" / ".half-written.parquet.tmp-1").write_bytes(b"PAR1 garbage")
    events = read_snapshot_events(tmp_path)
    assert sorted((e.item_id, e.event_id) for e in events) == [("x", "0-1"), ("y", "0-2"), ("z", "0-3")]
    sessions = read_sessions(tmp_path, "parquet")
    assert [s.items for s in sessions] == [["x", "y", "z"]]


def test_compact_merges_past_hours_without_changing_what_readers_see(tmp_path, capsys):
    for off in range(6):
        write_snapshot(str(tmp_path), [_applied(off % 2, off, f"u{off % 3}", f"i{off}", T0 + off)])
    before = sorted((e.event_id, e.item_id, e.user_id) for e in read_snapshot_events(tmp_path))
    assert len(list_files(str(tmp_path))) == 6
    merged = compact(str(tmp_path), before_ms=T0 + 2 * HOUR)
    assert sorted(n for _, n in merged) == [3, 3]
    assert len(list_files(str(tmp_path))) == 2
    assert sorted((e.event_id, e.item_id, e.user_id) for e in read_snapshot_events(tmp_path)) == before
    assert main(["snapshots", "ls", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 files, 6 rows, 6 events" in out


def test_current_hour_is_left_alone(tmp_path):
    for off in range(3):
        write_snapshot(str(tmp_path), [_applied(0, off, "u", "i", T0 + off)])
    assert compact(str(tmp_path), before_ms=T0 + 10) == []
