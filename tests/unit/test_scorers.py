"""The scorers' one contract (models/scorers.py): K distinct items, exclusions kept even when most
of a query's nearest items are excluded, ANN equal to exact where its search is exhaustive, GPU
block sizing exercised on the CPU, and the index built off the event loop."""

import asyncio
import threading
import time

import pytest
import torch

from models.artifacts import Artifact
from models.events import PURCHASE, Event
from models.lstm import ModelConfig, RecurrentRecommender, step
from models.online import InputEvent, OnlineConfig, OnlineRecommender
from models.scorers import AnnScorer, ExactScorer, ScorerConfig, block_rows, build_scorer, choose
from models.vocab import Vocabulary

V, E = 3001, 16


@pytest.fixture(scope="module", params=[0.0, 10.0], ids=["inner-product", "cosine"])
def model(request):
    torch.manual_seed(0)
    m = RecurrentRecommender(ModelConfig(n_items=V, embedding_dim=E, hidden_dim=16, dropout=0.0,
                                         score_scale=request.param)).eval()
    with torch.no_grad():
        m.item_bias.normal_(0, 0.1)  # scores with a bias term, as trained models have
    return m


def _full_top(model, queries, k, exclude=None):
    with torch.inference_mode():
        full = model.score(queries)
        for r, items in enumerate(exclude or []):
            full[r, list(items)] = float("-inf")
        return torch.topk(full, k, dim=1)


def _scorers(model):
    return [ExactScorer(), AnnScorer(model, ScorerConfig(ann_lists=16, ann_probe=4, ann_candidates=40))]


def test_every_scorer_returns_k_distinct_items_best_first(model):
    queries = torch.randn(50, E)
    for scorer in _scorers(model):
        with torch.inference_mode():
            values, items = scorer(model, queries, 20)
        assert items.shape == (50, 20), scorer.name
        assert all(len(set(row)) == 20 for row in items.tolist()), scorer.name
        assert torch.all(values[:, :-1] >= values[:, 1:]), scorer.name
        assert torch.isfinite(values).all(), scorer.name


def test_excluded_items_never_come_back_even_when_they_are_most_of_the_nearest(model):
    queries = torch.randn(8, E)
    nearest = _full_top(model, queries, 60).indices  # exclude each query's 60 best items: more than its candidates
    exclude = [row.tolist() for row in nearest]
    expected = _full_top(model, queries, 20, exclude)
    for scorer in _scorers(model):
        with torch.inference_mode():
            values, items = scorer(model, queries, 20, exclude)
        for r in range(8):
            assert not set(items[r].tolist()) & set(exclude[r]), scorer.name
            assert len(set(items[r].tolist())) == 20, scorer.name
        assert torch.isfinite(values).all(), scorer.name
        overlap = sum(len(set(a) & set(b)) for a, b in zip(items.tolist(), expected.indices.tolist())) / (8 * 20)
        assert overlap >= (1.0 if scorer.name == "exact" else 0.5), (scorer.name, overlap)


def test_ann_equals_exact_where_its_search_is_exhaustive(model):
    ann = AnnScorer(model, ScorerConfig(ann_lists=16, ann_probe=16, ann_candidates=20))  # every list probed
    queries = torch.randn(64, E)
    exclude = [[0, 1, 2]] * 64
    expected = _full_top(model, queries, 20, exclude)
    with torch.inference_mode():
        values, items = ann(model, queries, 20, exclude)
    assert torch.equal(items, expected.indices)
    assert torch.allclose(values, expected.values, atol=1e-5)
    assert ann.build_seconds > 0 and ann.index_bytes >= V * (E + 2) * 2  # [e, b, lift] as float16, at least


def test_a_catalogue_smaller_than_k_or_all_excluded_leaves_the_rest_minus_infinity():
    torch.manual_seed(1)
    small = RecurrentRecommender(ModelConfig(n_items=30, embedding_dim=8, hidden_dim=8, dropout=0.0)).eval()
    ann = AnnScorer(small, ScorerConfig(ann_lists=2, ann_probe=1, ann_candidates=10))
    with torch.inference_mode():
        values, items = ann(small, torch.randn(3, 8), 20, [list(range(25)), [], list(range(30))])
    assert torch.isfinite(values[0]).sum() == 5 and set(items[0][:5].tolist()) == set(range(25, 30))
    assert torch.isfinite(values[1]).sum() == 20 and len(set(items[1].tolist())) == 20
    assert torch.isfinite(values[2]).sum() == 0


