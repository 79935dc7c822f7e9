"""Crashes, clean stops, poison, rebalances, a restore onto an empty disk, a broker restart and
model swaps. Real broker, worker(s) as subprocesses; each test asserts what its name claims."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from models.artifacts import load_artifact, publish_version, save_artifact
from models.data import sessionize
from models.online import UserState
from models.scorers import choose
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from pipeline.clients import produce_events, shift_to_now
from pipeline.records import encode_event

from .conftest import (
    Watcher,
    expected_lists,
    latest_states,
    metric,
    offline_states,
    scrape,
    send_raw,
    wait_for_metric,
)


def _events(n, users, seed):
    return shift_to_now(generate(SyntheticConfig(n_events=n, n_users=users, seed=seed)))


def _assert_states_match_replay(stack, registry, events):
    expected = offline_states(load_artifact(registry), events)
    stored = {u: UserState.decode(v) for u, v in latest_states(stack.settings).items()}
    assert set(stored) == set(expected)
    last_offset_ok = sum(1 for s in stored.values() if s.last_offset >= 0)
    assert last_offset_ok == len(expected)
    worst = max(float(np.max(np.abs(stored[u].vector.astype(np.float32) - expected[u].astype(np.float32))))
                for u in expected)
    assert worst <= 2e-3, f"largest state difference {worst}"
    per_user = Counter(e.user_id for e in events)
    assert all(len(stored[u].recent_items) == min(50, per_user[u]) for u in expected)


def _drain(watcher) -> set[str]:
    """Poll until nothing new arrives; -> the event ids recommended so far."""
    while True:
        before = len(watcher.records)
        if watcher.poll() == before:
            return set(watcher.event_ids)


def test_sigkill_mid_stream_redelivers_and_state_equals_exactly_once_replay(stack, model_registry):
    events = _events(20000, 500, seed=31)
    produce_events(stack.settings, events)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    done_at_kill = []
    for kill_at in (4000, 11000):
        worker = stack.start_worker(RECUR_COMMIT_INTERVAL="300")  # nothing is committed before the kill
        recs.wait_for(kill_at, timeout=120)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        done_at_kill.append(len(_drain(recs)))
    worker = stack.start_worker()
    got_ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=180))
    assert stack.stop_worker(worker) == 0
    recs.close()
    assert all(0 < n < len(events) for n in done_at_kill)  # each kill hit the stream mid-work
    assert got_ids == {e.event_id for e in events}  # every event has at least one recommendation
    strategies = Counter(r["strategy"] for r in recs.values())
    print(f"crash test: {len(events)} events in, events answered at each kill {done_at_kill}, "
          f"{len(recs.records)} recommendations out, by strategy {dict(strategies)}")
    # uncommitted events were delivered again, met a state that had applied them, and were not re-applied
    assert strategies["repeat"] > 0
    _assert_states_match_replay(stack, model_registry, events)


def test_sigterm_mid_stream_no_duplicates(stack, model_registry):
    events = _events(8000, 200, seed=32)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker()
    # a daemon: a failed assertion before the join must not keep pytest alive once the session's
    # broker is stopped (the generator's flush would wait for it for ever)
    producing = threading.Thread(target=_produce_paced, args=(stack.settings, events, 1000), daemon=True)
    producing.start()  # events still arrive for ~8 s
    recs.wait_for(1500, timeout=60)
    assert stack.stop_worker(worker) == 0
    answered = len(_drain(recs))
    producing.join()
    # and quietly: nothing from the interpreter's teardown (objects left frozen by the worker's
    # gc.freeze made torch's triton bindings print ~30 lines of "leaked" after every stop)
    assert "Closing event loop" in (log := worker.log_path.read_text()) and "leaked" not in log
    assert 1500 <= answered < len(events)  # the stop came mid-stream
    worker = stack.start_worker()
    recs.wait_for(len(events), timeout=90)
    assert stack.stop_worker(worker) == 0
    _drain(recs)
    values = recs.values()
    recs.close()
    counts = Counter(r["event_id"] for r in values)
    assert len(values) == len(events) and set(counts) == {e.event_id for e in events}
    assert max(counts.values()) == 1  # no recommendation duplicated
    assert not [r for r in values if r["strategy"] == "repeat"]  # no event met twice
    _assert_states_match_replay(stack, model_registry, events)


def _user(value: str) -> bytes:
    return json.dumps({"user_id": value, "item_id": "x", "event_type": "click", "timestamp": 1700000000000}).encode()


BAD_RECORDS = [  # (key, value, the reason it must be dead-lettered for)
    (b"u", b"{oops", "invalid_json"),
    (b"u", b"", "empty_value"),
    (b"u", None, "empty_value"),
    (b"u", b"[1, 2]", "not_an_object"),
    (b"u", b'{"user_id": "u", "item_id": 5.5, "event_type": "click", "timestamp": 1700000000000}', "wrong_type"),
    (b"u", _user(""), "bad_value"),
    (b"u", b'{"user_id": "u", "item_id": "x", "timestamp": 1700000000000}', "missing_field"),
    (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "hover", "timestamp": 1700000000000}', "unknown_event_type"),
    (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "click", "timestamp": "soon"}', "bad_timestamp"),
    (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "click", "timestamp": 5}', "absurd_timestamp"),
    (None, _user("u"), "missing_key"),
    (b"v", _user("u"), "key_mismatch"),
    (b"u", b'{"user_id": "u", "item_id": "' + b"x" * 20000 + b'", "event_type": "click", "timestamp": 1}', "too_large"),
]


def test_poison_records_are_dead_lettered_with_their_reason_and_counted(stack):
    from models.errors import DEAD_LETTER_REASONS

    on_events = set(DEAD_LETTER_REASONS) - {"forget_without_user"}  # that one's on the forget topic: test_privacy
    assert {reason for _, _, reason in BAD_RECORDS} == on_events  # every reason, once at least
    rng = random.Random(4)
    valid = _events(2000, 100, seed=33)
    stream, reasons = [], []  # reasons: the expected reason of each record in `stream`, None for valid ones
    for n, e in enumerate(valid):
        stream.append(encode_event(e))
        reasons.append(None)
        bad = [rng.choice(BAD_RECORDS)] if rng.random() < 0.01 else []
        if n == 1000:
            bad += [BAD_RECORDS[i % len(BAD_RECORDS)] for i in range(500)]  # a burst of 500
        stream += [(k, v) for k, v, _ in bad]
        reasons += [r for _, _, r in bad]
    where = send_raw(stack.settings, stream)
    expected = {pos: (stream[i], reasons[i]) for i, pos in enumerate(where) if reasons[i] is not None}
    worker = stack.start_worker()
    recs = stack.recommendations(expected=2000, timeout=90)
    dead = stack.dead_letters(expected=len(expected), timeout=30)
    assert worker.poll() is None  # never exited
    metrics = scrape(worker)
    assert stack.stop_worker(worker) == 0
    assert len(recs) == 2000 and {r["event_id"] for _, r in recs} == {e.event_id for e in valid}
    assert len(dead) == len(expected)
    seen = set()
    for key, value, h in dead:  # each bad record exactly once, with its own reason and origin
        pos = (int(h["recur.original.partition"]), int(h["recur.original.offset"]))
        (orig_key, orig_value), reason = expected[pos]
        assert (key, value) == (orig_key, orig_value)  # the original bytes (b"" stays b"", a null stays null)
        assert (h["recur.error.reason"], h["recur.error.class"]) == (reason, "BadRecord")
        assert h["recur.original.topic"] == stack.settings.events_topic and h["recur.error.detail"]
        seen.add(pos)
    assert seen == set(expected)
    by_reason = Counter(reason for _, reason in expected.values())
    for reason, n in by_reason.items():
        assert metric(metrics, "recur_dead_letters_total", f'reason="{reason}"') == n
    assert metric(metrics, "recur_dead_letters_total") == len(expected)
    _assert_dashboard_metrics_are_exported(metrics)
    print(f"poison test: {len(valid)} valid + {len(expected)} bad in; {len(recs)} recommendations, "
          f"{len(dead)} dead letters {dict(by_reason)}")


def _assert_dashboard_metrics_are_exported(metrics_text: str) -> None:
    """Every metric name the Grafana dashboard queries is one the live worker exports (the
    retraining service's are checked against that service in test_retrain.py)."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/recur.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"]
               for name in re.findall(r"recur_[a-z0-9_]+", t["expr"])}
    exported = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
                if line and not line.startswith("#")}
    assert len(queried) >= 15
    assert sorted({n for n in queried if not n.startswith("recur_retrain_")} - exported) == []


