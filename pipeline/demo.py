"""`recur demo`: the whole path on one machine, start to finish.

Starts the local broker (unless RECUR_BOOTSTRAP is set), creates the demo's own topics
(`demo-events`, `demo-recommendations`, `demo-events-dlq`), trains a small model on synthetic
events into the demo's own registry (`<var>/demo/models`) if it has none, starts the worker as a
subprocess (app id `recur-demo`, tables under `<var>/demo`), streams synthetic events, prints a
sample of the recommendations as they arrive, then stops the worker and the broker cleanly.
The user's own topics, registry and worker state are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from models.artifacts import current_version
from pipeline import worker_process
from pipeline.clients import consume, create_topics, end_offsets, produce_events, shift_to_now
from pipeline.config import Settings
from pipeline.kafka_local import start_if_needed


def _say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def _stop(worker: subprocess.Popen | None) -> None:
    if worker is not None and worker.poll() is None:
        code = worker_process.stop(worker)
        _say(f"worker stopped (exit {code})" if code is not None else "worker did not stop within 60s; killed")


def demo_settings(settings: Settings) -> Settings:
    """The demo's own namespace on the same broker: topics, consumer groups, registry, tables,
    snapshots and ports apart from the user's, so a demo never reads or changes them."""
    home = settings.var_path / "demo"
    return dataclasses.replace(
        settings, app_id="recur-demo", events_topic="demo-events", recommendations_topic="demo-recommendations",
        dlq_topic="demo-events-dlq", models_dir=str(home / "models"), snapshot_dir=str(home / "snapshots"),
        web_port=worker_process.free_port(), metrics_port=worker_process.free_port())


def run_demo(user_settings: Settings, n_events: int) -> int:
    broker = None
    worker = None
    settings = demo_settings(user_settings)
    try:
        broker, line = start_if_needed(user_settings)  # the local broker lives under the user's var dir
        _say(line)
        created = create_topics(settings)
        _say(f"topics ready ({', '.join(created) or 'already there'}; the demo's own, not yours)")
        if current_version(settings.models_path) is None:
            _say(f"training the demo's model on 20000 synthetic events into {settings.models_path}")
            subprocess.run([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", "train",
                            "--synthetic", "20000", "--epochs", "4", "--no-refit", "--publish",
                            "--out", str(settings.models_path)], check=True)
        _say(f"model {current_version(settings.models_path)} (the demo's registry {settings.models_path})")
        log_path = settings.var_path / "demo" / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        worker_settings = dataclasses.replace(settings, bootstrap=settings.bootstrap_servers,
                                              var_dir=str(settings.var_path / "demo"))
        worker = worker_process.start(worker_settings, log_path)
        _say(f"worker started (pid {worker.pid}, log {log_path})")
        start = end_offsets(settings, settings.recommendations_topic)
        from models.synthetic import SyntheticConfig, generate

        events = shift_to_now(generate(SyntheticConfig(n_events=n_events, n_users=200, seed=11)))
        n = produce_events(settings, events)
        _say(f"produced {n} synthetic events for 200 users")
        got, shown = 0, 0
        strategies: dict[str, int] = {}
        for _key, value, _h in consume(settings, settings.recommendations_topic, n, 60.0, start_offsets=start):
            if value is None:  # a forgotten user's tombstone
                continue
            rec = json.loads(value)
            got += 1
            strategies[rec["strategy"]] = strategies.get(rec["strategy"], 0) + 1
            if got % max(1, n // 8) == 1 and shown < 8:
                shown += 1
                top = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in rec["items"][:5])
                _say(f"{rec['user_id']} event {rec['event_id']} -> {top}, ... "
                     f"[{len(rec['items'])} items, {rec['strategy']}]")
        _say(f"received {got} recommendations for {n} events; by strategy {strategies}")
        if not strategies.get("lstm"):
            _say(f"no list came from the LSTM: see {log_path}")
            return 1
        return 0 if got == n else 1
    finally:
        _stop(worker)
        if broker is not None:
            _say(broker.stop())


