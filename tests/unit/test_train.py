import numpy as np
import pytest
import torch

from models.artifacts import load_artifact, publish_version, resolve, save_artifact
from models.baselines import popular
from models.data import index_sessions, sessionize
from models.errors import ArtifactError
from models.evaluate import evaluate_model, evaluate_scorer
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained():
    events = generate(SyntheticConfig(n_events=12000, n_users=300, n_items=300, seed=1))
    sessions = sorted(sessionize(events), key=lambda s: s.times[0])
    def user_number(s):  # synthetic session ids are "u<user>-s<n>"
        return int(s.key[1:].split("-")[0])

    train_s = [s for s in sessions if user_number(s) < 250]
    test_s = [s for s in sessions if user_number(s) >= 250]  # 50 users never seen in training
    model_cfg = dict(embedding_dim=32, hidden_dim=48)
    result = train(train_s, model_cfg, TrainConfig(epochs=6, patience=6, refit=False, seed=3))
    return result, train_s, test_s


def test_short_training_beats_pop_on_held_out_users(trained):
    result, train_s, test_s = trained
    test_idx = index_sessions(test_s, result.vocab)
    model_metrics = evaluate_model(result.model, test_idx, k=20)
    pop_metrics = evaluate_scorer(popular(index_sessions(train_s, result.vocab), len(result.vocab)), test_idx, k=20)
    assert model_metrics["n"] == pop_metrics["n"] > 500
    assert model_metrics["recall@20"] > 2 * pop_metrics["recall@20"]
    assert model_metrics["mrr@20"] > 2 * pop_metrics["mrr@20"]


def test_training_is_reproducible_with_a_seed():
    events = generate(SyntheticConfig(n_events=2000, n_users=50, n_items=100, seed=2))
    sessions = sorted(sessionize(events), key=lambda s: s.times[0])
    cfg = TrainConfig(epochs=1, refit=False, seed=5)
    a = train(sessions, dict(embedding_dim=8, hidden_dim=8), cfg)
    b = train(sessions, dict(embedding_dim=8, hidden_dim=8), cfg)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_artifact_round_trip_and_checks(trained, tmp_path):
    result, _, test_s = trained
    path = save_artifact(tmp_path, result.model, result.vocab, {"note": "test"}, publish=True)
    assert resolve(tmp_path) == path
    loaded = load_artifact(tmp_path)
    assert loaded.vocab.items == result.vocab.items
    assert loaded.meta["note"] == "test" and loaded.version == path.name
    idx = index_sessions(test_s, result.vocab)[:20]
    assert evaluate_model(loaded.model, idx) == evaluate_model(result.model, idx)
    # a tampered vocabulary or weights file is refused with a clear message
    (path / "items.json").write_text('["a", "b"]')
    with pytest.raises(ArtifactError, match="n_items"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="neither a model artifact nor a registry"):
        load_artifact(tmp_path / "nothing")
    with pytest.raises(ArtifactError):
        publish_version(tmp_path, "v-missing")


def test_weights_checksum_is_verified(trained, tmp_path):
    result, _, _ = trained
    path = save_artifact(tmp_path, result.model, result.vocab, {})
    raw = bytearray((path / "weights.pt").read_bytes())
    raw[-10] ^= 0xFF
    (path / "weights.pt").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(path)
    assert np.isfinite(result.best["mrr@20"])


def test_the_same_weights_saved_twice_in_one_second_get_two_versions(trained, tmp_path, monkeypatch):
    import time

    import models.artifacts as artifacts

    result = trained[0]
    fixed = time.gmtime(1_700_000_000)
    monkeypatch.setattr(artifacts.time, "gmtime", lambda *_: fixed)  # both saves in the same second
    first = save_artifact(tmp_path, result.model, result.vocab, {"source": "a"})
    second = save_artifact(tmp_path, result.model, result.vocab, {"source": "b"})
    assert first != second and second.name.startswith(first.name)  # "...-2": a version of its own
    assert load_artifact(second).meta["version"] == second.name and load_artifact(second).meta["source"] == "b"
    assert load_artifact(first).meta["source"] == "a"