def test_gpu_block_sizing_runs_on_the_cpu_and_never_exceeds_the_memory_budget(model):
    # on a GPU blocks are sized to score_memory_mb: 4,096 queries x 1,000,000 items in 1 GiB blocks
    assert block_rows(torch.device("cuda"), 1_000_000, 4096, 2**30) == 268
    assert block_rows(torch.device("cuda"), 50_000, 4096, 2**30) == 4096  # fits at once
    assert block_rows(torch.device("cpu"), 1_000_000, 4096, 2**30) == 256  # cache-sized on a CPU
    # smaller where the items fit in cache: 64 rows a thread
    assert block_rows(torch.device("cpu"), 20_000, 4096, 2**30) == 64 * torch.get_num_threads()
    rows = block_rows(torch.device("cuda"), V, 600, 2**20)  # 1 MiB budget: 87 rows of 3,001 scores
    scorer = ExactScorer(score_memory_mb=1, rows=rows)  # the GPU's sizing, run on the CPU device
    queries = torch.randn(600, E)
    exclude = [[r % V, (r * 7) % V] for r in range(600)]
    expected = _full_top(model, queries, 20, exclude)
    with torch.inference_mode():
        values, items = scorer(model, queries, 20, exclude)
    assert rows == 87 and scorer.largest_block == 87
    assert scorer._buffer is not None and scorer._buffer.numel() * 4 <= 2**20
    assert torch.equal(items, expected.indices) and torch.allclose(values, expected.values)


def test_the_gpu_tf32_path_picks_candidates_then_ranks_them_in_float32(model):
    # on the CPU the product stays float32; the candidate and re-scoring path is the GPU's
    scorer = ExactScorer(tf32=True, rows=64)
    queries = torch.randn(200, E)
    exclude = [[r % V] for r in range(200)]
    expected = _full_top(model, queries, 20, exclude)
    with torch.inference_mode():
        values, items = scorer(model, queries, 20, exclude)
    assert torch.equal(items, expected.indices) and torch.allclose(values, expected.values, atol=1e-5)
    assert build_scorer(model, ScorerConfig(kind="exact", gpu_tf32=True), "cpu").tf32 is False  # GPU only


def test_the_default_gpu_block_is_a_sixteenth_of_its_memory_at_most_4_gib():
    from models.scorers import auto_block_bytes

    assert auto_block_bytes(143_771 * 2**20) == 4 * 2**30  # an H200: 4 GiB, 1,073 rows at 1,000,000 items
    assert auto_block_bytes(16 * 2**30) == 2**30  # a 16 GB card: 1 GiB
    assert auto_block_bytes(8 * 2**30) == 2**29
    assert block_rows(torch.device("cuda"), 1_000_000, 4096, auto_block_bytes(143_771 * 2**20)) == 1073
    assert ExactScorer().memory_bytes == 0  # sized on first use, from the device it runs on


def test_auto_picks_ann_on_a_cpu_for_large_catalogues_only(model):
    cfg = ScorerConfig(kind="auto", ann_min_items=3000)
    assert choose(cfg, torch.device("cpu"), 3001) == "ann"
    assert choose(cfg, torch.device("cpu"), 2999) == "exact"
    assert choose(cfg, torch.device("cuda"), 10**6) == "exact"  # a GPU scores exactly
    assert choose(ScorerConfig(kind="exact", ann_min_items=1), torch.device("cpu"), 10**6) == "exact"
    assert build_scorer(model, ScorerConfig(kind="ann", ann_lists=8), "cpu").name == "ann"


def test_the_worker_path_with_ann_keeps_purchases_out_and_matches_exact_when_exhaustive(model):
    items = [f"i{n}" for n in range(V)]
    art = Artifact(model, Vocabulary(items), {"version": "v1"}, path=None)
    exhaustive = ScorerConfig(kind="ann", ann_lists=8, ann_probe=8)
    ann = OnlineRecommender(art, OnlineConfig(k=10, scorer=exhaustive))
    exact = OnlineRecommender(art, OnlineConfig(k=10, scorer=ScorerConfig(kind="exact")))
    assert ann.scorer.name == "ann" and exact.scorer.name == "exact"
    evs = [InputEvent(Event("u", f"i{n}", PURCHASE if n % 2 else 0, 1_700_000_000_000 + n), 0, n) for n in range(12)]
    _, recs_ann, _ = ann.process({"u": None}, evs)
    _, recs_exact, _ = exact.process({"u": None}, evs)
    bought = {f"i{n}" for n in range(1, 12, 2)}
    assert all(len(r.items) == 10 and not set(r.items) & bought for r in recs_ann)
    assert [r.item_ids for r in recs_ann] == [r.item_ids for r in recs_exact]
    # the same scores up to float32 rounding: ann re-scores its candidates with its own product
    assert [s for r in recs_ann for s in r.scores] == pytest.approx([s for r in recs_exact for s in r.scores], abs=2e-4)


def test_step_hands_exclusions_to_the_scorer(model):
    state = torch.zeros(2, model.config.state_size)
    out = step(model, state, torch.tensor([1, 2]), torch.tensor([0, 0]), k=5, exclude=[[7], []],
               scorer=AnnScorer(model, ScorerConfig(ann_lists=4, ann_probe=4)))
    assert 7 not in out.top_items[0].tolist() and out.top_items.shape == (2, 5)


