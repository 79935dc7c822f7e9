"""One test per assumption `pipeline/faust_internals.py` makes about faust, aiokafka and rocksdict,
against the installed versions' real objects (no broker needed). An upgrade that breaks one
fails here, not in production."""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import aiokafka
import faust
import faust.transport.drivers.aiokafka as faust_aiokafka
import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage, Message

from pipeline import faust_internals as internals
from pipeline.app import create_app
from pipeline.config import load_settings


@pytest.fixture
def streams(tmp_path):
    return create_app(load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_APP_ID": "recur-unit"}))


def _minor(name: str) -> tuple[int, int]:
    major, minor = version(name).split(".")[:2]
    return int(major), int(minor)


def test_the_versions_are_the_tested_ones():
    assert _minor("faust-streaming") == (0, 15) and version("faust-streaming") >= "0.15.3"
    assert _minor("aiokafka") == (0, 14)
    assert _minor("rocksdict") == (0, 3)


def test_faust_makes_its_consumer_with_a_hard_coded_fetch_wait_that_aiokafka_keeps_in_an_attribute():
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    source = inspect.getsource(getattr(create, "__wrapped__", create))
    assert "fetch_max_wait_ms=1500" in source  # no setting for it: hence the patch
    assert list(inspect.signature(create).parameters) == ["self", "transport"]

    async def make():
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1500)
        consumer._fetch_max_wait_ms = 20  # what the patch does before start()
        return consumer._fetch_max_wait_ms

    assert asyncio.run(make()) == 20
    start = inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in start  # read when the fetcher is built


def test_the_patched_factory_sets_the_wait_on_the_consumer_faust_makes():
    internals.limit_fetch_wait(20)
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    assert create.recur_fetch_wait_ms == 20 and create.__wrapped__ is not create
    internals.limit_fetch_wait(20)  # idempotent: not wrapped twice
    assert faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer is create


def test_aiokafka_leaves_a_partition_without_a_committed_offset_where_the_fetcher_got_to():
    """The assumption behind `seek_uncommitted_to_beginning`: faust's seek after a rebalance (and
    after records it dropped while its flow was stopped) is aiokafka's seek_to_committed, which
    seeks only partitions with a committed offset above 0."""
    source = inspect.getsource(aiokafka.AIOKafkaConsumer.seek_to_committed)
    assert "if offset and offset > 0:" in source and "return committed_offsets" in source
    perform = inspect.getsource(faust.transport.consumer.Consumer.perform_seek)
    assert "await self.seek_to_committed()" in perform
    getmany = inspect.getsource(faust.transport.consumer.Consumer.getmany)
    assert "await self.perform_seek()" in getmany  # how faust reads dropped records again
    seek = faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed
    thread = inspect.getsource(getattr(seek, "__wrapped__", seek))
    assert "self._ensure_consumer().seek_to_committed" in thread


def test_the_seek_rewinds_input_partitions_without_a_commit_and_leaves_the_rest(streams):
    class Consumer:  # aiokafka's two calls, recorded
        def __init__(self):
            self.rewound: list = []

        async def seek_to_committed(self):
            return {events(0): None, events(1): 1200, events(2): 0, changelog(0): None}

        async def seek_to_beginning(self, *tps):
            self.rewound.extend(tps)

    def events(p):
        return aiokafka.TopicPartition("events", p)

    def changelog(p):
        return aiokafka.TopicPartition("recur-user-state-changelog", p)

    consumer = Consumer()
    offsets = asyncio.run(internals.seek_committed_or_beginning(consumer, {"recur-user-state-changelog"}))
    assert sorted(consumer.rewound) == [events(0), events(2)]  # committed 1200 stays; the changelog is recovery's
    assert offsets[events(1)] == 1200 and offsets[events(0)] is None  # what faust records as read offsets
    patched = faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed
    assert patched.recur_rewinds_uncommitted  # installed by create_app
    internals.seek_uncommitted_to_beginning()  # idempotent: not wrapped twice
    assert faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed is patched


