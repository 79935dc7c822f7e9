"""The online side of the core: per-user state records and the batched update.

`OnlineRecommender.process` takes the stored states of the users in a batch and the
batch's events (in offset order) and returns new states and one recommendation per
event. It never touches Kafka; the worker decodes, calls it, and writes back.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson
import torch

from models.artifacts import Artifact
from models.events import PURCHASE, Event, Recommendation
from models.lstm import RecurrentRecommender, init_state, step
from models.scorers import ExactScorer, Scorer, ScorerConfig, build_scorer
from models.trending import Trending
from models.vocab import Vocabulary

_MAGIC = b"R1"
_HEADER = struct.Struct("<2sI")  # magic, header length


@dataclass(slots=True)
class UserState:
    """What recur remembers about one user."""

    model_version: str  # version of the model that produced `vector`
    last_offset: int  # input offset of the last event applied (-1 = none)
    vector: np.ndarray  # (S,) float16 recurrent state
    recent_items: list[str] = field(default_factory=list)  # last N items, oldest first
    recent_types: list[int] = field(default_factory=list)
    last_recs: list[str] = field(default_factory=list)  # the last list sent to this user
    last_strategy: str = ""

    def encode(self) -> bytes:
        header = orjson.dumps(
            {
                "v": self.model_version,
                "o": self.last_offset,
                "i": self.recent_items,
                "t": self.recent_types,
                "r": self.last_recs,
                "s": self.last_strategy,
            }
        )
        return _HEADER.pack(_MAGIC, len(header)) + header + self.vector.astype(np.float16, copy=False).tobytes()

    @classmethod
    def decode(cls, raw: bytes) -> UserState:
        magic, n = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError("state record has an unknown format")
        h = orjson.loads(raw[_HEADER.size : _HEADER.size + n])
        # read-only, on `raw`'s bytes: a state's vector is replaced, never written in place
        vector = np.frombuffer(raw, dtype=np.float16, offset=_HEADER.size + n)
        return cls(h["v"], h["o"], vector, h["i"], h["t"], h["r"], h["s"])


@dataclass(slots=True)
class InputEvent:
    event: Event
    partition: int
    offset: int

    @property
    def event_id(self) -> str:
        return self.event.event_id or f"{self.partition}-{self.offset}"


@dataclass
class BatchStats:
    applied: int = 0  # events that changed a user's state
    duplicates: int = 0  # events at or below the user's last applied offset
    unknown_items: int = 0  # events on items the model does not know
    hits: int = 0  # events whose item was in the user's previous list
    hit_opportunities: int = 0  # events of users who had a previous list
    rewarmed: int = 0  # users whose state was rebuilt for a new model version
    by_type: Counter = field(default_factory=Counter)


@dataclass
class OnlineConfig:
    k: int = 20  # items per recommendation
    recent_n: int = 50  # items and event types kept per user
    exclude_purchased: bool = True  # never recommend what the user bought
    exclude_current: bool = False  # do not recommend the item just viewed
    trending_window: int = 10_000  # events counted for cold-start trending
    scorer: ScorerConfig = field(default_factory=ScorerConfig)  # exact or approximate top-k


COLD = "none"  # model_version while no model is live: every list is trending


class OnlineRecommender:
    """`artifact=None` starts cold: trending lists only, recent items kept, until `use()`."""

    def __init__(self, artifact: Artifact | None, config: OnlineConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.trending = Trending(config.trending_window)
        self.model: RecurrentRecommender | None = None
        self.scorer: Scorer = ExactScorer(config.scorer.score_memory_mb)
        self.vocab = Vocabulary([])
        self._names = np.empty(0, dtype=object)  # the vocabulary's item ids, for fancy indexing
        self.version = COLD
        if artifact is not None:
            self.use(artifact)

    def prepare(self, artifact: Artifact) -> Scorer:
        """Move a loaded model to this recommender's device and build its scorer (an ANN index
        takes seconds at 1,000,000 items): the slow half of a swap, for the loading thread."""
        artifact.model.to(self.device).eval()
        return build_scorer(artifact.model, self.config.scorer, self.device, artifact.path,
                            artifact.meta.get("weights_sha256", ""))

    def use(self, artifact: Artifact, scorer: Scorer | None = None) -> None:
        """Swap in a model and its scorer (from `prepare`; built here when not given); users on
        older versions are re-warmed on their next event."""
        scorer = scorer if scorer is not None else self.prepare(artifact)
        self.model = artifact.model
        self.scorer = scorer
        self.vocab = artifact.vocab
        self._names = np.asarray(artifact.vocab.items, dtype=object)
        self.version = artifact.version
        self.trending.fallback = artifact.vocab.items  # training popularity: cold lists fill up to K

    @property
    def live(self) -> RecurrentRecommender:
        """The live model; only asked for when there is one."""
        assert self.model is not None
        return self.model

    def _fresh(self) -> UserState:
        size = self.model.config.state_size if self.model is not None else 0
        return UserState(self.version, -1, np.zeros(size, dtype=np.float16))

    def _replay(self, users: list[UserState]) -> None:
        """Rebuild the recurrent state of `users` from their recent items, in one batch per position."""
        seqs = [[(self.vocab.get(i), t) for i, t in zip(u.recent_items, u.recent_types)] for u in users]
        seqs = [[(i, t) for i, t in s if i >= 0] for s in seqs]
        state = init_state(self.live.config, len(users), self.device)
        longest = max((len(s) for s in seqs), default=0)
        for pos in range(longest):
            rows = [r for r, s in enumerate(seqs) if pos < len(s)]
            idx = torch.tensor(rows, device=self.device)
            items = torch.tensor([seqs[r][pos][0] for r in rows], device=self.device)
            types = torch.tensor([seqs[r][pos][1] for r in rows], device=self.device)
            with torch.inference_mode():
                new_rows = step(self.live, state[idx], items, types, score=False).state
            state[idx] = new_rows
        vectors = state.to(torch.float16).cpu().numpy()
        for u, vec in zip(users, vectors):
            u.vector, u.model_version = vec, self.version

    def process(
        self, states: dict[str, UserState | None], events: list[InputEvent]
    ) -> tuple[dict[str, UserState], list[Recommendation], BatchStats]:
        """Apply `events` (offset order) to `states`; -> (changed states, recommendations, stats)."""
        stats = BatchStats()
        current = {u: (s if s is not None else self._fresh()) for u, s in states.items()}
        stale = [s for s in current.values() if s.model_version != self.version and s.recent_items]
        if stale and self.model is not None:
            self._replay(stale)
            stats.rewarmed = len(stale)
        for s in current.values():
            if s.model_version != self.version:
                s.model_version = self.version
                if self.model is not None and not s.recent_items:
                    s.vector = np.zeros(self.model.config.state_size, dtype=np.float16)
        # rounds: the r-th new event of every user in the batch, so each user's events apply in order
        rounds: list[list[int]] = []
        seen_per_user: Counter[str] = Counter()
        recs: list[Recommendation | None] = [None] * len(events)
        for n, ev in enumerate(events):
            user = ev.event.user_id
            st = current[user]
            stats.by_type[ev.event.event_type] += 1
            if ev.offset <= st.last_offset:
                stats.duplicates += 1
                recs[n] = self._repeat(ev, st)
                continue
            r = seen_per_user[user]
            seen_per_user[user] += 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(n)
        # a duplicate means the event was applied before a crash; writing the state again
        # repairs a changelog that may have missed that write (the local store had it)
        changed: dict[str, UserState] = {
            ev.event.user_id: current[ev.event.user_id] for ev in events if ev.offset <= current[ev.event.user_id].last_offset
        }
        for members in rounds:
            self._round(members, events, current, recs, stats)
            for n in members:
                changed[events[n].event.user_id] = current[events[n].event.user_id]
        return changed, [r for r in recs if r is not None], stats

    def _repeat(self, ev: InputEvent, st: UserState) -> Recommendation:
        return Recommendation(ev.event.user_id, ev.event_id, st.last_recs, [0.0] * len(st.last_recs), "repeat",
                              self.version, ev.event.timestamp_ms)

    def _round(self, members: list[int], events: list[InputEvent], current: dict[str, UserState],
               recs: list[Recommendation | None], stats: BatchStats) -> None:
        cfg = self.config
        recent_n, live, index = cfg.recent_n, self.model is not None, self.vocab.index
        known: list[int] = []  # the members whose item the model knows, with their rows:
        rows: list[UserState] = []
        known_items: list[int] = []
        known_types: list[int] = []
        self.trending.add_many([events[n].event.item_id for n in members])
        for n in members:
            ev = events[n]
            event = ev.event
            item = event.item_id
            st = current[event.user_id]
            if st.last_recs:
                stats.hit_opportunities += 1
                stats.hits += item in st.last_recs
            st.recent_items.append(item)  # the state's own lists (decoded or fresh)
            st.recent_types.append(event.event_type)
            if len(st.recent_items) > recent_n:
                del st.recent_items[:-recent_n], st.recent_types[:-recent_n]
            st.last_offset = ev.offset
            if not live:
                continue  # cold: nothing to step
            idx = index.get(item, -1)
            if idx < 0:
                stats.unknown_items += 1
            else:
                known.append(n)
                rows.append(st)
                known_items.append(idx)
                known_types.append(event.event_type)
        stats.applied += len(members)
        if known:
            # one copy of the rows' float16 vectors (np.stack took ~0.75 us a row to check and
            # reshape each); every vector is state_size long (stale ones were rebuilt above)
            vectors = np.concatenate([st.vector for st in rows]).reshape(len(rows), self.live.config.state_size)
            state = torch.from_numpy(vectors).to(self.device, torch.float32)
            items = torch.tensor(known_items, device=self.device)
            types = torch.tensor(known_types, device=self.device)
            exclude = [self._exclude(st, i) for st, i in zip(rows, known_items)]
            out = step(self.live, state, items, types, k=min(cfg.k, self.live.config.n_items),
                       exclude=exclude if any(exclude) else None, scorer=self.scorer)
            assert out.top_scores is not None and out.top_items is not None
            new_state, top_scores, top_idx = out.state, out.top_scores, out.top_items
            new_vectors = new_state.to(torch.float16).cpu().numpy()
            finite = torch.isfinite(top_scores).cpu().numpy()  # masked items score -inf
            all_finite: list[bool] = np.asarray(finite.all(axis=1)).tolist()
            top_names: list[list[str]] = self._names[top_idx.cpu().numpy()].tolist()  # the batch's ids at once
            # rounded as float64: float32's 0.0338 is 0.033799998462200165 on the wire (22% of a list's bytes)
            scores: list[list[float]] = top_scores.cpu().numpy().astype(np.float64).round(4).tolist()
            for row, n in enumerate(known):
                st = rows[row]
                st.vector = new_vectors[row]
                ids, scores_row = top_names[row], scores[row]
                if not all_finite[row]:
                    ids = [j for j, ok in zip(ids, finite[row]) if ok]
                    scores_row = scores_row[: len(ids)]  # -inf sorts last
                recs[n] = self._emit(events[n], st, ids, scores_row, "lstm")
        known_rows = set(known)
        for n in members:
            if n in known_rows:
                continue
            st = current[events[n].event.user_id]
            if st.last_recs and st.last_strategy == "lstm":
                # the model cannot use this item: keep the last list
                recs[n] = self._emit(events[n], st, st.last_recs, [0.0] * len(st.last_recs), "lstm")
            else:
                top = self.trending.top(cfg.k, self._excluded(st))
                recs[n] = self._emit(events[n], st, [i for i, _ in top], [c for _, c in top], "trending")

    def _excluded(self, st: UserState) -> set[str]:
        if not self.config.exclude_purchased or PURCHASE not in st.recent_types:
            return set()
        return {i for i, t in zip(st.recent_items, st.recent_types) if t == PURCHASE}

    def _exclude(self, st: UserState, current: int) -> list[int]:
        """Item indices the model must not recommend to this user: what they bought (and the item
        just viewed, when set)."""
        out = {self.vocab.get(i) for i in self._excluded(st)}
        if self.config.exclude_current:
            out.add(current)
        out.discard(-1)
        return sorted(out)

    def _emit(self, ev: InputEvent, st: UserState, item_ids: list[str], scores: list[float],
              strategy: str) -> Recommendation:
        st.last_recs = item_ids
        st.last_strategy = strategy
        return Recommendation(ev.event.user_id, ev.event_id, item_ids, scores, strategy, self.version,
                              ev.event.timestamp_ms)
