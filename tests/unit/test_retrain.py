"""The retraining gate (models/retrain.py) and one run of the service (pipeline/retrain.py), on
small synthetic shops: no broker, a registry in a temporary folder."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry

from models.artifacts import current_version, load_artifact
from models.data import Session, sessionize
from models.errors import ConfigError, DataError
from models.lstm import ModelConfig, RecurrentRecommender
from models.retrain import GateConfig, Holdout, decide, held_out_metrics, parse_duration, split_window
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig
from models.vocab import Vocabulary
from pipeline.config import load_settings
from pipeline.metrics import RetrainMetrics
from pipeline.retrain import LOCK_FILE, RegistryLock, RetrainJob, run_once

SMALL_MODEL = dict(embedding_dim=16, hidden_dim=32)
SHOP = dict(n_items=120, n_categories=6, catalog_seed=3)


def _session(key: str, t0: float, items: list[str]) -> Session:
    return Session(key, list(items), [0] * len(items), [t0 + 60 * n for n in range(len(items))])


def test_durations_and_holdouts_parse_and_bad_ones_say_what_is_expected():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("1h") == 3600 and parse_duration("7d") == 604800 and parse_duration("15") == 15
    assert Holdout.parse("5%") == Holdout(fraction=0.05) and Holdout.parse("2h") == Holdout(seconds=7200)
    for bad in ("", "1y", "-1h", "0s"):
        with pytest.raises(ConfigError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="share"):
        Holdout.parse("150%")
    with pytest.raises(ConfigError, match="metric"):
        GateConfig(metric="auc")


def test_the_window_drops_old_sessions_and_the_holdout_is_the_newest_part():
    day = 86400.0
    sessions = [_session(f"s{n}", n * day / 4, ["a", "b", "c"]) for n in range(40)]  # 10 days, 4 a day
    gate = GateConfig(window_s=5 * day, holdout=Holdout(fraction=0.1), min_train_sessions=1, min_test_events=1)
    split = split_window(sessions, gate)
    # the newest ends at 9.75 d + 2 min: sessions ending before 4.75 d + 2 min (s0 .. s18) are out
    assert split.dropped_old == 19
    assert len(split.train) == 19 and len(split.test) == 2  # 10% of the 21 kept
    assert max(s.times[0] for s in split.train) < min(s.times[0] for s in split.test)  # the test is the newest
    by_span = split_window(sessions, GateConfig(window_s=5 * day, holdout=Holdout(seconds=day), min_train_sessions=1,
                                                min_test_events=1))
    assert len(by_span.test) == 4 and all(s.times[0] >= sessions[-1].times[-1] - day for s in by_span.test)


def test_too_little_data_fails_with_the_counts():
    sessions = [_session(f"s{n}", n * 3600.0, ["a", "b"]) for n in range(30)]
    with pytest.raises(DataError, match="too little data: 29 training sessions .* \\(need 50\\)"):
        split_window(sessions, GateConfig(holdout=Holdout(fraction=0.05)))
    with pytest.raises(DataError, match="too little held-out data: 1 next events .* \\(need 100\\)"):
        split_window(sessions, GateConfig(holdout=Holdout(fraction=0.05), min_train_sessions=10))
    with pytest.raises(DataError, match="no sessions"):
        split_window([], GateConfig())


def test_models_with_different_catalogues_are_scored_on_the_same_events_unknown_targets_missing():
    torch.manual_seed(0)
    test = [_session("t", 0.0, ["a", "b", "new", "a"])]  # 3 next events; "new" unknown to both
    small = Vocabulary(["a", "b"])
    model = RecurrentRecommender(ModelConfig(n_items=2, embedding_dim=4, hidden_dim=4))
    got = held_out_metrics(model, small, test)
    assert got["events"] == 3 and got["predicted"] == 2  # a->b and b->a (the unknown input skipped)
    assert got["recall@20"] == pytest.approx(2 / 3)  # both predicted ones are in a top-20 of 2 items; "new" missed


def test_the_gate_publishes_only_above_popularity_and_within_the_margin_of_the_live_model():
    gate = GateConfig(metric="mrr@20", margin=0.01)
    pop = {"mrr@20": 0.05}
    assert decide(None, {"mrr@20": 0.2}, pop, gate).publish
    assert not decide(None, {"mrr@20": 0.04}, pop, gate).publish
    assert decide({"mrr@20": 0.30}, {"mrr@20": 0.295}, pop, gate).publish  # within the margin
    rejected = decide({"mrr@20": 0.30}, {"mrr@20": 0.28}, pop, gate)
    assert not rejected.publish and "0.2800 < live 0.3000 - margin 0.01" in rejected.reason


def _shop_sessions(seed: int = 11) -> list[Session]:
    events = generate(SyntheticConfig(n_events=6000, n_users=150, seed=seed, **SHOP))
    return sorted(sessionize(events), key=lambda s: (s.times[0], s.key))


def _shuffled_before_holdout(sessions: list[Session], holdout: float) -> list[Session]:
    """The same sessions with item ids permuted in all but the newest `holdout` share: a
    challenger trained on them learns transitions the held-out events do not follow."""
    items = sorted({i for s in sessions for i in s.items})
    perm = dict(zip(items, random.Random(5).sample(items, len(items))))
    cut = len(sessions) - int(len(sessions) * holdout)
    return [Session(s.key, [perm[i] for i in s.items] if n < cut else list(s.items), list(s.types), list(s.times))
            for n, s in enumerate(sessions)]


def _job(tmp_path, sessions, **gate) -> RetrainJob:
    settings = load_settings({}, {"models_dir": str(tmp_path / "registry")})
    cfg = GateConfig(holdout=Holdout(fraction=0.1), **gate)
    return RetrainJob(settings, cfg, SMALL_MODEL, TrainConfig(epochs=12, lr=1e-2, seed=1, refit=False, max_minutes=2),
                      read=lambda: sessions, source="test")


def test_a_good_challenger_is_published_and_one_trained_on_shuffled_items_is_rejected(tmp_path):
    sessions = _shop_sessions()
    metrics = RetrainMetrics(CollectorRegistry())
    first = run_once(_job(tmp_path, sessions), metrics=metrics)
    registry = tmp_path / "registry"
    assert first["decision"] == "published", first["reason"]
    assert current_version(registry) == first["published_version"] == first["challenger"]["version"]
    assert first["challenger"]["metrics"]["mrr@20"] > 2 * first["popularity"]["metrics"]["mrr@20"]

    bad = run_once(_job(tmp_path, _shuffled_before_holdout(sessions, 0.1)), metrics=metrics)
    assert bad["decision"] == "rejected", bad["reason"]
    assert current_version(registry) == first["published_version"]  # the live model stays
    assert bad["live"]["version"] == first["published_version"]
    live, challenger = bad["live"]["metrics"], bad["challenger"]["metrics"]
    assert live["events"] == challenger["events"]  # both scored on the same held-out events
    assert challenger["mrr@20"] < live["mrr@20"] - 0.005
    print(f"retrain gate: live mrr@20 {live['mrr@20']:.4f}, shuffled challenger {challenger['mrr@20']:.4f}")

    stored = json.loads((registry / bad["challenger"]["version"] / "retrain-report.json").read_text())
    assert stored["decision"] == "rejected" and stored["live"]["metrics"] == live
    assert load_artifact(registry / bad["challenger"]["version"]).meta["retrain"]["decision"] == "rejected"
    assert json.loads((registry / "retrain" / "last.json").read_text())["decision"] == "rejected"
    assert len(list((registry / "retrain").glob("*-published.json"))) == 1
    assert metrics.registry.get_sample_value("recur_retrain_runs_total", {"decision": "published"}) == 1
    assert metrics.registry.get_sample_value("recur_retrain_runs_total", {"decision": "rejected"}) == 1
    assert metrics.registry.get_sample_value("recur_retrain_last_metric",
                                             {"model": "live", "metric": "mrr@20"}) == live["mrr@20"]
    assert not (registry / LOCK_FILE).exists()


def test_a_failed_run_leaves_the_live_model_alone_and_says_why(tmp_path):
    metrics = RetrainMetrics(CollectorRegistry())
    registry = tmp_path / "registry"
    empty = run_once(_job(tmp_path, []), metrics=metrics)
    assert empty["decision"] == "failed" and "no sessions" in empty["reason"]
    few = run_once(_job(tmp_path, _shop_sessions()[:20]), metrics=metrics)
    assert few["decision"] == "failed" and "too little data" in few["reason"]

    def broken() -> list[Session]:
        raise OSError(28, "No space left on device")

    job = _job(tmp_path, [])
    job.read = broken
    full = run_once(job, metrics=metrics)
    assert full["decision"] == "failed" and "No space left on device" in full["reason"]
    assert current_version(registry) is None and not [p for p in registry.glob("v*")]
    assert metrics.registry.get_sample_value("recur_retrain_runs_total", {"decision": "failed"}) == 3
    assert metrics.registry.get_sample_value("recur_retrain_last_success_timestamp_seconds") == 0


def test_two_runs_never_hold_the_registry_at_once(tmp_path):
    registry = tmp_path / "registry"
    with RegistryLock(registry):
        second = run_once(_job(tmp_path, _shop_sessions()))
        assert second["decision"] == "failed" and "another run holds" in second["reason"]
        assert f"pid {os.getpid()}" in second["reason"]
    assert not (registry / LOCK_FILE).exists()
    # a lock left by a process that died on this host is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (registry / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0}))
    with RegistryLock(registry) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    # one held on another machine is respected
    (registry / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(Exception, match="host elsewhere"):
        RegistryLock(registry).__enter__()


def test_only_the_newest_rejected_challengers_are_kept(tmp_path):
    from pipeline.retrain import prune_rejected

    registry = tmp_path / "registry"
    sessions = _shop_sessions()
    assert run_once(_job(tmp_path, sessions))["decision"] == "published"
    bad = _shuffled_before_holdout(sessions, 0.1)
    job = _job(tmp_path, bad)
    job.settings.retrain_keep_rejected = 1
    first = run_once(job)
    second = run_once(job)
    assert first["decision"] == second["decision"] == "rejected"
    assert second["pruned"] == [first["challenger"]["version"]]  # the older rejected one goes
    versions = {p.name for p in registry.glob("v*")}
    assert versions == {current_version(registry), second["challenger"]["version"]}  # live and newest rejected
    assert prune_rejected(registry, 0) == [second["challenger"]["version"]]
    assert {p.name for p in registry.glob("v*")} == {current_version(registry)}  # the live one is never pruned