def test_the_index_is_built_in_the_loading_thread_while_the_event_loop_keeps_running(model, tmp_path, monkeypatch):
    from models.artifacts import save_artifact
    from pipeline import model_watch

    path = save_artifact(tmp_path, model, Vocabulary([f"i{n}" for n in range(V)]), {})
    rec = OnlineRecommender(None, OnlineConfig(scorer=ScorerConfig(kind="ann", ann_lists=8)))
    built_in: list[int] = []
    real_prepare = rec.prepare

    def slow_prepare(artifact):  # an index that takes a while to build, as at 1,000,000 items
        built_in.append(threading.get_ident())
        time.sleep(0.5)
        return real_prepare(artifact)

    monkeypatch.setattr(rec, "prepare", slow_prepare)

    async def main():
        ticks = 0
        loading = asyncio.get_running_loop().run_in_executor(None, model_watch.load_and_prepare, rec, path)
        while not loading.done():  # the loop's other work: it keeps running while the index builds
            ticks += 1
            await asyncio.sleep(0.01)
        return ticks, threading.get_ident(), await loading

    ticks, loop_thread, (artifact, scorer) = asyncio.run(main())
    assert built_in and built_in[0] != loop_thread
    assert ticks >= 20  # 0.5 s of building, the loop ticked all along
    assert scorer.name == "ann" and artifact.model.config.n_items == V


def test_an_index_stored_with_the_artifact_is_read_instead_of_built_and_only_for_its_weights(model, tmp_path):
    from models.scorers import INDEX_FILE

    cfg = ScorerConfig(kind="ann", ann_lists=16, ann_probe=4)
    built = AnnScorer(model, cfg)
    built.save(tmp_path / INDEX_FILE, "sha-of-these-weights")
    read = build_scorer(model, cfg, "cpu", tmp_path, "sha-of-these-weights")
    assert read.loaded and not built.loaded and (read.lists, read.probe) == (16, 4)
    queries = torch.randn(30, E)
    with torch.inference_mode():
        assert torch.equal(read(model, queries, 20)[1], built(model, queries, 20)[1])
    other = build_scorer(model, cfg, "cpu", tmp_path, "sha-of-retrained-weights")  # a new model: built anew
    assert not other.loaded and other.lists == 16
    meta = tmp_path / (INDEX_FILE + ".json")  # an index stored by an earlier version (float32, no format)
    meta.write_text(meta.read_text().replace(', "format": 2', ""))
    assert not build_scorer(model, cfg, "cpu", tmp_path, "sha-of-these-weights").loaded


@pytest.mark.parametrize(("n_items", "lists", "probe"), [(3000, 76, 48), (200, 5, 5)])
def test_the_default_probe_searches_lists_over_64_but_at_least_48_lists(n_items, lists, probe):
    from models.scorers import probe_for

    torch.manual_seed(0)
    small = RecurrentRecommender(ModelConfig(n_items=n_items, embedding_dim=8, hidden_dim=8)).eval()
    scorer = AnnScorer(small, ScorerConfig(kind="ann"))
    assert (scorer.lists, scorer.probe) == (lists, probe)  # 24 lost 0.0125 Recall@20 on yoochoose, 48 0.003
    # 1,000,000 items: 62 of 4,000 lists (overlap 0.97); 200,000 items: 48 of 1,788
    assert (probe_for(4000, ScorerConfig()), probe_for(1788, ScorerConfig()), probe_for(4000, ScorerConfig(ann_probe=7))) == (62, 48, 7)


def test_ann_chooses_the_lists_faiss_itself_would_for_the_query_scaled_onto_the_sphere(model):
    import numpy as np

    ann = AnnScorer(model, ScorerConfig(ann_lists=32, ann_probe=5, ann_candidates=30))
    queries = torch.randn(40, E) * 10  # queries far outside the sphere, as the cosine model's are
    y = torch.nn.functional.pad(torch.cat([queries, torch.ones(40, 1)], dim=1), (0, ann.width - E - 1))
    y = y * (ann.QUERY_RADIUS * ann.radius / y.norm(dim=1, keepdim=True))
    _, faiss_own = ann.index.search(np.ascontiguousarray(y.numpy()), 30)  # faiss's coarse step and scan
    with torch.inference_mode():
        ours = ann.search(queries, 30)  # lists chosen in torch, scanned by faiss
    same = sum(len(set(a) & set(b)) for a, b in zip(ours.tolist(), faiss_own.tolist())) / (40 * 30)
    assert same >= 0.99  # equal but where two lists' distances tie in float rounding
    assert ann.width % 8 == 0 and ann.width >= E + 2
