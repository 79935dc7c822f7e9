"""An ensemble of recurrent models (`members` > 1): one model to every caller, its scores the sum
of its members' scores, its state theirs side by side."""

import numpy as np
import pytest
import torch

from models.artifacts import load_artifact, save_artifact
from models.data import sessionize
from models.errors import ModelError
from models.lstm import EnsembleRecommender, ModelConfig, RecurrentRecommender, build_model, init_state, step
from models.scorers import AnnScorer, ExactScorer, ScorerConfig
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from models.vocab import Vocabulary

CFG = dict(n_items=60, embedding_dim=8, hidden_dim=12, dropout=0.0, attention_window=3, score_scale=10.0)


def _members(n: int) -> list[RecurrentRecommender]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = RecurrentRecommender(ModelConfig(**CFG)).eval()
        with torch.no_grad():
            m.item_bias.normal_(0, 0.5)  # biases differ too, so that their sum is checked
        out.append(m)
    return out


def test_an_ensemble_steps_each_member_and_sums_their_scores():
    members = _members(3)
    ensemble = EnsembleRecommender.of(members).eval()
    assert ensemble.config.members == 3 and ensemble.config.query_dim == 24
    assert ensemble.config.state_size == 3 * members[0].config.state_size
    B = 5
    items, types = torch.randint(0, 60, (4, B)), torch.randint(0, 2, (4, B))
    state = init_state(ensemble.config, B)
    alone = [init_state(m.config, B) for m in members]
    for t in range(4):
        out = step(ensemble, state, items[t], types[t])
        singles = [step(m, s, items[t], types[t]) for m, s in zip(members, alone)]
        alone = [s.state for s in singles]
        torch.testing.assert_close(out.scores, sum(s.scores for s in singles), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.state, torch.cat(alone, dim=1))
        state = out.state
    # the worker's path: the exact top-k of the summed scores, purchases excluded
    top = step(ensemble, state, items[0], types[0], k=10, exclude=[[1, 2]] * B, scorer=ExactScorer())
    full = step(ensemble, state, items[0], types[0]).scores.clone()
    full[:, [1, 2]] = float("-inf")
    assert torch.equal(top.top_items, torch.topk(full, 10, dim=1).indices)


def test_an_ensembles_full_sequence_forward_equals_its_steps():
    ensemble = EnsembleRecommender.of(_members(2)).eval()
    items, types = torch.randint(0, 60, (3, 6)), torch.randint(0, 2, (3, 6))
    with torch.no_grad():
        queries, _ = ensemble(items, types)
        full = ensemble.score(queries)
    state = init_state(ensemble.config, 3)
    for t in range(6):
        out = step(ensemble, state, items[:, t], types[:, t])
        torch.testing.assert_close(out.scores, full[:, t], rtol=1e-5, atol=1e-4)
        state = out.state


def test_an_ensemble_artifact_loads_back_with_the_same_scores(tmp_path):
    ensemble = EnsembleRecommender.of(_members(2)).eval()
    vocab = Vocabulary([f"i{n}" for n in range(60)])
    path = save_artifact(tmp_path, ensemble, vocab, {"note": "test"})
    loaded = load_artifact(path).model
    assert isinstance(loaded, EnsembleRecommender) and loaded.config == ensemble.config
    state, items, types = init_state(ensemble.config, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 0, 0])
    assert torch.equal(step(loaded, state, items, types).scores, step(ensemble, state, items, types).scores)
    assert isinstance(build_model(ModelConfig(**CFG)), RecurrentRecommender)
    assert not isinstance(build_model(ModelConfig(**CFG)), EnsembleRecommender)


def test_ann_over_an_ensemble_equals_exact_where_its_search_is_exhaustive():
    ensemble = EnsembleRecommender.of(_members(3)).eval()
    ann = AnnScorer(ensemble, ScorerConfig(kind="ann", ann_lists=4, ann_probe=4, ann_candidates=60))
    state = step(ensemble, init_state(ensemble.config, 6), torch.arange(6), torch.zeros(6, dtype=torch.long)).state
    exclude = [[0, 5], [], [7], [], [1, 2, 3], []]
    a = step(ensemble, state, torch.arange(6) + 10, torch.zeros(6, dtype=torch.long), k=10, exclude=exclude,
             scorer=ann)
    e = step(ensemble, state, torch.arange(6) + 10, torch.zeros(6, dtype=torch.long), k=10, exclude=exclude,
             scorer=ExactScorer())
    assert torch.equal(a.top_items, e.top_items)
    torch.testing.assert_close(a.top_scores, e.top_scores, rtol=1e-5, atol=1e-4)


def test_members_of_other_configurations_or_none_are_refused():
    with pytest.raises(ModelError):
        ModelConfig(**{**CFG, "members": 0})
    other = RecurrentRecommender(ModelConfig(**{**CFG, "hidden_dim": 16}))
    with pytest.raises(ModelError):
        EnsembleRecommender.of([_members(1)[0], other])


def test_training_an_ensemble_trains_each_member_from_its_own_seed():
    events = generate(SyntheticConfig(n_events=3000, n_users=60, n_items=80, seed=4))
    sessions = sorted(sessionize(events), key=lambda s: s.times[0])
    seen: list[tuple[int, int]] = []
    result = train(sessions, dict(embedding_dim=8, hidden_dim=8, members=2), TrainConfig(epochs=2, refit=False, seed=7),
                   on_progress=lambda p: seen.append((p["member"], p["members"])))
    model = result.model
    assert isinstance(model, EnsembleRecommender) and len(model.members) == 2
    assert {m for m, _ in seen} == {1, 2} and {n for _, n in seen} == {2}  # progress says which member
    a, b = (m.item_emb.weight for m in model.members)
    assert not torch.equal(a, b)  # different seeds, different weights
    # member n is what a single training with seed + n gives
    alone = train(sessions, dict(embedding_dim=8, hidden_dim=8), TrainConfig(epochs=2, refit=False, seed=8))
    assert torch.equal(alone.model.item_emb.weight, b)
    assert result.best["members"] == 2 and len(result.best["epochs"]) == 2
    best_rows = [max((r for r in result.history if r["member"] == m), key=lambda r: r["mrr@20"]) for m in (1, 2)]
    assert np.isclose(result.best["recall@20"], np.mean([r["recall@20"] for r in best_rows]))
    assert {row["member"] for row in result.history} == {1, 2}
