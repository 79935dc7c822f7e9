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


def popular(sessions: Sequence[IndexedSession], n_items: int) -> Callable[[list[int]], np.ndarray]:
    """Most popular items, whatever the prefix."""
    counts = _popularity(sessions, n_items)
    return lambda prefix: counts


def successor_rules(sessions: Sequence[IndexedSession], n_items: int) -> Callable[[list[int]], np.ndarray]:
    """Items that most often directly followed the current item; ties and the rest by popularity."""
    pop = _popularity(sessions, n_items)
    tie_break = pop / (pop.max() + 1.0)  # in [0, 1): never outranks one more successor count
    succ: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for s in sessions:
        for a, b in zip(s.items[:-1].tolist(), s.items[1:].tolist()):
            succ[a][b] += 1
    rules = {}
    for a, nexts in succ.items():
        rules[a] = (np.fromiter(nexts.keys(), dtype=np.int64), np.fromiter(nexts.values(), dtype=np.float64))

    def score(prefix: list[int]) -> np.ndarray:
        scores = tie_break.copy()
        if prefix[-1] in rules:
            idx, cnt = rules[prefix[-1]]
            scores[idx] += cnt
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
