"""The bf16 scorer (models/bf16.py) gives ExactScorer's results: the same items, best first, with
float32 scores, on random, trained-like, flat and tied scores, with exclusions, batches of any size,
tiny catalogues and the rows its proof misses. On a machine without AVX-512 BF16 or a compiler the kernel
tests are skipped, saying why, and `auto` keeps the exact scorer."""

from __future__ import annotations

import pytest
import torch

from models import bf16
from models.errors import ConfigError
from models.lstm import ModelConfig, RecurrentRecommender
from models.scorers import ExactScorer, ScorerConfig, build_scorer, choose


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    loaded = bf16.load(tmp_path_factory.mktemp("native"))
    if isinstance(loaded, str):
        pytest.skip(f"bf16 not available here: {loaded}")
    return loaded


def _model(n_items: int, bias_std: float = 0.1, seed: int = 0, width: int = 64) -> RecurrentRecommender:
    torch.manual_seed(seed)
    m = RecurrentRecommender(ModelConfig(n_items=n_items, embedding_dim=width, hidden_dim=32, dropout=0.0)).eval()
    with torch.no_grad():
        m.item_bias.normal_(0, bias_std)
    return m


def _agree(model, queries, k, got, exclude=None):
    """Same items as ExactScorer wherever their scores are not tied within float32 rounding; the
    values are the items' float32 scores, best first."""
    with torch.inference_mode():
        want_v, want_i = ExactScorer()(model, queries, k, exclude)
        full = model.score(queries)
    values, items = got
    assert items.shape == want_i.shape and items.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert torch.allclose(values, want_v, rtol=1e-5, atol=1e-5)  # the same k-th best and all above
    finite = torch.isfinite(values)
    assert torch.allclose(values[finite], full.gather(1, items.clamp(min=0))[finite], rtol=1e-5, atol=1e-5)
    for r in range(items.size(0)):  # apart from exact ties at the k-th, the same set
        kth = want_v[r, -1]
        sure = {int(i) for i, v in zip(want_i[r], want_v[r], strict=True) if v > kth + 1e-5}
        assert sure <= set(items[r].tolist())


@pytest.mark.parametrize("n_items", [20_000, 3_001, 64, 100])
def test_the_kernel_returns_the_exact_top_k(lib, n_items):
    model = _model(n_items)
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    queries = torch.randn(150, 64)  # more than one call of 64 rows, not a multiple of 16
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    _agree(model, queries, 20, got)
    assert scorer.rows == 150 and scorer.rescored <= 3  # the proof holds for (nearly) every row


@pytest.mark.parametrize("width", [32, 96, 288])
def test_vectors_of_other_widths_are_padded_and_still_give_the_exact_top_k(lib, width):
    """288: `recur train`'s default, three members of 96 (their vectors side by side)."""
    model = _model(4_000, width=width)
    queries = torch.randn(37, width)
    scorer = bf16.Bf16Scorer(lib, ExactScorer(), model)
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    _agree(model, queries, 20, got)
    assert scorer.rescored <= 1


def test_an_ensembles_summed_scores_are_scored_as_one_wide_product(lib):
    from models.lstm import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_items=3_000, embedding_dim=32, hidden_dim=16, dropout=0.0, members=3,
                                    score_scale=10.0)).eval()  # cosine members, as `recur train` makes
    queries = torch.randn(20, 96)
    scorer = bf16.Bf16Scorer(lib, ExactScorer(), model)
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    _agree(model, queries, 20, got)


def test_flat_scores_and_exact_ties_still_give_the_exact_top_k(lib):
    model = _model(5_000, bias_std=0.0)
    with torch.no_grad():
        model.item_emb.weight[100:140] = model.item_emb.weight[7]  # 41 items with the very same vector
    queries = torch.randn(40, 64) * 1e-3  # scores within ~1e-3 of each other
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    _agree(model, queries, 20, got)


def test_more_tied_items_than_the_kernel_can_keep_go_to_the_exact_scorer(lib):
    """400 items share the best score: more than the 256 a query's keep holds, so the kernel's
    appends run up to the end of it and it gives up its proof; every row is scored exactly."""
    model = _model(5_000, bias_std=0.0)
    with torch.no_grad():
        model.item_emb.weight[1_000:1_400] = model.item_emb.weight[3]  # item 3 and 400 copies of it
    queries = model.item_emb.weight[3].detach().repeat(6, 1) + 1e-4 * torch.randn(6, 64)
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    _agree(model, queries, 20, got)
    assert scorer.rescored == 6
    assert set(got[1].flatten().tolist()) <= {3, *range(1_000, 1_400)}