def test_rebalance_complete_stops_the_flow_until_recovery_resumes_it(streams):
    """Recovery sends on_rebalance_complete right before it resumes the input partitions and
    seeks; events fetched before that seek were cleared from the queue and then skipped by the
    commit, so the flow must be stopped there (recovery resumes it after the seek)."""
    app = streams.app

    async def rebalance_completes():
        app.consumer.resume_flow()
        app.flow_control.resume()  # as faust's recovery leaves them before it seeks
        assert app.consumer.flow_active and app.flow_control.is_active()
        await app.on_rebalance_complete.send()
        return app.consumer.flow_active, app.flow_control.is_active(), app.consumer.suspend_flow.is_set()

    assert asyncio.run(rebalance_completes()) == (False, False, True)
    from faust.tables.recovery import Recovery

    for path in (Recovery._resume_streams, Recovery.on_recovery_completed):  # both ways out of recovery
        source = inspect.getsource(path)
        signal, seek = source.index("on_rebalance_complete.send"), source.index("perform_seek")
        assert signal < seek < source.index("consumer.resume_flow()")  # held at the signal, resumed after the seek


def test_the_producer_buffer_cap_is_an_attribute(streams):
    assert streams.app.producer.buffer.max_messages >= 1000  # set by create_app through set_producer_buffer


def test_a_bound_event_is_faust_current_event():
    event = faust.Event(app=None, key=b"k", value=b"v", headers={}, message=None)
    internals.bind_current_event(event)
    assert faust.current_event() is event


def _message(offset: int, generation: int) -> Message:
    return Message("events", 0, offset, 0.0, 0, {}, b"k", b"v", None, generation_id=generation)


def test_take_does_what_faust_streams_do_with_each_event(streams, monkeypatch):
    source = inspect.getsource(faust.Stream._py_aiter)
    assert "message.generation_id != self.app.consumer_generation_id" in source  # left out
    assert "not message.tracked" in source and "add_unacked(message)" in source  # in flight until acked
    monkeypatch.setattr(Message, "use_tracking", True)  # as the consumer sets it when it starts
    app = streams.app
    app.consumer_generation_id = 5
    app.flow_control.resume()
    now, old = _message(1, 5), _message(2, 4)
    assert now.tracked is False and hasattr(app.consumer.unacked, "add")  # a WeakSet
    assert internals.take(app, faust.Event(app, b"k", b"v", {}, now)) is True
    assert now.tracked is True and now in app.consumer.unacked
    assert internals.take(app, faust.Event(app, b"k", b"v", {}, old)) is False and old not in app.consumer.unacked
    app.flow_control.suspend()
    assert internals.take(app, faust.Event(app, b"k", b"v", {}, _message(3, 5))) is False


def test_an_agents_stream_reads_from_a_queue_on_its_channel(streams):
    channel = streams.app.channel()
    queue = internals.agent_queue(faust.Stream(channel, app=streams.app))
    assert isinstance(queue, asyncio.Queue) and hasattr(queue, "get_nowait")


def test_the_rocksdb_store_exposes_raw_partition_databases_and_the_persisted_offset(streams):
    table = streams.state
    assert internals.raw_rocksdb(table)  # bytes in, the same bytes stored
    db = internals.partition_db(table, 2)
    db[b"user-1"] = b"state"
    assert table.data._db_for_partition(2)[b"user-1"] == b"state"
    internals.set_persisted_offset(table, 2, 41)
    assert db[internals.offset_key(table)] == b"41"  # faust's recovery reads on from here
    assert table.data.persisted_offset(TP(table.changelog_topic.get_topic_name(), 2)) == 41


def test_active_dbs_are_those_of_the_owned_changelog_partitions(streams, monkeypatch):
    table = streams.state
    owned, standby = internals.partition_db(table, 0), internals.partition_db(table, 1)
    changelog = table.changelog_topic.get_topic_name()
    monkeypatch.setattr(streams.app.assignor, "assigned_actives", lambda: {TP(changelog, 0)})
    dbs = list(internals.active_dbs(table))
    assert len(dbs) == 1 and dbs[0] is owned and dbs[0] is not standby


