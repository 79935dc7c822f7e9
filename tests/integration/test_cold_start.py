"""Issue 13, point 4: a worker with no model sends K distinct items, and its trending lists
survive a restart (rebuilt from the snapshots)."""

from __future__ import annotations

import time
from collections import Counter

from models.events import Event
from models.synthetic import SyntheticConfig, generate
from pipeline.clients import produce_events, shift_to_now
from pipeline.snapshot_tools import list_files

from .conftest import Watcher, scrape


def test_after_a_restart_a_cold_worker_sends_the_trending_items_of_before(stack, tmp_path):
    env = {"RECUR_MODELS_DIR": str(tmp_path / "empty-registry"), "RECUR_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
           "RECUR_SNAPSHOT_INTERVAL": "1"}
    before = shift_to_now(generate(SyntheticConfig(n_events=1000, n_users=50, seed=61)))
    produce_events(stack.settings, before)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    worker = stack.start_worker(**env)
    recs.wait_for_events({e.event_id for e in before}, timeout=90)
    deadline = time.monotonic() + 60
    while list_files(env["RECUR_SNAPSHOT_DIR"]).distinct_events < 1000 and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the files: the snapshot consumer writes every second
    assert stack.stop_worker(worker) == 0
    assert list_files(env["RECUR_SNAPSHOT_DIR"]).distinct_events == 1000

    counts = Counter(e.item_id for e in before)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert ranked[19][1] >= 2  # a new item (counted once) cannot enter the top 20
    expected = [item for item, _ in ranked[:20]]
    now = max(e.timestamp_ms for e in before)
    newcomers = [Event(f"new-{n}", f"fresh-{n}", 0, now + n, event_id=f"new-{n}") for n in range(64)]
    worker = stack.start_worker(**env)  # a fresh process: trending starts from the snapshots, not from nothing
    produce_events(stack.settings, newcomers)
    recs.wait_for_events({e.event_id for e in newcomers}, timeout=60)
    assert stack.stop_worker(worker) == 0
    lists = {r["event_id"]: r for r in recs.values() if r["event_id"].startswith("new-")}
    recs.close()
    assert len(lists) == 64
    assert {r["strategy"] for r in lists.values()} == {"trending"}
    assert all([i["item_id"] for i in r["items"]] == expected for r in lists.values())
    assert "trending rebuilt from the newest 1000 snapshot events" in worker.log_path.read_text()


def test_a_model_that_knows_none_of_the_items_says_so_in_the_log_and_a_metric(stack, foreign_registry):
    events = shift_to_now(generate(SyntheticConfig(n_events=1200, n_users=60, seed=62)))
    produce_events(stack.settings, events)
    worker = stack.start_worker(RECUR_MODELS_DIR=str(foreign_registry))
    stack.recommendations(expected=1200, timeout=60)
    metrics = scrape(worker)
    assert stack.stop_worker(worker) == 0
    assert "recur_model_known_items_ratio 0.0" in metrics
    log = worker.log_path.read_text()
    assert log.count("knows none of the items of the last 1") == 1  # once per version, not per batch
