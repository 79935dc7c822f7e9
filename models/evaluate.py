"""Next-event evaluation, the protocol of the session-based recommendation literature.

Every next event of every test session is predicted from that session's prefix
(state reset at session start), ranked against every item known at training;
test events on unknown items were already dropped by `index_sessions`. Ties are
counted against the model: rank = number of items scoring >= the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import torch

from models.data import IndexedSession
from models.lstm import RecurrentRecommender, init_state, step
from models.scorers import Scorer

SCORE_BYTES = 256 * 2**20  # scores held at once by evaluate_model: 64 sessions at a time at 1,000,000 items


class RankMetrics:
    """Accumulates ranks and reports Recall@K, MRR@K and NDCG@K."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.hits = 0.0
        self.rr = 0.0
        self.ndcg = 0.0

    def add(self, ranks: np.ndarray) -> None:
        ranks = np.asarray(ranks, dtype=np.float64)
        inside = ranks <= self.k
        self.n += ranks.size
        self.hits += float(inside.sum())
        self.rr += float((1.0 / ranks[inside]).sum())
        self.ndcg += float((1.0 / np.log2(ranks[inside] + 1.0)).sum())

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        k = self.k
        return {f"recall@{k}": self.hits / n, f"mrr@{k}": self.rr / n, f"ndcg@{k}": self.ndcg / n, "n": self.n}


def ranks_of(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (N, V), targets (N,) -> ranks (N,), ties counted against the model."""
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (N, 1)
    return (scores >= target_scores).sum(1)


def ranks_in_top(top_items: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """top_items (N, k) best first, targets (N,) -> ranks (N,): the target's place, k + 1 if absent."""
    found = top_items == targets.unsqueeze(1)  # (N, k)
    place = found.float().argmax(dim=1) + 1
    return torch.where(found.any(dim=1), place, torch.full_like(place, k + 1))


def evaluate_model(
    model: RecurrentRecommender,
    sessions: Sequence[IndexedSession],
    k: int = 20,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Session-parallel evaluation through `step`: `batch_size` sessions advance together;
    a finished session's slot is refilled with the next session and its state reset.

    Ranks come from every item's score; with a `scorer` (the worker's, e.g. approximate search)
    from the top-k it returns instead, a target outside it counting as a miss."""
    model.eval()
    if scorer is None:  # every item's score for each slot: at most ~256 MiB of them at once
        batch_size = min(batch_size, max(16, SCORE_BYTES // (4 * model.config.n_items)))
    metrics = RankMetrics(k)
    todo = [s for s in sessions if len(s.items) >= 2]
    nxt = 0
    slots: list[tuple[int, int]] = []  # (session index, position)
    state = init_state(model.config, 0, device)
    while True:
        # refill free slots with fresh sessions (zero state rows)
        fresh = []
        while len(slots) < batch_size and nxt < len(todo):
            slots.append((nxt, 0))
            fresh.append(nxt)
            nxt += 1
        if fresh:
            state = torch.cat([state, init_state(model.config, len(fresh), device)])
        if not slots:
            break
        items = torch.tensor([todo[s].items[p] for s, p in slots], device=device)
        types = torch.tensor([todo[s].types[p] for s, p in slots], device=device)
        targets = torch.tensor([todo[s].items[p + 1] for s, p in slots], device=device)
        if scorer is None:
            out = step(model, state, items, types)  # every item's score
            assert out.scores is not None
            metrics.add(ranks_of(out.scores, targets).cpu().numpy())
        else:
            out = step(model, state, items, types, k=k, scorer=scorer)
            assert out.top_items is not None
            metrics.add(ranks_in_top(out.top_items, targets, k).cpu().numpy())
        state = out.state
        if progress:
            progress(len(slots))
        keep = [i for i, (s, p) in enumerate(slots) if p + 2 < len(todo[s].items)]
        slots = [(slots[i][0], slots[i][1] + 1) for i in keep]
        state = state[torch.tensor(keep, dtype=torch.long, device=device)]
    return metrics.result()


def evaluate_scorer(
    scorer: Callable[[list[int]], np.ndarray],
    sessions: Sequence[IndexedSession],
    k: int = 20,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Evaluate a baseline: `scorer(prefix) -> scores (V,)` for every prefix of every session."""
    metrics = RankMetrics(k)
    for s in sessions:
        items = s.items.tolist()
        ranks = []
        for p in range(len(items) - 1):
            scores = scorer(items[: p + 1])
            ranks.append(int((scores >= scores[items[p + 1]]).sum()))
        metrics.add(np.asarray(ranks))
        if progress:
            progress(len(ranks))
    return metrics.result()


def online_hit_rate(events: Sequence, lists: dict[str, list[str]],
                    window: AbstractSet[str | None] | None = None) -> tuple[float, int]:
    """Prequential quality of a stream: the share of events (with ids in `window`, or all)
    whose item was in the list the same user received after their previous event.
    `events` in stream order with `.event_id`, `.user_id`, `.item_id`; `lists`: event id -> items.
    -> (hit rate, events counted)."""
    last: dict[str, list[str]] = {}
    hits = total = 0
    for e in events:
        if (window is None or e.event_id in window) and e.user_id in last:
            total += 1
            hits += e.item_id in last[e.user_id]
        if e.event_id in lists:
            last[e.user_id] = lists[e.event_id]
    return hits / max(total, 1), total