def test_recovery_builds_the_active_highwaters_then_the_offsets_then_seeks():
    from faust.tables.recovery import Recovery

    build = Recovery._build_offsets
    source = inspect.getsource(Recovery._restart_recovery.fun)  # a mode ServiceTask
    highwaters = source.index("self._build_highwaters")
    offsets = source.index("self._build_offsets")
    seek = source.index("self._seek_offsets")
    assert highwaters < offsets < seek  # the hook runs with highwaters known, before the seek
    assert source[offsets:seek].count('"active"') >= 1
    assert list(inspect.signature(getattr(build, "__wrapped__", build)).parameters) == [
        "self", "consumer", "tps", "destination", "title"]


def test_a_restore_hook_moves_the_offsets_faust_reads_on_from(streams):
    from collections import Counter

    recovery = streams.app.tables.recovery
    changelog = streams.state.changelog_topic.get_topic_name()
    tps = {TP(changelog, 0), TP(changelog, 1)}
    calls = []

    async def hook(rec, hook_tps, offsets, highwaters):
        calls.append((rec, hook_tps, dict(highwaters)))
        offsets[TP(changelog, 0)] = 999  # restored up to 999 by the hook

    class Consumer:  # what faust's _build_offsets asks of its consumer
        async def earliest_offsets(self, *asked):
            return {tp: 10 for tp in asked}  # the log starts at 10 (compacted before)

    internals.restore_before_recovery(streams.app, hook)
    recovery.active_highwaters = Counter({TP(changelog, 0): 1500, TP(changelog, 1): 5})
    offsets = Counter({TP(changelog, 0): 3})
    asyncio.run(recovery._build_offsets(Consumer(), tps, offsets, "active"))
    assert calls == [(recovery, tps, {TP(changelog, 0): 1500, TP(changelog, 1): 5})]
    assert offsets[TP(changelog, 0)] == 999  # faust keeps the larger of the hook's offset and the log start
    assert offsets[TP(changelog, 1)] == 9
    asyncio.run(recovery._build_offsets(Consumer(), tps, Counter(), "standby"))
    assert len(calls) == 1  # standby partitions are left to faust


def test_a_restore_is_cancelled_by_a_new_rebalance_a_lost_partition_or_a_stop(streams):
    recovery = streams.app.tables.recovery
    tp = TP(streams.state.changelog_topic.get_topic_name(), 0)
    recovery.active_tps = {tp}
    assert not internals.recovery_cancelled(recovery, tp)
    recovery.signal_recovery_start.set()
    assert internals.recovery_cancelled(recovery, tp)
    recovery.signal_recovery_start.clear()
    recovery.active_tps = set()
    assert internals.recovery_cancelled(recovery, tp)


def test_faust_keeps_its_aiokafka_producer_where_kafka_producer_finds_it(streams):
    from faust.exceptions import NotReady

    with pytest.raises(NotReady):  # not started: no producer yet
        internals.kafka_producer(streams.app)

    async def make():
        return aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")

    made = asyncio.run(make())
    streams.app.producer._producer = made  # what the producer's on_start does
    assert internals.kafka_producer(streams.app) is made
    # the batch API pipeline/producing.py uses, and flush() waiting on batches added through it
    assert {"create_batch", "send_batch", "partitions_for"} <= set(dir(made))
    assert "self._pending_batches" in inspect.getsource(type(made._message_accumulator).flush)


def test_recovery_progress_is_the_highwaters_less_the_applied_offsets_while_restoring(streams):
    from collections import Counter

    recovery = internals.recovery_of(streams.app)
    assert recovery is streams.app.tables.recovery
    changelog = streams.state.changelog_topic.get_topic_name()
    recovery.active_highwaters = Counter({TP(changelog, 0): 16, TP(changelog, 1): 6})
    recovery.active_offsets = Counter({TP(changelog, 0): -1, TP(changelog, 1): 6})
    assert internals.recovery_progress(recovery) == (False, 17)
    recovery._set_recovery_started()
    assert internals.recovery_progress(recovery) == (True, 17)
    recovery.active_offsets[TP(changelog, 0)] = 16
    assert internals.recovery_progress(recovery) == (True, 0)