def run_loop_demo(settings: Settings, n_events: int) -> int:
    """The closed loop: cold worker -> snapshots -> `recur retrain` on them -> publish -> hit rate up."""
    from models.evaluate import online_hit_rate
    from models.synthetic import SyntheticConfig, generate

    run = time.strftime("%Y%m%d%H%M%S")
    home = settings.var_path / f"loop-{run}"
    settings = dataclasses.replace(
        settings, app_id=f"recur-loop-{run}", events_topic=f"loop-{run}-events",
        recommendations_topic=f"loop-{run}-recommendations", dlq_topic=f"loop-{run}-dlq",
        models_dir=str(home / "models"), snapshot_dir=str(home / "snapshots"),
    )
    worker_settings = dataclasses.replace(settings, bootstrap=settings.bootstrap_servers, var_dir=str(home),
                                          snapshot_interval=2.0, model_poll_interval=1.0)
    env = {**os.environ, **worker_settings.to_env()}
    shop = dict(n_items=400, n_categories=20, catalog_seed=5)
    events = shift_to_now(generate(SyntheticConfig(n_events=n_events + 2000, n_users=300, seed=42, **shop)))
    before, after = events[:n_events], events[n_events:]
    broker = worker = None
    try:
        broker, line = start_if_needed(settings)
        _say(line)
        create_topics(settings)
        home.mkdir(parents=True, exist_ok=True)
        worker = worker_process.start(worker_settings, home / "worker.log")
        _say(f"1. worker started cold (empty registry {settings.models_dir}), snapshots every 2s to {settings.snapshot_dir}")
        lists: dict[str, list[str]] = {}
        start = end_offsets(settings, settings.recommendations_topic)
        produce_events(settings, before)
        for _k, value, _h in consume(settings, settings.recommendations_topic, len(before), 90.0, start_offsets=start):
            if value is None:  # a forgotten user's tombstone
                continue
            rec = json.loads(value)
            lists[rec["event_id"]] = [i["item_id"] for i in rec["items"]]
        cold, _ = online_hit_rate(before, lists, {e.event_id for e in before[-2000:]})
        _say(f"2. streamed {len(before)} events; trending-only hit rate over the last 2000: {cold:.3f}")
        time.sleep(3)
        _say("3. retraining on the snapshots: recur retrain (challenger on all but the newest 5% of sessions, "
             "published if it beats the live model there)")
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", "retrain", "--json",
                              "--window", "30d", "--epochs", "8", "--hidden-dim", "64", "--embedding-dim", "32"],
                             env=env, capture_output=True, text=True)
        report = json.loads(done.stdout) if done.stdout.strip() else {"decision": "failed", "reason": done.stderr[-300:]}
        _say(f"   {report['decision']}: {report['reason']}")
        if report["decision"] != "published":
            return 1
        version = current_version(settings.models_path)
        time.sleep(3)
        _say(f"4. published {version}; the worker swaps it in without a restart")
        start = end_offsets(settings, settings.recommendations_topic)
        produce_events(settings, after)
        versions = set()
        for _k, value, _h in consume(settings, settings.recommendations_topic, len(after), 90.0, start_offsets=start):
            if value is None:  # a forgotten user's tombstone
                continue
            rec = json.loads(value)
            lists[rec["event_id"]] = [i["item_id"] for i in rec["items"]]
            versions.add(rec["model_version"])
        warm, _ = online_hit_rate(events, lists, {e.event_id for e in after})
        _say(f"5. streamed {len(after)} more events with model {sorted(versions)}; hit rate {warm:.3f} "
             f"({warm / max(cold, 1e-9):.1f}x the cold start)")
        from pipeline.snapshot_tools import list_files

        listing = list_files(settings.snapshot_dir)
        _say(f"6. snapshots: {len(listing.files)} files, {listing.distinct_events} events (recur snapshots ls --dir {settings.snapshot_dir})")
        return 0 if warm >= 2 * cold and versions == {version} else 1
    finally:
        _stop(worker)
        if broker is not None:
            _say(broker.stop())
