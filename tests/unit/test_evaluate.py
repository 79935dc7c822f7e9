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
