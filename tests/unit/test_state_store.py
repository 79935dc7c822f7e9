"""Batched state reads and writes: straight to each partition's RocksDB, or through the table."""

from types import SimpleNamespace

from rocksdict import Options, Rdict

from pipeline.state_store import StateStore


class _RocksStore:
    """What StateStore uses of faust's RocksDB store, over real rocksdict databases."""

    use_rocksdict = True

    def __init__(self, folder) -> None:  # noqa: ANN001
        self.folder, self.dbs, self.opened = folder, {}, []

    def _encode_key(self, key: bytes) -> bytes:
        return key

    def _encode_value(self, value: bytes) -> bytes:
        return value

    def _db_for_partition(self, partition: int) -> Rdict:
        if partition not in self.dbs:
            self.dbs[partition] = Rdict(str(self.folder / f"p{partition}"), options=Options(raw_mode=True))
            self.opened.append(partition)
        return self.dbs[partition]


def _event(partition: int):
    return SimpleNamespace(message=SimpleNamespace(partition=partition))


def test_rocksdb_writes_land_in_each_events_partition_and_read_back(tmp_path):
    store = _RocksStore(tmp_path)
    state = StateStore(SimpleNamespace(data=store))
    assert state.direct
    bound = []
    state.write([(b"u1", b"a" * 300, _event(0)), (b"u2", b"b", _event(3)), (b"u3", b"c", _event(0))], bound.append)
    assert bound == []  # no current event needed: the partition is the event's
    assert store.dbs[0][b"u1"] == b"a" * 300 and store.dbs[0][b"u3"] == b"c" and store.dbs[3][b"u2"] == b"b"
    assert b"u2" not in store.dbs[0] and b"u1" not in store.dbs[3]
    found = state.read({b"u1": 0, b"u2": 3, b"u3": 0, b"new": 3})
    assert found == {b"u1": b"a" * 300, b"u2": b"b", b"u3": b"c", b"new": None}
    state.write([(b"u1", b"changed", _event(0))], bound.append)
    assert state.read({b"u1": 0}) == {b"u1": b"changed"}


class _Table:
    """A table whose store is not RocksDB (faust's memory store): reads and writes go through it."""

    def __init__(self) -> None:
        self.data, self.current = {}, []

    def get(self, key: bytes):  # noqa: ANN201
        return self.data.get(key)


def test_other_stores_go_through_the_table_with_each_write_bound_to_its_event():
    table = _Table()
    state = StateStore(table)
    assert not state.direct
    events = [_event(1), _event(2)]
    bound = []
    state.write([(b"u1", b"x", events[0]), (b"u2", b"y", events[1])], bound.append)
    assert bound == events and table.data == {b"u1": b"x", b"u2": b"y"}
    assert state.read({b"u1": 1, b"zz": 0}) == {b"u1": b"x", b"zz": None}


def test_serializers_that_change_bytes_disable_the_direct_path(tmp_path):
    store = _RocksStore(tmp_path)
    store._encode_value = lambda value: b'"' + value + b'"'  # e.g. a json value serializer
    assert not StateStore(SimpleNamespace(data=store, get=lambda key: None)).direct


def _faust_rocksdb_store(tmp_path, monkeypatch, partitions: int):  # noqa: ANN202 - (table, StateStore)
    """The state table of a real faust app on RocksDB, owning `partitions` partitions."""
    from faust.types import TP

    from pipeline.app import create_app
    from pipeline.config import load_settings

    streams = create_app(load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_APP_ID": "recur-unit"}))
    table = streams.state
    changelog = table.changelog_topic.get_topic_name()
    monkeypatch.setattr(streams.app.assignor, "assigned_actives", lambda: {TP(changelog, p) for p in range(partitions)})
    return table, StateStore(table)


def test_users_are_counted_exactly_however_often_their_state_was_overwritten(tmp_path, monkeypatch):
    import asyncio

    from pipeline import faust_internals as internals

    table, state = _faust_rocksdb_store(tmp_path, monkeypatch, 4)
    assert state.direct
    for rewrite in range(30):  # 233 users, 30 writes each, as the worker writes a batch at a time
        state.write([(f"user-{u}".encode(), b"s" * (200 + rewrite), _event(u % 4)) for u in range(233)], None)
    for p in range(4):
        internals.set_persisted_offset(table, p, 1000)  # faust's own record in each database: not a user
    internals.partition_db(table, 5)[b"someone-elses"] = b"x"  # a partition this worker does not own
    estimate = sum(internals.partition_db(table, p).property_int_value("rocksdb.estimate-num-keys") for p in range(4))
    assert estimate > 1.05 * 233  # the old gauge: RocksDB's estimate counts overwrites
    assert asyncio.run(state.count()) == 233


def test_counting_pauses_after_each_chunk_so_it_takes_at_most_its_share_of_the_loop(tmp_path, monkeypatch):
    import asyncio

    from pipeline import state_store

    _table, state = _faust_rocksdb_store(tmp_path, monkeypatch, 2)
    state.write([(f"user-{u}".encode(), b"s", _event(u % 2)) for u in range(95)], None)
    clock = [0.0]

    def perf_counter() -> float:  # every reading 2 ms later: each chunk "takes" 2 ms
        clock[0] += 0.002
        return clock[0]

    pauses = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(state_store, "COUNT_CHUNK", 10)
    monkeypatch.setattr(state_store.time, "perf_counter", perf_counter)
    monkeypatch.setattr(state_store.asyncio, "sleep", sleep)
    assert asyncio.run(state.count(share=0.1)) == 95
    # 48 and 47 users in chunks of 10: 5 chunks each, a pause after each
    assert len(pauses) == 10
    assert all(abs(p - 0.018) < 1e-9 for p in pauses)  # 2 ms of work, 18 ms of pause: 10% of the loop