def _consumed(worker) -> float:
    return metric(scrape(worker), "recur_events_consumed_total")


def _rest_goes_to_a(stack, recs, a, events, sent: int, by_a: float) -> float:
    """After worker b left: the events not sent yet go out, worker a alone recommends them and
    stops cleanly; -> a's events consumed by then."""
    rest = events[sent:]
    produce_events(stack.settings, rest)
    ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=120))
    after_a = _consumed(a)
    assert stack.stop_worker(a) == 0
    recs.close()
    assert ids == {e.event_id for e in events}  # no event lost
    assert after_a - by_a >= len(rest)  # a took over every partition
    return after_a


@pytest.mark.parametrize("leaves", ["sigterm", "sigkill"])
def test_rebalance_two_workers_both_work_then_one_leaves(stack, model_registry, leaves):
    events = _events(6000, 300, seed=34)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    env = {"RECUR_COMMIT_INTERVAL": "300"} if leaves == "sigkill" else {}  # b's work is uncommitted when it dies
    a = stack.start_worker("a")
    b = stack.start_worker("b", **env)
    sent = 0
    while sent < 3000 and not (_consumed(a) > 0 and _consumed(b) > 0):  # until the group has split the partitions
        chunk = events[sent:sent + 200]
        produce_events(stack.settings, chunk)
        recs.wait_for_events({e.event_id for e in chunk}, timeout=60)
        sent += len(chunk)
    by_a, by_b = _consumed(a), _consumed(b)
    assert by_a > 0 and by_b > 0  # each worker processed events
    if leaves == "sigterm":
        assert stack.stop_worker(b) == 0  # its partitions move to worker a
    else:
        b.send_signal(signal.SIGKILL)  # dies: its partitions move to a after the session timeout
        b.wait(10)
    after_a = _rest_goes_to_a(stack, recs, a, events, sent, by_a)
    print(f"rebalance test ({leaves}): a {by_a:.0f} and b {by_b:.0f} events before b left, then a {after_a - by_a:.0f}")
    _assert_states_match_replay(stack, model_registry, events)


