import numpy as np
import pytest
import torch

from models.artifacts import Artifact
from models.events import Event
from models.lstm import ModelConfig, RecurrentRecommender, init_state, step
from models.online import InputEvent, OnlineConfig, OnlineRecommender, UserState
from models.vocab import Vocabulary

ITEMS = [f"i{n}" for n in range(30)]


def _artifact(version="v1", seed=0) -> Artifact:
    torch.manual_seed(seed)
    model = RecurrentRecommender(ModelConfig(n_items=len(ITEMS), embedding_dim=8, hidden_dim=8, dropout=0.0)).eval()
    return Artifact(model, Vocabulary(ITEMS), {"version": version}, path=None)


def _ev(user, item, offset, etype=0):
    return InputEvent(Event(user, item, etype, 1_700_000_000_000 + offset), partition=0, offset=offset)


def _run(rec, batches):
    states, out = {}, []
    for batch in batches:
        users = {e.event.user_id for e in batch}
        changed, recs, _ = rec.process({u: states.get(u) for u in users}, batch)
        states.update(changed)
        out += recs
    return states, out


def test_events_of_one_user_in_one_batch_apply_in_order():
    evs = [_ev("a", "i1", 0), _ev("b", "i2", 1), _ev("a", "i3", 2), _ev("a", "i4", 3), _ev("b", "i5", 4)]
    s1, r1 = _run(OnlineRecommender(_artifact(), OnlineConfig(k=5)), [evs])
    s2, r2 = _run(OnlineRecommender(_artifact(), OnlineConfig(k=5)), [[e] for e in evs])
    assert [r.event_id for r in r1] == [r.event_id for r in r2] == ["0-0", "0-1", "0-2", "0-3", "0-4"]
    assert [r.items for r in r1] == [r.items for r in r2]
    for u in "ab":
        np.testing.assert_array_equal(s1[u].vector, s2[u].vector)
        assert s1[u].recent_items == s2[u].recent_items and s1[u].last_offset == s2[u].last_offset
    assert s1["a"].recent_items == ["i1", "i3", "i4"] and s1["a"].last_offset == 3


def test_top_k_equals_an_offline_replay_through_step():
    art = _artifact()
    seq = ["i3", "i7", "i7", "i1", "i20"]
    _, recs = _run(OnlineRecommender(art, OnlineConfig(k=10)), [[_ev("u", i, n)] for n, i in enumerate(seq)])
    state = init_state(art.model.config, 1)
    for n, item in enumerate(seq):
        out = step(art.model, state, torch.tensor([ITEMS.index(item)]), torch.tensor([0]))
        state, scores = out.state, out.scores
        state = state.half().float()  # the worker stores state as float16 between events
        top = torch.topk(scores[0], 10).indices.tolist()
        assert [i for i, _ in recs[n].items] == [ITEMS[j] for j in top]
        assert recs[n].strategy == "lstm" and len(set(i for i, _ in recs[n].items)) == 10
        # 4 decimals, as on the wire: float32's 0.0338 would be 0.033799998462200165
        assert recs[n].scores == np.round(torch.topk(scores[0], 10).values.double().numpy(), 4).tolist()
        assert all(len(repr(v).split(".")[-1]) <= 4 for v in recs[n].scores)


def test_already_applied_offsets_are_not_applied_again():
    rec = OnlineRecommender(_artifact(), OnlineConfig(k=5))
    states, _ = _run(rec, [[_ev("a", "i1", 10), _ev("a", "i2", 11)]])
    before = states["a"]
    changed, recs, stats = rec.process({"a": UserState.decode(before.encode())}, [_ev("a", "i2", 11), _ev("a", "i9", 10)])
    assert stats.duplicates == 2 and stats.applied == 0
    assert changed["a"].encode() == before.encode()  # rewritten unchanged (heals a lagging changelog)
    assert [r.strategy for r in recs] == ["repeat", "repeat"]
    assert [i for i, _ in recs[0].items] == before.last_recs


