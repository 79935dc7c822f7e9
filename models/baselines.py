"""Baselines known to be hard to beat on session data: pop, sr, sknn.

Each is built from the indexed training sessions and is a callable
`scorer(prefix: list[int]) -> scores (V,)` for `evaluate_scorer`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from models.data import IndexedSession
from models.errors import ConfigError

BASELINES = ("pop", "sr", "sknn")


def _popularity(sessions: Sequence[IndexedSession], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.float64)
    for s in sessions:
        np.add.at(counts, s.items, 1.0)
    return counts


def _first_occurrence_bonus(order: list[int], size: int) -> np.ndarray:
    """`order`: distinct keys (< `size`) in order of first occurrence -> (size,) bonus in [0, 1),
    larger for an earlier key, 0 for keys never seen. Added to integer counts, it orders equal
    counts by first occurrence, as `collections.Counter.most_common` does, and never outranks
    one more count."""
    bonus = np.zeros(size, dtype=np.float64)
    bonus[order] = 1.0 - np.arange(1, len(order) + 1, dtype=np.float64) / (len(order) + 1.0)
    return bonus


def _popularity_ranking(sessions: Sequence[IndexedSession], n_items: int) -> np.ndarray:
    """Click counts, equal counts ordered by first occurrence in the training sessions."""
    first: dict[int, None] = {}
    for s in sessions:
        first.update(dict.fromkeys(s.items.tolist()))
    return _popularity(sessions, n_items) + _first_occurrence_bonus(list(first), n_items)


def popular(sessions: Sequence[IndexedSession], n_items: int) -> Callable[[list[int]], np.ndarray]:
    """Most popular items (by clicks in training), whatever the prefix; equal counts are ordered
    by first occurrence in the training sessions (in the order given: by start time)."""
    ranking = _popularity_ranking(sessions, n_items)
    return lambda prefix: ranking


def successor_rules(sessions: Sequence[IndexedSession], n_items: int) -> Callable[[list[int]], np.ndarray]:
    """Items that most often directly followed the current item, then the popular items.

    A ranked list, like `Counter.most_common`: successors by how often they followed, equal
    counts by which pair occurred first in the training sessions (in the order given); after
    them every other item in the `popular` order. The scores are strictly ordered, so the
    ties-against rule of the evaluator does not come into play."""
    pop = _popularity_ranking(sessions, n_items)
    fill = pop / (pop.max() + 1.0)  # in [0, 1): below every successor
    succ: dict[int, dict[int, list[int]]] = defaultdict(dict)  # a -> b -> [count, first pair position]
    n_pairs = 0
    for s in sessions:
        for a, b in zip(s.items[:-1].tolist(), s.items[1:].tolist()):
            entry = succ[a].get(b)
            if entry is None:
                succ[a][b] = [1, n_pairs]
                n_pairs += 1
            else:
                entry[0] += 1
    pair_bonus = _first_occurrence_bonus(list(range(n_pairs)), n_pairs)  # by first position
    rules = {}
    for a, nexts in succ.items():
        counts = np.array(list(nexts.values()), dtype=np.int64)  # (n, 2): count, first position
        rules[a] = (np.fromiter(nexts.keys(), dtype=np.int64), 1.0 + counts[:, 0] + pair_bonus[counts[:, 1]])

    def score(prefix: list[int]) -> np.ndarray:
        scores = fill.copy()
        if prefix[-1] in rules:
            idx, val = rules[prefix[-1]]
            scores[idx] = val
        return scores

    return score


def session_knn(
    sessions: Sequence[IndexedSession], n_items: int, k: int = 100, sample_size: int = 1000
) -> Callable[[list[int]], np.ndarray]:
    """Session-kNN: the `k` most similar of the `sample_size` most recent training sessions
    sharing an item with the prefix (cosine on item sets) vote for their items."""
    item_sets = [np.unique(s.items) for s in sessions]  # sessions are in time order
    by_item: dict[int, list[int]] = defaultdict(list)
    for sid, items in enumerate(item_sets):
        for i in items.tolist():
            by_item[i].append(sid)

    def score(prefix: list[int]) -> np.ndarray:
        current = set(prefix)
        candidates: set[int] = set()
        for i in current:
            candidates.update(by_item.get(i, ()))
        recent = sorted(candidates, reverse=True)[:sample_size]  # newest sessions first
        sims = []
        for sid in recent:
            other = item_sets[sid]
            overlap = sum(1 for i in other.tolist() if i in current)
            sims.append((overlap / np.sqrt(len(current) * len(other)), sid))
        sims.sort(reverse=True)
        scores = np.zeros(n_items, dtype=np.float64)
        for sim, sid in sims[:k]:
            scores[item_sets[sid]] += sim
        return scores

    return score


def build_baseline(name: str, sessions: Sequence[IndexedSession], n_items: int) -> Callable[[list[int]], np.ndarray]:
    if name == "pop":
        return popular(sessions, n_items)
    if name == "sr":
        return successor_rules(sessions, n_items)
    if name == "sknn":
        return session_knn(sessions, n_items)
    raise ConfigError(f"evaluate: unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