def _restored_onto_an_empty_disk(stack, events, env, before_restart=lambda: None):
    """All but the last 50 `events` served and the worker stopped; `before_restart()`; its local
    RocksDB deleted; a new worker, restored from the changelog alone, serves the last 50. -> (that
    worker, its users in state once restored, its metrics then, the recommendations by event id)."""
    first = events[:-50]
    produce_events(stack.settings, first)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker(**env)
    recs.wait_for_events({e.event_id for e in first}, timeout=60)
    assert stack.stop_worker(worker) == 0
    before_restart()
    shutil.rmtree(stack.workdir / "var-w")  # the table's local RocksDB is gone
    worker = stack.start_worker(**env)  # ready only once its recovery has finished
    users = wait_for_metric(worker, "recur_users_in_state", lambda n: n == 50)
    metrics = scrape(worker)
    produce_events(stack.settings, events[-50:])
    recs.wait_for_events({e.event_id for e in events}, timeout=60)
    assert stack.stop_worker(worker) == 0
    values = {r["event_id"]: r for r in recs.values()}
    recs.close()
    return worker, users, metrics, values


def _assert_lists_follow_the_restored_states(stack, registry, events, values):
    expected = expected_lists(load_artifact(registry), events)
    got = {e.event_id: [i["item_id"] for i in values[e.event_id]["items"]] for e in events[-50:]}
    assert {values[e.event_id]["strategy"] for e in events[-50:]} == {"lstm"}
    assert [i for i in got if got[i] != expected[i]] == []  # lists follow the restored states, not fresh ones
    _assert_states_match_replay(stack, registry, events)


