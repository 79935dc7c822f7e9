"""Issue 4's scenarios: crashes, clean stops, poison, rebalance, broker restart, model reload.
Real broker, worker(s) as subprocesses."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections import Counter

import numpy as np
import pytest

from models.artifacts import load_artifact, save_artifact
from models.data import sessionize
from models.online import UserState
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from pipeline.clients import produce_events, produce_raw, shift_to_now
from pipeline.records import encode_event

from .conftest import Watcher, latest_states, offline_states


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


def test_sigkill_twice_state_equals_exactly_once_replay(stack, model_registry):
    events = _events(20000, 500, seed=31)
    produce_events(stack.settings, events)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    for kill_at in (4000, 11000):
        worker = stack.start_worker()
        recs.wait_for(kill_at, timeout=120)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    worker = stack.start_worker()
    got_ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=180))
    assert stack.stop_worker(worker) == 0
    recs.close()
    assert got_ids == {e.event_id for e in events}  # every event has at least one recommendation
    strategies = Counter(r["strategy"] for r in recs.values())
    print(f"crash test: {len(events)} events in, {len(recs.records)} recommendations out, by strategy {dict(strategies)}")
    _assert_states_match_replay(stack, model_registry, events)


def test_sigterm_mid_stream_no_duplicates(stack, model_registry):
    events = _events(4000, 200, seed=32)
    produce_events(stack.settings, events)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker()
    recs.wait_for(1500, timeout=60)
    assert stack.stop_worker(worker) == 0
    worker = stack.start_worker()
    recs.wait_for(4000, timeout=90, quiet=3)
    assert stack.stop_worker(worker) == 0
    values = recs.values()
    recs.close()
    counts = Counter(r["event_id"] for r in values)
    assert len(values) == 4000 and set(counts) == {e.event_id for e in events}
    assert max(counts.values()) == 1  # no recommendation duplicated
    assert not [r for r in values if r["strategy"] == "repeat"]  # no event met twice
    _assert_states_match_replay(stack, model_registry, events)


def test_poison_records_are_dead_lettered_and_counted(stack):
    rng = random.Random(4)
    valid = _events(2000, 100, seed=33)
    bad_kinds = [
        (b"u", b"{oops"),
        (b"u", b'{"user_id": "u", "item_id": 5.5, "event_type": "click", "timestamp": 1700000000000}'),
        (b"u", b'{"user_id": "u", "item_id": "x", "timestamp": 1700000000000}'),
        (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "hover", "timestamp": 1700000000000}'),
        (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "click", "timestamp": "soon"}'),
        (b"u", b'{"user_id": "u", "item_id": "x", "event_type": "click", "timestamp": 5}'),
        (b"v", b'{"user_id": "u", "item_id": "x", "event_type": "click", "timestamp": 1700000000000}'),
        (b"u", b'{"user_id": "u", "item_id": "' + b"x" * 20000 + b'", "event_type": "click", "timestamp": 1}'),
    ]
    stream: list[tuple[bytes | None, bytes]] = []
    injected = 0
    for n, e in enumerate(valid):
        stream.append(encode_event(e))
        if rng.random() < 0.01:
            stream.append(rng.choice(bad_kinds))
            injected += 1
        if n == 1000:
            stream.extend(bad_kinds[n % len(bad_kinds)] for n in range(500))  # a burst of 500
            injected += 500
    produce_raw(stack.settings, stream)
    worker = stack.start_worker()
    recs = stack.recommendations(expected=2000, timeout=90)
    dead = stack.dead_letters(expected=injected, timeout=30)
    assert worker.poll() is None  # never exited
    metrics = _scrape(worker)
    assert stack.stop_worker(worker) == 0
    assert len(recs) == 2000 and {r["event_id"] for _, r in recs} == {e.event_id for e in valid}
    assert len(dead) == injected
    reasons = Counter(h["recur.error.reason"] for _, _, h in dead)
    assert set(reasons) <= {"invalid_json", "wrong_type", "missing_field", "unknown_event_type", "bad_timestamp",
                            "absurd_timestamp", "key_mismatch", "too_large"}
    assert all(h["recur.error.detail"] and h["recur.original.offset"].isdigit() for _, _, h in dead)
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("recur_dead_letters_total{"))
    assert counted == injected
    _assert_dashboard_metrics_are_exported(metrics)
    print(f"poison test: {len(valid)} valid + {injected} bad in; {len(recs)} recommendations, {len(dead)} dead letters {dict(reasons)}")


def _assert_dashboard_metrics_are_exported(metrics_text: str) -> None:
    """Every metric name the Grafana dashboard queries is one the live worker exports."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/recur.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"]
               for name in re.findall(r"recur_[a-z0-9_]+", t["expr"])}
    exported = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
                if line and not line.startswith("#")}
    assert len(queried) >= 15
    assert sorted(queried - exported) == []


