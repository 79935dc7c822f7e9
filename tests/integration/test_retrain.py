"""Issue 15: the retraining service. A challenger from the worker's own snapshots replaces a weak
live model in the running worker; the service runs on a timer and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from models.artifacts import current_version, save_artifact
from models.data import sessionize
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from pipeline import worker_process
from pipeline.clients import produce_events, shift_to_now
from pipeline.snapshot_files import read_sessions
from pipeline.snapshot_tools import list_files

from .conftest import Watcher, metric, wait_for_metric

SHOP = dict(n_items=200, n_categories=8, catalog_seed=9)
FAST = ["--epochs", "10", "--lr", "0.01", "--no-refit", "--embedding-dim", "16", "--hidden-dim", "32",
        "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[2]


def _recur(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"timed out after {timeout:g}s waiting for {what}"
            return value
        time.sleep(0.3)


def test_a_challenger_from_the_snapshots_replaces_a_weak_live_model_in_the_running_worker(stack, tmp_path):
    registry, snap = tmp_path / "registry", tmp_path / "snapshots"
    events = shift_to_now(generate(SyntheticConfig(n_events=9000, n_users=200, seed=21, **SHOP)))
    before, after = events[:8000], events[8000:]
    # the live model: one epoch on a tenth of the shop's sessions, a weak but working model
    weak = train(sorted(sessionize(before[:800]), key=lambda s: s.times[0]), dict(embedding_dim=8, hidden_dim=8),
                 TrainConfig(epochs=1, refit=False, seed=1))
    live = save_artifact(registry, weak.model, weak.vocab, {"source": "weak"}, publish=True).name
    worker = stack.start_worker(RECUR_MODELS_DIR=str(registry), RECUR_SNAPSHOT_DIR=str(snap),
                                RECUR_SNAPSHOT_INTERVAL="1", RECUR_MODEL_POLL_INTERVAL="0.5")
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    produce_events(stack.settings, before)
    recs.wait_for_events({e.event_id for e in before}, timeout=90)
    _wait(lambda: list_files(str(snap)).files and sum(len(s) for s in read_sessions(snap)) == len(before), 30,
          "every event in the snapshots")

    env = {**stack.env, "RECUR_MODELS_DIR": str(registry), "RECUR_SNAPSHOT_DIR": str(snap)}
    run = _recur(["retrain", "--json", "--window", "30d", *FAST], env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["decision"] == "published", report["reason"]
    assert report["live"]["version"] == live and report["data"]["test_events"] >= 100
    new = report["published_version"]
    assert current_version(registry) == new
    assert report["challenger"]["metrics"]["mrr@20"] > report["live"]["metrics"]["mrr@20"]
    assert json.loads((registry / new / "retrain-report.json").read_text())["decision"] == "published"
    assert re.search(r"retrain: published: challenger mrr@20 [0-9.]+ >= live", run.stderr)

    # the running worker swaps it in and serves with it
    assert wait_for_metric(worker, "recur_model_info", lambda v: v == 1, labels=f'version="{new}"') == 1
    produce_events(stack.settings, after)
    recs.wait_for_events({e.event_id for e in events}, timeout=90)
    by_id = {r["event_id"]: r for r in recs.values()}
    assert {by_id[e.event_id]["model_version"] for e in after} == {new}
    # the online hit rate is counted per model version
    text = _scrape(worker.metrics_port)
    assert metric(text, "recur_online_hit_opportunities_total", f'model="{live}"') > 1000
    assert metric(text, "recur_online_hit_opportunities_total", f'model="{new}"') > 500
    assert stack.stop_worker(worker) == 0
    recs.close()
    print(f"retrain: live {live} mrr@20 {report['live']['metrics']['mrr@20']} -> published {new} "
          f"mrr@20 {report['challenger']['metrics']['mrr@20']} on {report['data']['test_events']} held-out events")


def _scrape(port: int) -> str:
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_the_service_runs_on_its_interval_and_stops_cleanly_on_sigterm(tmp_path):
    sessions = sorted(sessionize(generate(SyntheticConfig(n_events=5000, n_users=120, seed=23, **SHOP))),
                      key=lambda s: s.times[0])
    data = tmp_path / "sessions.tsv"
    with data.open("w") as f:
        f.write("SessionId\tItemId\tTime\n")
        for s in sessions:
            for item, t in zip(s.items, s.times):
                f.write(f"{s.key}\t{item}\t{t}\n")
    registry = tmp_path / "registry"
    port = worker_process.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECUR_")}
    env.update(RECUR_MODELS_DIR=str(registry), RECUR_VAR_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1")
    log = (tmp_path / "retrain.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "retrain", "--every", "2s", "--data", str(data),
                             "--format", "session-tsv", "--window", "3650d", "--holdout", "10%", "--metrics-port", str(port), *FAST],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        reports = _wait(lambda: sorted((registry / "retrain").glob("*.json")) if len(
            list((registry / "retrain").glob("2*.json"))) >= 2 else None, 180, "two runs")
        text = _scrape(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    runs = [json.loads(p.read_text()) for p in reports if p.name != "last.json"]
    assert [r["decision"] for r in runs][:1] == ["published"]  # the first has no live model to beat
    assert all(r["decision"] in ("published", "rejected") for r in runs)  # judged, none failed
    assert metric(text, "recur_retrain_runs_total") >= 2
    assert metric(text, "recur_retrain_last_metric", 'metric="mrr@20",model="challenger"') > 0
    output = (tmp_path / "retrain.log").read_text()
    stopped = re.search(r"retrain: stopped after (\d+) run\(s\)", output)
    assert "SIGTERM" in output and stopped and int(stopped.group(1)) >= 2
    assert not (registry / "retrain.lock").exists()
    # every retraining metric the Grafana dashboard queries is one this service exports
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/recur.json").read_text())
    queried = {n for p in dashboard["panels"] for t in p["targets"] for n in re.findall(r"recur_retrain_[a-z_]+", t["expr"])}
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert len(queried) >= 4 and sorted(queried - exported) == []
    print(f"retrain service: {len(runs)} runs ({[r['decision'] for r in runs]}), stopped on SIGTERM with exit 0")
