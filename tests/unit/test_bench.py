import torch

from pipeline.bench import StepBench, run_step_bench


def test_step_bench_smoke_run_reports_every_batch_size():
    out = run_step_bench("cpu", n_items=200, embedding_dim=8, hidden_dim=8, layers=1, n_users=1000, k=5,
                         batches=[1, 16, 64], seconds=0.05)
    assert [r["batch"] for r in out["results"]] == [1, 16, 64]
    assert all(r["events_per_s"] > 0 for r in out["results"])
    assert out["speedup"] > 1 and 0 < out["gemm_efficiency"]
    assert out["device"].startswith("cpu")


def test_bench_step_updates_only_the_batch_users_state():
    bench = StepBench(n_items=50, embedding_dim=4, hidden_dim=4, layers=1, n_users=100, k=3, device=torch.device("cpu"))
    users = torch.tensor([3, 7])
    _, idx = bench.step(users, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert idx.shape == (2, 3)
    touched = (bench.store != 0).any(dim=1).nonzero().flatten().tolist()
    assert touched == [3, 7]