def test_state_is_restored_in_bulk_from_the_changelog_onto_an_empty_disk(stack, model_registry):
    events = _events(1000, 50, seed=37)
    env = {"RECUR_EXCLUDE_PURCHASED": "false", "RECUR_USERS_COUNT_INTERVAL": "0.5",
           "RECUR_BULK_RESTORE_MIN_RECORDS": "1"}  # every partition through the bulk restore
    worker, users, _, values = _restored_onto_an_empty_disk(stack, events, env)
    assert users == 50  # every user's state is back
    log = worker.log_path.read_text()
    bulk = [int(n) for n in re.findall(r"restore: (\d+) changelog records written in bulk", log)]
    high, start = _restore_tables(log)[0]
    assert len(bulk) == 1 and bulk[0] >= 50, bulk  # at least one record per user, read in bulk
    assert sum(high.values()) > 0 and start == high, (high, start)  # faust's own recovery had nothing left to read
    print(f"bulk restore: {bulk[0]} changelog records for 50 users; faust's recovery started at the highwaters {high}")
    _assert_lists_follow_the_restored_states(stack, model_registry, events, values)


def _end_partition_with_a_commit_marker(settings, partition: int) -> int:
    """Write a state record of the changelog partition again, in a transaction: the partition's
    last offset is then the transaction's commit marker, which no consumer is given (faust's
    recovery waits for it). -> the partition's highwater (its last offset)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    topic = f"{settings.app_id}-user-state-changelog"
    part = TopicPartition(topic, partition)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    consumer.assign([part])
    consumer.seek_to_beginning(part)
    records = []
    while not records or consumer.position(part) < consumer.end_offsets([part])[part]:
        records += consumer.poll(2000).get(part, [])
    consumer.close()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{settings.app_id}-test")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, key=records[-1].key, value=records[-1].value, partition=partition)
    producer.commit_transaction()
    producer.close()
    return records[-1].offset + 2  # the record written again, then the marker


def test_a_restore_that_waits_for_records_no_consumer_is_given_is_started_again(stack, model_registry):
    """Faust's recovery waits, with no timeout, for every changelog offset up to the highwater; a
    commit marker at the end of a partition is one it never gets (in CI a lost record did the
    same: the worker never served again). The watch starts the recovery again after
    RECUR_RECOVERY_STALL_SECONDS, the bulk restore reads past the marker, the worker serves."""
    events = _events(1000, 50, seed=39)
    env = {"RECUR_EXCLUDE_PURCHASED": "false", "RECUR_USERS_COUNT_INTERVAL": "0.5",
           "RECUR_RECOVERY_STALL_SECONDS": "3"}
    marker = []
    worker, users, metrics, values = _restored_onto_an_empty_disk(  # faust's own recovery first: few records
        stack, events, env, lambda: marker.append(_end_partition_with_a_commit_marker(stack.settings, 0)))
    restarts = metric(metrics, "recur_recovery_restarts_total")
    log = worker.log_path.read_text()
    waits = _restore_tables(log)
    assert waits[0][0][0] == marker[0] and waits[0][1][0] == -1, waits[0]  # faust's recovery read partition 0 from the start
    assert restarts >= 1 and "starting the recovery again" in log
    assert f"restore: partition 0 read through offset {marker[0]} (offsets {marker[0]}..{marker[0]} hold no record)" in log
    assert users == 50  # every user's state is back
    print(f"stalled restore: partition 0's highwater {marker[0]} is a commit marker; restarts {restarts:.0f}")
    _assert_lists_follow_the_restored_states(stack, model_registry, events, values)


def test_broker_restart_mid_stream(stack, local_broker):
    if local_broker is None:
        pytest.skip("RECUR_BOOTSTRAP names an external broker; this test restarts the local one")
    events = _events(3000, 150, seed=35)
    produce_events(stack.settings, events[:1500])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker()
    recs.wait_for(1000, timeout=60)
    recs.close()
    local_broker.stop()  # returns once the broker process has exited
    local_broker.start()
    produce_events(stack.settings, events[1500:])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=150))
    recs.close()
    assert worker.poll() is None, worker.log_path.read_text()[-2000:]
    assert ids == {e.event_id for e in events}
    assert stack.stop_worker(worker) == 0


def _versions_per_partition(records) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        out.setdefault(r.partition, []).append(json.loads(r.value)["model_version"])
    return out


def test_a_model_published_under_load_is_swapped_in_and_a_broken_one_is_refused(stack, model_registry, tmp_path):
    registry = tmp_path / "registry"
    shutil.copytree(model_registry, registry)
    old = load_artifact(registry)
    events = _events(4000, 100, seed=36)
    produce_events(stack.settings, events[:1000])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker(RECUR_MODELS_DIR=str(registry), RECUR_MODEL_POLL_INTERVAL="0.5",
                                RECUR_EXCLUDE_PURCHASED="false")
    recs.wait_for(1000, timeout=60)
    sessions = sorted(sessionize(generate(SyntheticConfig(n_events=15000, seed=9))), key=lambda s: s.times[0])
    result = train(sessions, dict(embedding_dim=16, hidden_dim=24), TrainConfig(epochs=1, refit=False, seed=2))
    producing = threading.Thread(target=_produce_paced, args=(stack.settings, events[1000:3000], 800),
                                 daemon=True)  # as above: a failure must not hang the run
    producing.start()  # ~800 events/s for ~2.5 s: the swap lands between batches of a live stream
    recs.wait_for(1300, timeout=60)
    new_path = save_artifact(registry, result.model, result.vocab, {"source": "reload test"}, publish=True)
    swapped = wait_for_metric(worker, "recur_model_info", lambda v: v == 1, labels=f'version="{new_path.name}"')
    producing.join()
    # a published version whose weights do not match their checksum: refused once, the new model stays
    broken = registry / (new_path.name + "-broken")
    shutil.copytree(new_path, broken)
    meta = json.loads((broken / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "version": broken.name}))
    (broken / "weights.pt").write_bytes((broken / "weights.pt").read_bytes()[:-10] + b"0" * 10)
    publish_version(registry, broken.name)
    failures = wait_for_metric(worker, "recur_model_load_failures_total", lambda v: v >= 1)
    produce_events(stack.settings, events[3000:])
    recs.wait_for_events({e.event_id for e in events}, timeout=60)
    metrics = scrape(worker)
    assert stack.stop_worker(worker) == 0
    values, records = recs.values(), list(recs.records)
    recs.close()
    assert swapped == 1 and failures == 1 and metric(metrics, "recur_model_load_failures_total") == 1
    # the info names the scorer built for the new model: auto's choice for its items on this CPU
    scorer = choose(stack.settings.scorer_config(), torch.device("cpu"), result.model.config.n_items)
    assert metric(metrics, "recur_model_info", f'scorer="{scorer}",version="{new_path.name}"') == 1
    assert len(values) == 4000
    by_id = {r["event_id"]: r for r in values}
    assert {by_id[e.event_id]["model_version"] for e in events[:1000]} == {old.version}
    assert {by_id[e.event_id]["model_version"] for e in events[3000:]} == {new_path.name}  # not the broken one
    under_load = Counter(by_id[e.event_id]["model_version"] for e in events[1000:3000])
    assert under_load[old.version] > 0 and under_load[new_path.name] > 0  # swapped while events flowed
    for versions in _versions_per_partition(records).values():  # once swapped, never back
        assert versions == sorted(versions, key=lambda v: v == new_path.name)
    # every list is the one its model gives: the old model's as before, the new one's from re-warmed states
    first_new: dict[str, int] = {}
    per_user = Counter()
    for e in events:
        if by_id[e.event_id]["model_version"] == new_path.name and e.user_id not in first_new:
            first_new[e.user_id] = per_user[e.user_id]
        per_user[e.user_id] += 1
    expected = {**expected_lists(old, [e for e in events if by_id[e.event_id]["model_version"] == old.version]),
                **expected_lists(load_artifact(new_path), [e for e in events if e.user_id in first_new],
                                 rewarm_at=first_new)}
    checked = [e.event_id for e in events if e.event_id in expected and
               by_id[e.event_id]["strategy"] == "lstm" and by_id[e.event_id]["items"][0]["score"] != 0.0]
    wrong = [i for i in checked if [x["item_id"] for x in by_id[i]["items"]] != expected[i]]
    assert len(checked) > 3500 and wrong == []
    assert metric(metrics, "recur_users_rewarmed_total") >= 1


def _produce_paced(settings, events, per_second: int) -> None:
    """A load generator: `events` at a steady rate (the pacing is the load, not a wait for a result)."""
    from pipeline.clients import producer
    from pipeline.records import encode_event

    prod = producer(settings)
    started = time.monotonic()
    for n, e in enumerate(events):
        key, value = encode_event(e)
        prod.send(settings.events_topic, key=key, value=value)
        if n % 20 == 19:
            prod.flush()
            time.sleep(max(0.0, started + (n + 1) / per_second - time.monotonic()))
    prod.flush()
    prod.close()


def _restore_tables(log: str) -> list[tuple[dict[int, int], dict[int, int]]]:
    """Faust's recovery tables in a worker log, in order: [(highwater, reading starts at)] per
    recovery, each {changelog partition: offset} (the active partitions)."""
    def rows(block: str) -> dict[int, int]:
        table = block.split("\n[")[0]  # up to the next log line
        return {int(p): int(o) for p, o in re.findall(r"^\|[^|]*\|\s*(\d+)\s*\|\s*(-?\d+)\s*\|\s*$", table, flags=re.M)}

    out = []
    for block in log.split("Highwater for active changelog partitions:")[1:]:
        high, _, rest = block.partition("active offsets at start of reading:")
        out.append((rows(high), rows(rest)))
    return out


def test_with_a_standby_replica_a_killed_workers_partitions_move_without_a_full_restore(stack, model_registry):
    events = _events(6000, 300, seed=38)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    a = stack.start_worker("a", RECUR_STANDBY_REPLICAS="1")
    b = stack.start_worker("b", RECUR_STANDBY_REPLICAS="1")
    sent = 0
    while sent < 4000 and not (sent >= 3000 and _consumed(a) > 0 and _consumed(b) > 0):  # split, with state on both
        chunk = events[sent:sent + 200]
        produce_events(stack.settings, chunk)
        recs.wait_for_events({e.event_id for e in chunk}, timeout=60)
        sent += len(chunk)
    by_a, by_b = _consumed(a), _consumed(b)
    assert by_a > 0 and by_b > 0
    log_before = a.log_path.read_text()
    recoveries_before = len(_restore_tables(log_before))
    b.send_signal(signal.SIGKILL)  # its partitions move to a, whose standbys of them are promoted
    b.wait(10)
    _rest_goes_to_a(stack, recs, a, events, sent, by_a)
    high, start = _restore_tables(a.log_path.read_text())[recoveries_before]  # the take-over's recovery
    in_bulk = sum(int(n) for n in re.findall(r"restore: (\d+) changelog records written in bulk",
                                             a.log_path.read_text()[len(log_before):]))
    replayed = in_bulk + sum(max(0, high[p] - max(start.get(p, -1), 0)) for p in high)  # bulk, then faust's
    total = sum(high.values())
    assert total > 0 and replayed < total / 4, (high, start)  # from the standbys' offsets, not from the start
    _assert_states_match_replay(stack, model_registry, events)  # each event applied to its user's state once
    print(f"standby test: a {by_a:.0f}, b {by_b:.0f} events before b was killed; a's take-over replayed "
          f"{replayed} of {total} changelog records of its active partitions ({high} / {start})")
