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


def test_successor_rules_and_pop():
    train = [_s(0, 1), _s(0, 1), _s(0, 2), _s(3, 3, 3)]
    sr = successor_rules(train, 4)
    scores = sr([0])
    assert np.argmax(scores) == 1 and scores[1] > scores[2] > scores[3]
    test = [_s(0, 1, 2)]  # 0->1 ranks 1st; 1 has no rule, so pop decides and 2 ranks 4th
    res = evaluate_scorer(sr, test, k=2)
    assert res["n"] == 2 and res["recall@2"] == 0.5
    pop = popular(train, 4)
    assert pop([0]).tolist() == [3, 2, 1, 3]


def test_sknn_votes_for_items_of_similar_sessions():
    train = [_s(0, 1, 2), _s(0, 1, 3), _s(4, 5)]
    scores = session_knn(train, 6)([0, 1])
    assert scores[2] > 0 and scores[3] > 0 and scores[4] == 0