def test_unknown_items_are_remembered_counted_and_cold_users_get_trending():
    rec = OnlineRecommender(_artifact(), OnlineConfig(k=3))
    _run(rec, [[_ev("x", "i5", 0), _ev("y", "i5", 1), _ev("z", "i6", 2)]])
    changed, recs, stats = rec.process({"new": None}, [_ev("new", "brand-new", 3)])
    assert stats.unknown_items == 1
    assert recs[0].strategy == "trending"
    assert [i for i, _ in recs[0].items] == ["i5", "brand-new", "i6"]
    st = changed["new"]
    assert st.recent_items == ["brand-new"] and not st.vector.any()


def test_purchased_items_are_never_recommended():
    rec = OnlineRecommender(_artifact(), OnlineConfig(k=29))
    _, recs = _run(rec, [[_ev("a", "i1", 0, etype=1), _ev("a", "i2", 1)]])
    assert "i1" not in [i for i, _ in recs[1].items]
    assert len(recs[1].items) == 29


def test_a_list_asked_longer_than_the_items_left_holds_only_the_items_left():
    rec = OnlineRecommender(_artifact(), OnlineConfig(k=30))  # the whole catalogue, one item bought
    _, recs = _run(rec, [[_ev("a", "i1", 0, etype=1), _ev("a", "i2", 1)]])
    items, scores = recs[1].item_ids, recs[1].scores
    assert len(items) == len(scores) == 29 and len(set(items)) == 29 and "i1" not in items
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)


def test_state_record_round_trip_is_compact():
    st = UserState("v1", 41, np.arange(16, dtype=np.float16), ["a", "b"], [0, 1], ["c"], "lstm")
    back = UserState.decode(st.encode())
    assert back.model_version == "v1" and back.last_offset == 41 and back.recent_items == ["a", "b"]
    np.testing.assert_array_equal(back.vector, st.vector)
    assert len(st.encode()) < 120
    with pytest.raises(ValueError):
        UserState.decode(b"XX" + st.encode()[2:])


def test_new_model_version_rewarms_users_from_recent_items():
    rec = OnlineRecommender(_artifact("v1", seed=0), OnlineConfig(k=5))
    states, _ = _run(rec, [[_ev("a", "i1", 0)], [_ev("a", "i2", 1)]])
    new = _artifact("v2", seed=1)
    rec.use(new)
    changed, recs, stats = rec.process({"a": states["a"]}, [_ev("a", "i3", 2)])
    assert stats.rewarmed == 1 and recs[0].model_version == "v2" and changed["a"].model_version == "v2"
    fresh = OnlineRecommender(new, OnlineConfig(k=5))
    _, expected = _run(fresh, [[_ev("a", "i1", 0)], [_ev("a", "i2", 1)], [_ev("a", "i3", 2)]])
    assert [i for i, _ in recs[0].items] == [i for i, _ in expected[2].items]


def test_cold_start_serves_trending_then_a_published_model_takes_over():
    rec = OnlineRecommender(None, OnlineConfig(k=3))
    states, recs = _run(rec, [[_ev("a", "i1", 0), _ev("b", "i1", 1), _ev("a", "i2", 2)]])
    assert {r.strategy for r in recs} == {"trending"} and {r.model_version for r in recs} == {"none"}
    assert states["a"].recent_items == ["i1", "i2"] and states["a"].vector.size == 0
    rec.use(_artifact("v1"))
    changed, recs, stats = rec.process({"a": states["a"]}, [_ev("a", "i3", 3)])
    assert stats.rewarmed == 1 and recs[0].strategy == "lstm" and recs[0].model_version == "v1"
    fresh = OnlineRecommender(_artifact("v1"), OnlineConfig(k=3))
    _, expected = _run(fresh, [[_ev("a", "i1", 0)], [_ev("a", "i2", 2)], [_ev("a", "i3", 3)]])
    assert recs[0].items == expected[2].items