def _scrape(worker) -> str:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_rebalance_two_workers_one_stops(stack, model_registry):
    events = _events(6000, 300, seed=34)
    first, rest = events[:3000], events[3000:]
    produce_events(stack.settings, first)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    a = stack.start_worker("a")
    b = stack.start_worker("b")
    recs.wait_for(2000, timeout=90)
    assert stack.stop_worker(b) == 0  # its partitions move to worker a
    produce_events(stack.settings, rest)
    ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=120))
    assert stack.stop_worker(a) == 0
    recs.close()
    assert ids == {e.event_id for e in events}  # no event lost
    _assert_states_match_replay(stack, model_registry, events)


def test_broker_restart_mid_stream(stack, local_broker):
    if local_broker is None:
        pytest.skip("RECUR_BOOTSTRAP names an external broker; this test restarts the local one")
    events = _events(3000, 150, seed=35)
    produce_events(stack.settings, events[:1500])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker()
    recs.wait_for(1000, timeout=60)
    recs.close()
    local_broker.stop()
    time.sleep(3)
    local_broker.start()
    produce_events(stack.settings, events[1500:])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    ids = set(recs.wait_for_events({e.event_id for e in events}, timeout=150))
    recs.close()
    assert worker.poll() is None, worker.log_path.read_text()[-2000:]
    assert ids == {e.event_id for e in events}
    assert stack.stop_worker(worker) == 0


def test_new_model_version_is_used_without_restart(stack, model_registry, tmp_path):
    registry = tmp_path / "registry"
    shutil.copytree(model_registry, registry)
    old_version = load_artifact(registry).version
    events = _events(2000, 100, seed=36)
    produce_events(stack.settings, events[:1000])
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker(RECUR_MODELS_DIR=str(registry), RECUR_MODEL_POLL_INTERVAL="0.5")
    recs.wait_for(1000, timeout=60)
    sessions = sorted(sessionize(generate(SyntheticConfig(n_events=6000, seed=9))), key=lambda s: s.times[0])
    result = train(sessions, dict(embedding_dim=16, hidden_dim=24), TrainConfig(epochs=1, refit=False, seed=2))
    new_version = save_artifact(registry, result.model, result.vocab, {"source": "reload test"}, publish=True).name
    time.sleep(3)  # the worker polls every 0.5 s and loads off the hot path
    produce_events(stack.settings, events[1000:])
    recs.wait_for(2000, timeout=60, quiet=2)
    pid_alive = worker.poll() is None
    metrics = _scrape(worker)
    assert stack.stop_worker(worker) == 0
    values = recs.values()
    recs.close()
    assert pid_alive and len(values) == 2000
    assert {r["model_version"] for r in values[:1000]} == {old_version}
    later = [r for r in values if r["event_id"] in {e.event_id for e in events[1000:]}]
    assert len(later) == 1000 and {r["model_version"] for r in later} == {new_version}
    assert f'recur_model_info{{version="{new_version}"}} 1.0' in metrics
    assert "recur_users_rewarmed_total" in metrics and json.dumps(new_version)
