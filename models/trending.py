"""Cold-start lists: the items most frequent in the last events, filled up from a popularity order.

A list holds K distinct items whenever the worker knows K items that are not excluded: the
counts of the last `window` events first (ties by item id), then items in popularity order (the
live model's vocabulary is ordered by training frequency), each once. The window can be seeded
(after a restart, from the newest snapshots) so trending does not start from nothing.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet


class Trending:
    def __init__(self, window: int = 10_000) -> None:
        self.window: deque[str] = deque()
        self.size = window
        self.counts: Counter[str] = Counter()
        self.fallback: Sequence[str] = ()  # popularity order, most popular first

    def add(self, item: str) -> None:
        self.window.append(item)
        self.counts[item] += 1
        if len(self.window) > self.size:
            old = self.window.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]

    def add_many(self, items: Sequence[str]) -> None:
        """`add` of each item, in order, for a batch at once."""
        self.window.extend(items)
        self.counts.update(items)
        counts = self.counts
        while len(self.window) > self.size:
            old = self.window.popleft()
            counts[old] -= 1
            if not counts[old]:
                del counts[old]

    def seed(self, items: Iterable[str]) -> int:
        """Add past events' items, oldest first (only the newest `window` count). -> items added."""
        items = list(items)
        for item in items:
            self.add(item)
        return len(items)

    def top(self, k: int, exclude: AbstractSet[str] = frozenset()) -> list[tuple[str, float]]:
        """-> up to k (item, count) pairs, distinct, none in `exclude`; fallback items count 0."""
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        out = [(item, float(n)) for item, n in ranked if item not in exclude][:k]
        if len(out) < k:
            have = {item for item, _ in out}
            for item in self.fallback:
                if item not in have and item not in exclude:
                    out.append((item, 0.0))
                    have.add(item)
                    if len(out) == k:
                        break
        return out