def test_a_restarted_recovery_ends_its_wait_for_changelog_records_as_a_new_rebalance_does(streams):
    from faust.tables.recovery import RebalanceAgain

    recovery = internals.recovery_of(streams.app)

    async def wait_for_records_that_never_come():
        never = asyncio.Event()  # what `signal_recovery_end.wait()` is, when the records are lost
        waiting = asyncio.ensure_future(recovery._wait(never.wait()))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        internals.restart_recovery(recovery)
        with pytest.raises(RebalanceAgain):  # _restart_recovery's loop then starts over
            await asyncio.wait_for(waiting, 5)

    recovery.loop.run_until_complete(wait_for_records_that_never_come())  # the service's own loop
    assert "except RebalanceAgain" in inspect.getsource(type(recovery)._restart_recovery.fun)


def _consumer_messages(generation: int) -> list[ConsumerMessage]:
    """Offsets 3 - 9 of partition 0 and 0 - 2 of partition 1; one held by two references, one
    acked already, one below the committed offset, one repeated (a second message, same offset)."""
    tp0, tp1 = TP("events", 0), TP("events", 1)
    msgs = [ConsumerMessage("events", tp.partition, offset, 0.0, 0, {}, b"k", b"v", None, tp=tp,
                            generation_id=generation) for tp, offset in
            [(tp0, o) for o in range(3, 10)] + [(tp1, o) for o in range(3)] + [(tp0, 5)]]
    msgs[1].refcount = 2  # two streams hold it: one ack leaves it unacked
    msgs[2].acked = True
    for m in msgs:
        m.tracked = True
    return msgs


def _ack_state(app, msgs):  # noqa: ANN001
    c = app.consumer
    return ({tp: sorted(o) for tp, o in c._acked_index.items()}, {tp: list(o) for tp, o in c._acked.items()},
            c._n_acked, sorted((m.partition, m.offset) for m in c._unacked_messages),
            [(m.acked, m.refcount) for m in msgs])


async def _ack(app, events, way: str) -> bool:  # noqa: ANN001
    """Ack `events` faust's way (each event) or with ack_all; -> whether a waiter was woken."""
    consumer = app.consumer
    consumer._waiting_for_ack = asyncio.get_running_loop().create_future()
    if way == "faust":
        for e in events:
            e.ack()
    else:
        internals.ack_all(app, events)
    return consumer._waiting_for_ack.done()


def test_ack_all_leaves_the_consumer_as_faust_acking_each_event_does(tmp_path):
    source = inspect.getsource(faust.transport.consumer.Consumer.ack)
    for line in ("committed = self._committed_offset[tp]", "acked_index.add(offset)",
                 "self._unacked_messages.discard(message)", "self._n_acked += 1",
                 "notify(self._waiting_for_ack)", "if self.app.topics.acks_enabled_for(message.topic):"):
        assert line in source
    assert "return consumer.ack(self)" in inspect.getsource(ConsumerMessage.on_final_ack)
    assert "if not self.decref(n):" in inspect.getsource(Message.ack)
    states, woken = [], []
    for way in ("faust", "ack_all"):
        settings = load_settings({"RECUR_VAR_DIR": str(tmp_path / way), "RECUR_APP_ID": "recur-unit"})
        app = create_app(settings).app
        app.topics._acking_topics.add("events")
        consumer = app.consumer
        consumer._committed_offset[TP("events", 0)] = 4  # offset 3 is below it
        msgs = _consumer_messages(1)
        for m in msgs:
            consumer._unacked_messages.add(m)
        events = [faust.Event(app, b"k", b"v", {}, m) for m in msgs]

        woken.append(asyncio.run(_ack(app, events, way)))
        states.append(_ack_state(app, msgs))
    assert states[0] == states[1] and woken == [True, True]
    index, acked, n_acked, unacked, flags = states[1]
    assert index == {TP("events", 0): [5, 6, 7, 8, 9], TP("events", 1): [0, 1, 2]}  # 3 below the commit, 4 held
    assert n_acked == 8 and unacked == [(0, 3), (0, 4), (0, 5)]  # 3: below the commit; 4: held; 5 twice: one stays
    assert flags[1] == (False, 1) and flags[2] == (True, 0) and all(a for a, _ in flags[3:])
