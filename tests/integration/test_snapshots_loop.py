"""Issue 5: snapshots exactly once across a SIGKILL, training from them, the closed loop."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict

from models.artifacts import save_artifact
from models.baselines import popular
from models.data import index_sessions, sessionize
from models.evaluate import evaluate_model, evaluate_scorer, online_hit_rate
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from pipeline.clients import produce_events, shift_to_now
from pipeline.snapshot_files import read_events, read_sessions
from pipeline.snapshot_tools import list_files

from .conftest import Watcher, wait_for_metric


def _kill_during_snapshot(worker, snap_dir, timeout: float) -> bool:
    """SIGKILL the worker as soon as a snapshot's temporary file exists; -> whether one was caught."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _root, _dirs, files in os.walk(snap_dir):
            if any(".tmp-" in f for f in files):
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
                return True
        time.sleep(0.001)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    return False


def test_every_event_is_in_the_snapshots_exactly_once_after_sigkill(stack, tmp_path):
    snap = tmp_path / "snapshots"
    env = {"RECUR_SNAPSHOT_DIR": str(snap), "RECUR_SNAPSHOT_INTERVAL": "2"}  # the first write is large
    events = shift_to_now(generate(SyntheticConfig(n_events=8000, n_users=300, seed=41)))
    produce_events(stack.settings, events)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker(**env)
    caught = _kill_during_snapshot(worker, snap, timeout=30)
    worker = stack.start_worker(**env)
    recs.wait_for_events({e.event_id for e in events}, timeout=120)
    assert stack.stop_worker(worker) == 0  # clean stop flushes the last snapshot
    recs.close()
    files = list_files(str(snap)).files  # every file under its final name reads as Parquet
    assert files and all(f.rows > 0 for f in files)
    got = read_events(snap)
    key = lambda e: (e.user_id, e.item_id, e.event_type, e.timestamp_ms)  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, events))  # each event exactly once
    per_user = defaultdict(list)
    for e in sorted(got, key=lambda e: int(e.event_id.split("-")[1])):  # offset order
        per_user[e.user_id].append(key(e))
    expected = defaultdict(list)
    for e in events:
        expected[e.user_id].append(key(e))
    assert per_user == expected  # in order per user
    raw_rows = sum(f.events for f in files)
    print(f"snapshot test: killed during a snapshot write: {caught}; {len(events)} events, "
          f"{raw_rows} rows' events in {len(files)} files, {len(got)} after dedup")


def test_closed_loop_retrained_model_doubles_the_online_hit_rate(stack, tmp_path):
    shop = dict(n_items=400, n_categories=20, catalog_seed=5)
    events = shift_to_now(generate(SyntheticConfig(n_events=12000, n_users=300, seed=42, **shop)))
    before, after = events[:10000], events[10000:]
    registry, snap = tmp_path / "registry", tmp_path / "snapshots"
    worker = stack.start_worker(RECUR_MODELS_DIR=str(registry), RECUR_SNAPSHOT_DIR=str(snap),
                                RECUR_SNAPSHOT_INTERVAL="1", RECUR_MODEL_POLL_INTERVAL="0.5")
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    produce_events(stack.settings, before)
    recs.wait_for_events({e.event_id for e in before}, timeout=90)
    deadline = time.monotonic() + 20  # the next snapshot flushes (every 1 s; fetches wait up to 0.5 s)
    while True:
        sessions = read_sessions(snap) if list_files(str(snap)).files else []
        if sum(len(s) for s in sessions) >= len(before) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(len(s) for s in sessions) == len(before)
    result = train(sessions, dict(embedding_dim=32, hidden_dim=64), TrainConfig(epochs=8, seed=1))
    held_out = sorted(sessionize(generate(SyntheticConfig(n_events=3000, n_users=60, seed=99, **shop))),
                      key=lambda s: s.times[0])
    test_idx = index_sessions(held_out, result.vocab)
    lstm = evaluate_model(result.model, test_idx)
    pop = evaluate_scorer(popular(index_sessions(sessions, result.vocab), len(result.vocab)), test_idx)
    assert lstm["recall@20"] > pop["recall@20"] and lstm["mrr@20"] > pop["mrr@20"]
    version = save_artifact(registry, result.model, result.vocab, {"source": str(snap)}, publish=True).name
    # polled every 0.5 s, loaded off the hot path, swapped before the next batch
    assert wait_for_metric(worker, "recur_model_info", lambda v: v == 1, labels=f'version="{version}"') == 1
    produce_events(stack.settings, after)
    recs.wait_for_events({e.event_id for e in events}, timeout=90)
    assert stack.stop_worker(worker) == 0
    values = recs.values()
    recs.close()
    by_id = {r["event_id"]: r for r in values}
    assert {by_id[e.event_id]["strategy"] for e in before} == {"trending"}
    assert {by_id[e.event_id]["model_version"] for e in after} == {version}
    lists = {r["event_id"]: [i["item_id"] for i in r["items"]] for r in values}
    cold, _ = online_hit_rate(before, lists)
    rate_before, n_before = online_hit_rate(before, lists, {e.event_id for e in before[-2000:]})
    rate_after, n_after = online_hit_rate(events, lists, {e.event_id for e in after})
    assert n_before > 1800 and n_after > 1800
    print(f"closed loop: offline recall@20 lstm {lstm['recall@20']:.3f} vs pop {pop['recall@20']:.3f}; "
          f"online hit rate trending {rate_before:.3f} (last 2000 before) -> lstm {rate_after:.3f} (2000 after); "
          f"whole cold phase {cold:.3f}")
    assert rate_after >= 2 * rate_before
