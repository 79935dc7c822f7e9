"""Cold-start lists: K distinct items whenever K are known, and a window that survives restarts."""

from models.online import OnlineConfig, OnlineRecommender
from models.trending import Trending

from .test_online import ITEMS, _artifact, _ev, _run


def test_a_fresh_worker_with_a_model_sends_k_items_from_the_first_event():
    rec = OnlineRecommender(_artifact(), OnlineConfig(k=20))
    _, recs = _run(rec, [[_ev("a", "never-trained-on", 0)]])  # nothing the model knows: a trending list
    items = [i for i, _ in recs[0].items]
    assert recs[0].strategy == "trending"
    assert len(items) == len(set(items)) == 20  # was 1: the only item counted so far
    assert items[0] == "never-trained-on" and items[1:] == ITEMS[:19]  # then training popularity


def test_fallback_items_skip_purchases_and_items_already_listed():
    trending = Trending(window=100)
    trending.fallback = ["p1", "p2", "p3", "p4", "p5"]
    for item in ["p3", "x", "x"]:
        trending.add(item)
    assert trending.top(5, exclude={"p1"}) == [("x", 2.0), ("p3", 1.0), ("p2", 0.0), ("p4", 0.0), ("p5", 0.0)]
    assert len(trending.top(9)) == 6  # only six items known: all of them, once


def test_seeding_rebuilds_the_window_with_its_newest_events_only():
    trending = Trending(window=3)
    assert trending.seed(["old", "a", "b", "b"]) == 4
    assert trending.top(5) == [("b", 2.0), ("a", 1.0)]  # "old" fell out of the window


def test_a_cold_worker_seeded_from_snapshots_sends_their_trending_items():
    rec = OnlineRecommender(None, OnlineConfig(k=3, trending_window=50))
    rec.trending.seed(["i1", "i2", "i2", "i3", "i3", "i3"])
    _, recs = _run(rec, [[_ev("a", "i9", 0)]])
    assert [i for i, _ in recs[0].items] == ["i3", "i2", "i1"]


def test_a_batch_added_at_once_counts_as_its_items_added_one_by_one():
    items = ["a", "b", "a", "c", "a", "d", "b", "e"]
    one, many = Trending(window=5), Trending(window=5)
    for item in ["z", "z"]:
        one.add(item)
    many.add_many(["z", "z"])
    for item in items:
        one.add(item)
    many.add_many(items)  # more items than the window: the oldest fall out as they would one by one
    assert list(many.window) == list(one.window) == ["c", "a", "d", "b", "e"]
    assert many.counts == one.counts and "z" not in many.counts
    assert many.top(5) == one.top(5) == [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0), ("e", 1.0)]
