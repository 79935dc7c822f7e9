import math

import numpy as np
import torch

from models.baselines import popular, session_knn, successor_rules
from models.data import IndexedSession
from models.evaluate import RankMetrics, evaluate_scorer, ranks_of


def _s(*items):
    return IndexedSession(np.array(items), np.zeros(len(items), dtype=np.int64))


def test_ranks_count_ties_against_the_model():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    ranks = ranks_of(scores, torch.tensor([0, 3]))
    assert ranks.tolist() == [3, 4]  # item 0 ties item 2 and trails item 1; all four tie


def test_metrics_on_a_hand_computed_example():
    m = RankMetrics(k=3)
    m.add(np.array([1, 2, 4, 3]))
    r = m.result()
    assert r["n"] == 4
    assert r["recall@3"] == 0.75
    assert math.isclose(r["mrr@3"], (1 + 1 / 2 + 1 / 3) / 4)
    assert math.isclose(r["ndcg@3"], (1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4)


def _order(scores):
    return np.argsort(-scores, kind="stable").tolist()


def test_successor_rules_rank_by_count_then_first_occurrence_then_popularity():
    # successors of 0: 1 once (first pair), 2 twice, 3 once (later pair); item 4 never seen
    train = [_s(0, 1), _s(0, 2), _s(0, 2), _s(0, 3), _s(3, 1)]
    sr = successor_rules(train, 5)
    assert _order(sr([0])) == [2, 1, 3, 0, 4]  # count 2, then the earlier of two count-1 pairs; then pop
    assert _order(sr([1])) == [0, 1, 2, 3, 4]  # no rule for 1: popularity (4 clicks, then three with 2)
    assert len(set(sr([0]).tolist())) == 5  # a strict ranking: no ties for the evaluator to count
    res = evaluate_scorer(sr, [_s(0, 3, 1)], k=2)  # 0->3 ranks 3rd (miss at 2); 3->1 ranks 1st
    assert res["n"] == 2 and res["recall@2"] == 0.5 and math.isclose(res["mrr@2"], 0.5)


def test_pop_ranks_by_clicks_then_first_occurrence():
    train = [_s(3, 1), _s(0, 1), _s(0, 2, 2)]  # clicks: 0:2, 1:2, 2:2, 3:1 -> equal counts, 1 seen first
    pop = popular(train, 5)
    assert _order(pop([4])) == [1, 0, 2, 3, 4]
    assert np.floor(pop([4])).tolist() == [2, 2, 2, 1, 0]  # the counts are kept; the bonus is < 1


def test_sknn_votes_for_items_of_similar_sessions():
    train = [_s(0, 1, 2), _s(0, 1, 3), _s(4, 5)]
    scores = session_knn(train, 6)([0, 1])
    assert scores[2] > 0 and scores[3] > 0 and scores[4] == 0


def test_evaluate_model_agrees_with_a_naive_per_session_loop_over_the_full_sequence_form():
    """An independent reference: each prefix of each session through `forward` (the training path),
    one session at a time, no slots, no state packing; the session-parallel `step` evaluator must
    give the same ranks (slots refilled mid-run with batch_size 3)."""
    from models.evaluate import evaluate_model
    from models.lstm import ModelConfig, RecurrentRecommender

    torch.manual_seed(5)
    model = RecurrentRecommender(ModelConfig(n_items=40, embedding_dim=8, hidden_dim=12, dropout=0.0)).eval()
    rng = np.random.default_rng(3)
    sessions = [IndexedSession(rng.integers(0, 40, size=n), rng.integers(0, 2, size=n)) for n in rng.integers(2, 10, 25)]
    reference = RankMetrics(k=5)
    with torch.no_grad():
        for s in sessions:
            items, types = torch.tensor(s.items).unsqueeze(0), torch.tensor(s.types).unsqueeze(0)
            queries, _ = model(items, types)  # (1, T, E)
            scores = model.score(queries[0])  # (T, V)
            targets = items[0, 1:]
            target_scores = scores[:-1].gather(1, targets.unsqueeze(1))
            reference.add(((scores[:-1] >= target_scores).sum(1)).numpy())
    expected = reference.result()
    got = evaluate_model(model, sessions, k=5, batch_size=3)
    assert got["n"] == expected["n"] == sum(len(s.items) - 1 for s in sessions)
    for name in ("recall@5", "mrr@5", "ndcg@5"):
        assert math.isclose(got[name], expected[name], rel_tol=1e-9), name


def test_online_hit_rate_counts_an_event_whose_item_was_in_the_users_previous_list():
    from types import SimpleNamespace

    from models.evaluate import online_hit_rate

    def e(n, user, item):
        return SimpleNamespace(event_id=f"e{n}", user_id=user, item_id=item)

    events = [e(0, "a", "x"), e(1, "a", "y"), e(2, "b", "y"), e(3, "a", "z"), e(4, "b", "q"), e(5, "a", "w")]
    lists = {"e0": ["y", "z"], "e1": ["q"], "e2": ["q"], "e3": ["w"], "e4": []}  # e5 got no list
    assert online_hit_rate(events, lists) == (3 / 4, 4)  # a: y hit, z miss, w hit; b: q hit; firsts not counted
    assert online_hit_rate(events, lists, window={"e3", "e4"}) == (1 / 2, 2)


YOOCHOOSE = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "yoochoose-100k"


def test_pop_and_sr_on_yoochoose_validation_are_the_published_figures():
    import pytest

    from models.data import index_sessions, read_sessions
    from models.vocab import Vocabulary

    if not (YOOCHOOSE / "train_tr.tsv").exists():
        pytest.skip(f"{YOOCHOOSE} is not here (it comes with ../shared beside the checkout)")
    train = read_sessions(YOOCHOOSE / "train_tr.tsv", "session-tsv")
    vocab = Vocabulary.from_sessions(train)
    train_idx = index_sessions(train, vocab)
    test_idx = index_sessions(read_sessions(YOOCHOOSE / "train_valid.tsv", "session-tsv"), vocab)
    pop = evaluate_scorer(popular(train_idx, len(vocab)), test_idx)
    sr = evaluate_scorer(successor_rules(train_idx, len(vocab)), test_idx)
    assert pop["n"] == sr["n"] == 12455
    assert (round(pop["recall@20"], 4), round(pop["mrr@20"], 4)) == (0.0899, 0.0176)  # reference 0.0899 / 0.0177
    assert (round(sr["recall@20"], 4), round(sr["mrr@20"], 4)) == (0.5193, 0.3145)  # reference 0.5216 / 0.3175 (README)


def test_evaluating_through_a_scorer_ranks_within_its_top_k_and_ann_when_exhaustive_equals_exact():
    from models.evaluate import evaluate_model
    from models.lstm import ModelConfig, RecurrentRecommender
    from models.scorers import AnnScorer, ExactScorer, ScorerConfig

    torch.manual_seed(6)
    model = RecurrentRecommender(ModelConfig(n_items=500, embedding_dim=8, hidden_dim=12, dropout=0.0)).eval()
    rng = np.random.default_rng(4)
    sessions = [IndexedSession(rng.integers(0, 500, size=n), rng.integers(0, 2, size=n)) for n in rng.integers(2, 9, 60)]
    full = evaluate_model(model, sessions, k=20)
    exact = evaluate_model(model, sessions, k=20, scorer=ExactScorer())
    ann = evaluate_model(model, sessions, k=20, scorer=AnnScorer(model, ScorerConfig(ann_lists=4, ann_probe=4)))
    assert full["recall@20"] > 0
    for name in ("recall@20", "mrr@20", "ndcg@20"):
        assert math.isclose(exact[name], full[name], rel_tol=1e-9), name  # no ties in float scores
        assert math.isclose(ann[name], full[name], rel_tol=1e-9), name
