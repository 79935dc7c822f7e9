"""The item vocabulary: item id <-> dense index, most frequent first. Pure Python."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from models.errors import DataError


class _HasItems(Protocol):
    items: list[str]


class Vocabulary:
    """Item id <-> dense index. Index order: most frequent first."""

    def __init__(self, items: list[str]) -> None:
        self.items = list(items)
        self.index = dict(zip(self.items, range(len(self.items))))
        if len(self.index) != len(self.items):
            raise DataError("vocabulary: item ids are not unique")

    @classmethod
    def from_sessions(cls, sessions: Iterable[_HasItems]) -> Vocabulary:
        counts = Counter(item for s in sessions for item in s.items)
        return cls([item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    def __len__(self) -> int:
        return len(self.items)

    def get(self, item: str) -> int:
        """Index of `item`, or -1 when unknown."""
        return self.index.get(item, -1)
