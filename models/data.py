"""Readers that turn event files into sessions, and the item vocabulary.

Formats:
  session-tsv  `SessionId<TAB>ItemId<TAB>Time` (Unix seconds), as in yoochoose-100k
  jsonl        one wire-format event per line (see README); sessions cut by inactivity
  diginetica   CIKM Cup 2016 `session_id;user_id;item_id;timeframe;eventdate` (views; time = the
               event date at 00:00 UTC + timeframe milliseconds, as the GRU4Rec papers read it)
The worker's Parquet snapshots are read by `pipeline/snapshot_files.py` (the core imports no
Parquet library) and cut into sessions here (`sessionize`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import BadRecord, DataError
from models.events import Event, parse_event
from models.vocab import Vocabulary

log = logging.getLogger(__name__)

FORMATS = ("session-tsv", "jsonl", "diginetica")
DEFAULT_SESSION_GAP_S = 30 * 60  # sessions are cut after 30 minutes of inactivity


@dataclass
class Session:
    key: str  # session id, or "<user>#<n>" for cut sessions
    items: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # Unix seconds

    def __len__(self) -> int:
        return len(self.items)


def read_sessions(path: str | Path, fmt: str, session_gap_s: float = DEFAULT_SESSION_GAP_S) -> list[Session]:
    """Read `path` in format `fmt` -> sessions ordered by start time."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"read: {path} does not exist")
    if fmt == "session-tsv":
        sessions = _read_session_tsv(path)
    elif fmt == "jsonl":
        sessions = sessionize(_read_jsonl(path), session_gap_s)
    elif fmt == "diginetica":
        sessions = _read_diginetica(path)
    else:
        raise DataError(f"read: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    sessions.sort(key=lambda s: (s.times[0], s.key))
    return sessions


def _read_session_tsv(path: Path) -> list[Session]:
    by_id: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["SessionId", "ItemId", "Time"]:
            raise DataError(f"read session-tsv: {path} must start with the header SessionId, ItemId, Time")
        for n, row in enumerate(reader, start=2):
            if len(row) < 3:
                raise DataError(f"read session-tsv: {path} line {n} has fewer than 3 columns")
            try:
                ts = float(row[2])
            except ValueError:
                raise DataError(f"read session-tsv: {path} line {n}: Time is not a number") from None
            by_id[row[0]].append((ts, n, row[1]))
    return _clicks_by_session(by_id)


def _clicks_by_session(by_id: dict[str, list[tuple[float, int, str]]]) -> list[Session]:
    """{session id: [(time, line, item)]} -> sessions of clicks in time order (ties: file order)."""
    sessions: list[Session] = []
    for sid, rows in by_id.items():
        rows.sort()
        sessions.append(Session(sid, [r[2] for r in rows], [0] * len(rows), [r[0] for r in rows]))
    return sessions


def _read_diginetica(path: Path) -> list[Session]:
    from datetime import UTC, datetime

    by_id: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    days: dict[str, float] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter=";")
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:5]] != ["session_id", "user_id", "item_id",
                                                                          "timeframe", "eventdate"]:
            raise DataError(f"read diginetica: {path} must start with the header "
                            "session_id;user_id;item_id;timeframe;eventdate")
        for n, row in enumerate(reader, start=2):
            if len(row) < 5:
                raise DataError(f"read diginetica: {path} line {n} has fewer than 5 columns")
            try:
                day = days.get(row[4])
                if day is None:
                    day = days[row[4]] = datetime.strptime(row[4], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
                ts = day + int(row[3]) / 1000.0
            except ValueError:
                raise DataError(f"read diginetica: {path} line {n}: timeframe or eventdate is not valid") from None
            by_id[row[0]].append((ts, n, row[2]))
    return _clicks_by_session(by_id)


def split_last_days(sessions: list[Session], days: float, min_item_support: int = 5,
                    min_length: int = 2) -> tuple[list[Session], list[Session]]:
    """The GRU4Rec papers' split: drop items seen fewer than `min_item_support` times, then
    sessions shorter than `min_length`; sessions that end in the last `days` days are the test,
    their events on items the training part lacks dropped, and then sessions too short again."""
    counts = Counter(i for s in sessions for i in s.items)

    def keep(s: Session, known) -> Session:  # noqa: ANN001 - a container of item ids
        idx = [n for n, i in enumerate(s.items) if i in known]
        return Session(s.key, [s.items[n] for n in idx], [s.types[n] for n in idx], [s.times[n] for n in idx])

    frequent = {i for i, c in counts.items() if c >= min_item_support}
    kept = [t for t in (keep(s, frequent) for s in sessions) if len(t) >= min_length]
    if not kept:
        raise DataError("split: no session is left after the item-support and length filters")
    cut = max(s.times[-1] for s in kept) - days * 86400
    train = [s for s in kept if s.times[-1] < cut]
    known = {i for s in train for i in s.items}
    test = [t for t in (keep(s, known) for s in kept if s.times[-1] >= cut) if len(t) >= min_length]
    if not train or not test:
        raise DataError(f"split: {len(train)} training and {len(test)} test sessions with {days:g} test days")
    return train, test


def write_session_tsv(sessions: Iterable[Session], path: str | Path) -> int:
    """Sessions -> a session-tsv file (SessionId, ItemId, Time); -> events written."""
    n = 0
    with Path(path).open("w") as f:
        f.write("SessionId\tItemId\tTime\n")
        for s in sessions:
            for item, t in zip(s.items, s.times):
                f.write(f"{s.key}\t{item}\t{t:.3f}\n")
                n += 1
    return n


def _read_jsonl(path: Path) -> list[Event]:
    events: list[Event] = []
    bad: Counter[str] = Counter()
    now_ms = int(time.time() * 1000)
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                events.append(parse_event(json.loads(line), now_ms))
            except json.JSONDecodeError:
                bad["invalid_json"] += 1
            except BadRecord as e:
                bad[e.reason] += 1
    if bad:
        log.warning("read jsonl: skipped %d invalid lines (%s)", sum(bad.values()), dict(bad))
    return events


def sessionize(events: Iterable[Event], gap_s: float = DEFAULT_SESSION_GAP_S) -> list[Session]:
    """Group events by user (or by session_id when given) and cut at `gap_s` of inactivity."""
    by_key: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_key[e.session_id if e.session_id is not None else e.user_id].append(e)
    sessions: list[Session] = []
    for key, evs in by_key.items():
        evs.sort(key=lambda e: e.timestamp_ms)
        current: Session | None = None
        for e in evs:
            t = e.timestamp_ms / 1000.0
            if current is None or t - current.times[-1] > gap_s:
                current = Session(f"{key}#{len(sessions)}")
                sessions.append(current)
            current.items.append(e.item_id)
            current.types.append(e.event_type)
            current.times.append(t)
    return sessions


@dataclass
class IndexedSession:
    items: np.ndarray  # (T,) int64 item indices
    types: np.ndarray  # (T,) int64 event types


def index_sessions(sessions: Iterable[Session], vocab: Vocabulary, min_length: int = 2) -> list[IndexedSession]:
    """Map to indices, dropping events on unknown items, then sessions shorter than `min_length`."""
    out = []
    for s in sessions:
        pairs = [(vocab.get(i), t) for i, t in zip(s.items, s.types)]
        pairs = [(i, t) for i, t in pairs if i >= 0]
        if len(pairs) >= min_length:
            arr = np.asarray(pairs, dtype=np.int64)
            out.append(IndexedSession(arr[:, 0].copy(), arr[:, 1].copy()))
    return out
