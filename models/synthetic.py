"""Synthetic click/purchase streams with structure a model can learn.

A catalog with Zipf popularity split into categories; each user prefers a few
categories; within a session the next item is usually the next one in the
category's fixed browsing order (a learnable successor rule), sometimes a
popular item of a preferred category; sessions end in a purchase of an item
clicked in it with some probability. Sessions are separated by hours.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from models.data import Session
from models.events import CLICK, PURCHASE, Event


@dataclass
class SyntheticConfig:
    n_events: int = 10_000  # total events
    n_users: int = 500  # distinct users
    n_items: int = 1_000  # catalog size
    n_categories: int = 20  # item groups with their own browsing order
    follow_rule: float = 0.7  # chance the next click follows the category's order
    purchase_rate: float = 0.3  # chance a session ends in a purchase
    session_length: int = 8  # mean clicks per session
    start_ms: int = 1_700_000_000_000  # timestamp of the first event
    seed: int = 7  # users, sessions and timing
    catalog_seed: int = 7  # the catalog's categories and browsing orders: keep it to add users to the same shop


def item_id(n: int) -> str:
    return f"item-{n:05d}"


def catalog(cfg: SyntheticConfig) -> list[str]:
    return [item_id(n) for n in range(cfg.n_items)]


def _walk(cfg: SyntheticConfig, emit: Callable[[int, int, int, int, int], None]) -> None:
    """The shop's random walk: `emit(user, session, item, event_type, timestamp_ms)` per event."""
    rng = random.Random(cfg.seed)
    shop = random.Random(cfg.catalog_seed)
    items = list(range(cfg.n_items))
    cats = [items[c :: cfg.n_categories] for c in range(cfg.n_categories)]
    for c in cats:
        shop.shuffle(c)  # each category's browsing order
    position = {i: (c, p) for c, order in enumerate(cats) for p, i in enumerate(order)}
    weights = [1.0 / (1 + r) ** 0.8 for r in range(cfg.n_items)]  # Zipf-like popularity by item number
    cum = [list(accumulate(weights[i] for i in c)) for c in cats]  # per category: O(log n) draws at any size
    prefs = [rng.sample(range(cfg.n_categories), 2) for _ in range(cfg.n_users)]
    per_user = max(1, cfg.n_events // cfg.n_users)
    for u in range(cfg.n_users):
        t = cfg.start_ms + rng.randrange(0, 3_600_000)
        quota = per_user + (1 if u < cfg.n_events - per_user * cfg.n_users else 0)
        s = 0
        while quota > 0:
            cat = rng.choice(prefs[u])
            cur = rng.choices(cats[cat], cum_weights=cum[cat])[0]
            clicked = []
            length = max(2, int(rng.expovariate(1 / cfg.session_length)) + 1)
            for _ in range(min(length, quota)):
                emit(u, s, cur, CLICK, t)
                clicked.append(cur)
                quota -= 1
                t += rng.randrange(5_000, 90_000)
                cat_of, place = position[cur]
                if rng.random() < cfg.follow_rule:
                    cur = cats[cat_of][(place + 1) % len(cats[cat_of])]
                else:
                    pc = rng.choice(prefs[u])
                    cur = rng.choices(cats[pc], cum_weights=cum[pc])[0]
            if quota > 0 and rng.random() < cfg.purchase_rate:
                emit(u, s, rng.choice(clicked), PURCHASE, t)
                quota -= 1
            t += rng.randrange(2 * 3_600_000, 30 * 3_600_000)
            s += 1


def generate(cfg: SyntheticConfig) -> list[Event]:
    """`cfg.n_events` events over `cfg.n_users` users, ordered by timestamp."""
    events: list[Event] = []

    def emit(u: int, s: int, item: int, etype: int, t: int) -> None:
        events.append(Event(f"user-{u:05d}", item_id(item), etype, t, session_id=f"u{u}-s{s}"))

    _walk(cfg, emit)
    events.sort(key=lambda e: (e.timestamp_ms, e.user_id))
    return [
        Event(e.user_id, e.item_id, e.event_type, e.timestamp_ms, event_id=f"e{n}", session_id=e.session_id)
        for n, e in enumerate(events)
    ]


def synthetic_sessions(cfg: SyntheticConfig) -> tuple[list[Session], list[str]]:
    """The sessions of `generate(cfg)` by start time (the walk's own sessions, hours apart: what
    cutting its events at a 30-minute gap gives, without holding millions of events), and the whole
    catalogue (items no session holds too: a shop's long tail)."""
    sessions: dict[tuple[int, int], Session] = {}
    names = catalog(cfg)

    def emit(u: int, s: int, item: int, etype: int, t: int) -> None:
        session = sessions.get((u, s))
        if session is None:
            session = sessions[(u, s)] = Session(f"u{u}-s{s}")
        session.items.append(names[item])
        session.types.append(etype)
        session.times.append(t / 1000.0)

    _walk(cfg, emit)
    return sorted(sessions.values(), key=lambda s: (s.times[0], s.key)), names
