import pytest
import torch

from models.artifacts import Artifact
from models.lstm import ModelConfig, RecurrentRecommender, build_model
from models.scorers import ScorerConfig
from models.vocab import Vocabulary
from pipeline.bench.learned import learned_model
from pipeline.bench.step import StepBench, run_step_bench


def _artifact(n_items=200, dim=8):
    torch.manual_seed(0)
    model = RecurrentRecommender(ModelConfig(n_items=n_items, embedding_dim=dim, hidden_dim=8))
    return Artifact(model, Vocabulary([str(n) for n in range(n_items)]), {"version": "t"}, None)


def test_step_bench_smoke_run_reports_every_batch_size():
    out = run_step_bench("cpu", _artifact(), ScorerConfig(kind="exact"), n_users=1000, k=5,
                         batches=[1, 16, 64], seconds=0.05, source="random")
    assert [r["batch"] for r in out["results"]] == [1, 16, 64]
    assert all(r["events_per_s"] > 0 for r in out["results"])
    assert out["speedup"] > 1 and 0 < out["gemm_efficiency"]
    assert out["device"].startswith("cpu")
    assert (out["scorer"], out["items"], out["overlap_at_k"], out["index_bytes"]) == ("exact", 200, 1.0, 0)
    assert out["exact_events_per_s"] is None and out["over_exact"] is None  # ann only


def test_step_bench_runs_an_ensemble_with_its_wider_queries():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_items=300, embedding_dim=8, hidden_dim=8, members=3))
    art = Artifact(model, Vocabulary([str(n) for n in range(300)]), {"version": "t"}, None)
    out = run_step_bench("cpu", art, ScorerConfig(kind="exact"), n_users=500, k=5, batches=[1, 64], seconds=0.05,
                         source="random")
    assert out["config"]["members"] == 3 and all(r["events_per_s"] > 0 for r in out["results"])
    assert out["gemm_efficiency"] > 0  # its GEMM: 64 rows x 24 (3 x 8) wide queries x 300 items


def test_step_bench_with_ann_reports_its_overlap_with_exact_and_its_index():
    exhaustive = run_step_bench("cpu", _artifact(3000), ScorerConfig(kind="ann", ann_lists=8, ann_probe=8),
                                n_users=1000, k=10, batches=[64], seconds=0.05, source="random")
    # every list searched: the same items but where two scores differ in float rounding only (an
    # untrained model has many near-equal scores; re-scoring and the GEMM sum in other orders)
    assert exhaustive["scorer"] == "ann" and exhaustive["overlap_at_k"] >= 0.99
    assert exhaustive["index_build_seconds"] >= 0 and exhaustive["index_bytes"] >= 3000 * 10 * 2  # [e, b, lift] as float16
    assert exhaustive["ann"] == {"lists": 8, "probe": 8, "candidates": 40}
    # exact scoring of the same step in the same run, and ann's rate over it
    assert exhaustive["exact_events_per_s"] > 0
    assert exhaustive["over_exact"] == round(exhaustive["results"][0]["events_per_s"] / exhaustive["exact_events_per_s"], 1)
    narrow = run_step_bench("cpu", _artifact(3000), ScorerConfig(kind="ann", ann_lists=64, ann_probe=1,
                                                                 ann_candidates=10),
                            n_users=1000, k=10, batches=[64], seconds=0.05, source="random")
    assert 0 < narrow["overlap_at_k"] < 1.0  # one list of 64: the measure sees what search misses


def test_bench_step_updates_only_the_batch_users_state():
    bench = StepBench(_artifact(50, 4).model, n_users=100, k=3, device=torch.device("cpu"))
    users = torch.tensor([3, 7])
    _, idx = bench.step(users, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert idx.shape == (2, 3)
    touched = (bench.store != 0).any(dim=1).nonzero().flatten().tolist()
    assert touched == [3, 7]


def test_the_benchmarks_learned_model_is_trained_once_then_loaded_from_the_cache(tmp_path):
    said = []
    first = learned_model(300, 8, 8, 1, tmp_path, said.append, min_events=3000)
    second = learned_model(300, 8, 8, 1, tmp_path, said.append, min_events=3000)
    assert len(said) == 2 and said[0].startswith("training the benchmark's model once")  # train + done, once
    assert first.version == second.version and first.model.config.n_items == 300  # the whole catalogue
    assert not torch.equal(first.model.item_emb.weight[0], _artifact(300, 8).model.item_emb.weight[0])


def test_the_steady_rate_leaves_out_a_groups_start_and_a_runs_end():
    from pipeline.bench.e2e import steady_rate

    # 1,000 lists at 1 per ms (1,000 events/s)...
    steady = list(range(1000))
    assert steady_rate(steady) == pytest.approx(1000, rel=0.01)
    # ...after a start of 100 lists over 2 s and a 1 s stop (a group's second process joining),
    # and before a slow tail of 100 over 2 s: the first-to-last rate reads 1,200 / 6 s = 200
    start = [n * 20 for n in range(100)]
    tail = [4000 + 1000 + n * 20 for n in range(100)]
    run = start + [3000 + n for n in range(1000)] + tail
    assert len(run) / ((max(run) - min(run)) / 1000) < 250
    assert steady_rate(run) == pytest.approx(1000, rel=0.05)