def test_exclusions_never_come_back_and_the_rest_is_exact(lib):
    model = _model(3_000)
    queries = torch.randn(33, 64)
    with torch.inference_mode():
        nearest = ExactScorer()(model, queries, 40)[1]
    exclude = [nearest[r, : r % 30].tolist() for r in range(33)]  # up to 29 of each row's best: some past 48 - k
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    with torch.inference_mode():
        got = scorer(model, queries, 20, exclude)
    _agree(model, queries, 20, got, exclude)
    assert all(not set(exclude[r]) & set(got[1][r].tolist()) for r in range(33))
    assert scorer.rescored >= 4  # rows 29..32 exclude more than 48 - 20 items: scored by ExactScorer
    full = bf16.Bf16Scorer(lib, ExactScorer())  # k = 48: no room past k, any exclusion goes to ExactScorer
    with torch.inference_mode():
        got = full(model, queries, 48, exclude)
    _agree(model, queries, 48, got, exclude)
    assert all(not set(exclude[r]) & set(got[1][r].tolist()) for r in range(33))
    assert full.rescored >= sum(1 for row in exclude if row) == 31  # (rows 0 and 30 exclude nothing)


def test_rows_the_proof_misses_or_the_kernel_cannot_take_go_to_the_exact_scorer(lib):
    model = _model(30)  # 15 items left after exclusion, fewer than k: the k-th is -inf, no proof
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    queries = torch.randn(5, 64)
    exclude = [list(range(r % 2, 30, 2)) for r in range(5)]
    with torch.inference_mode():
        values, items = scorer(model, queries, 20, exclude)
        want = ExactScorer()(model, queries, 20, exclude)
    assert scorer.rescored == 5 and torch.equal(values, want[0]) and torch.equal(items, want[1])
    assert torch.isfinite(values).sum(1).tolist() == [15] * 5
    wide = _model(500)  # k above 48: the exact scorer, untouched
    with torch.inference_mode():
        assert torch.equal(scorer(wide, queries, 60)[1], ExactScorer()(wide, queries, 60)[1])


def test_new_weights_are_prepared_again(lib):
    model = _model(2_000)
    scorer = bf16.Bf16Scorer(lib, ExactScorer())
    queries = torch.randn(16, 64)
    with torch.inference_mode():
        scorer(model, queries, 20)
    with torch.no_grad():
        model.item_bias[:] = 0
        model.item_bias[1234] = 100.0  # now first for every query
    with torch.inference_mode():
        got = scorer(model, queries, 20)
    assert got[1][:, 0].tolist() == [1234] * 16
    _agree(model, queries, 20, got)


def test_auto_uses_bf16_on_a_cpu_below_the_ann_threshold_and_exact_where_it_cannot(lib, tmp_path_factory, monkeypatch):
    model = _model(1_000)
    native = str(tmp_path_factory.mktemp("auto-native"))
    cfg = ScorerConfig(kind="auto", ann_min_items=200_000, native_dir=native)
    assert choose(cfg, torch.device("cpu"), 1_000) == "bf16" and build_scorer(model, cfg, "cpu").name == "bf16"
    assert choose(cfg, torch.device("cuda"), 1_000) == "exact"
    assert choose(cfg, torch.device("cpu"), 300_000) == "ann"
    assert build_scorer(model, ScorerConfig(kind="exact", native_dir=native), "cpu").name == "exact"
    monkeypatch.setattr(bf16, "_loaded", {})
    monkeypatch.setattr(bf16, "_compiler", lambda: None)  # a machine without a C compiler
    assert choose(cfg, torch.device("cpu"), 1_000) == "exact" and build_scorer(model, cfg, "cpu").name == "exact"
    with pytest.raises(ConfigError, match="no C compiler"):
        build_scorer(model, ScorerConfig(kind="bf16", native_dir=native), "cpu")


def test_the_cpu_check_names_each_missing_flag():
    assert bf16.cpu_missing("processor : 0\nflags : fpu sse avx512f avx512bw avx512vl avx512_bf16\n") == []
    assert bf16.cpu_missing("flags : fpu sse avx512f avx512bw avx512vl\n") == ["avx512_bf16"]


def test_the_kernel_is_built_once_per_source_and_cpu(lib, tmp_path, monkeypatch):
    first = bf16._build(tmp_path, bf16._compiler(), "model name : a\n")
    built = first.stat().st_mtime_ns
    assert bf16._build(tmp_path, bf16._compiler(), "model name : a\n") == first and first.stat().st_mtime_ns == built
    assert bf16._build(tmp_path, bf16._compiler(), "model name : b\n") != first  # another CPU: its own build
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no temporary file left
