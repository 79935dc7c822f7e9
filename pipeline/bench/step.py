"""`recur bench step`: the model step alone, batch sizes taking turns, against the machine's GEMM rate.

    recur bench step --json [--device cpu|cuda] [--items 20000] [--users 1000000]
"""

from __future__ import annotations

import time

import torch

from models.lstm import ModelConfig, RecurrentRecommender, resolve_device, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The machine's dense float32 matrix-multiply rate, FLOP/s (best of `repeats`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class StepBench:
    """The worker's model path over a dense state store of `n_users` float16 rows."""

    def __init__(self, n_items: int, embedding_dim: int, hidden_dim: int, layers: int, n_users: int,
                 k: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        self.k = k
        self.model = RecurrentRecommender(ModelConfig(n_items=n_items, embedding_dim=embedding_dim,
                                                      hidden_dim=hidden_dim, num_layers=layers)).to(device).eval()
        self.store = torch.zeros(n_users, self.model.config.state_size, dtype=torch.float16, device=device)
        self.n_users = n_users
        self.n_items = n_items
        self.buffer = torch.empty(0, n_items, device=device)

    def inputs(self, batch: int, count: int = 16) -> list:
        """`count` batches of distinct users, made before timing starts."""
        perm = torch.randperm(self.n_users, device=self.device)
        out = []
        for n in range(count):
            users = perm[(n * batch) % self.n_users:][:batch]
            items = torch.randint(0, self.n_items, (users.numel(),), device=self.device)
            types = torch.randint(0, 2, (users.numel(),), device=self.device)
            out.append((users, items, types))
        return out

    def step(self, users: torch.Tensor, items: torch.Tensor, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffer.size(0) < users.numel():
            self.buffer = torch.empty(users.numel(), self.n_items, device=self.device)
        with torch.inference_mode():
            state = self.store[users].float()  # gather (B, S)
            out = step(self.model, state, items, types, k=self.k, buffer=self.buffer)  # the worker's step
            self.store[users] = out.state.to(torch.float16)  # scatter
        assert out.top_scores is not None and out.top_items is not None
        return out.top_scores, out.top_items

    def score_only(self, batch: int) -> float:
        """Seconds for the catalog scoring GEMM alone at `batch` (best of 5)."""
        q = torch.randn(batch, self.model.config.embedding_dim, device=self.device)
        out = torch.empty(batch, self.n_items, device=self.device)
        best = float("inf")
        with torch.inference_mode():
            self.model.score(q, out=out)
            for _ in range(5):
                _sync(self.device)
                t = time.perf_counter()
                self.model.score(q, out=out)
                _sync(self.device)
                best = min(best, time.perf_counter() - t)
        return best

    def rates(self, batches: list[int], seconds: float = 2.0) -> dict[int, float]:
        """Events per second at each batch size: the median over timed windows (8 steps each
        for batches up to 64, 1 for larger), about `seconds` per size and at least 5 windows
        each. The sizes take turns (one window of each, then the next round): this shared
        2-core machine's speed drifts by 10-30% within a minute, and measured one after the
        other two sizes' ratio moved with that drift. Each window starts after an untimed step
        of its own size, so no size is timed on caches another size left cold."""
        pools = {b: self.inputs(b) for b in batches}
        times: dict[int, list[float]] = {b: [] for b in batches}
        i, started = 0, time.perf_counter()
        while min(len(t) for t in times.values()) < 5 or time.perf_counter() - started < seconds * len(batches):
            for b in batches:
                pool, per_window = pools[b], (8 if b <= 64 else 1)
                self.step(*pool[i % len(pool)])  # warm-up, untimed
                _sync(self.device)
                t = time.perf_counter()
                for j in range(1, per_window + 1):
                    self.step(*pool[(i + j) % len(pool)])
                _sync(self.device)
                times[b].append(time.perf_counter() - t)
            i += 9
        return {b: b * (8 if b <= 64 else 1) / sorted(ts)[len(ts) // 2] for b, ts in times.items()}


def run_step_bench(device_name: str, n_items: int, embedding_dim: int, hidden_dim: int, layers: int,
                   n_users: int, k: int, batches: list[int], seconds: float) -> dict:
    device = resolve_device(device_name)
    bench = StepBench(n_items, embedding_dim, hidden_dim, layers, n_users, k, device)
    rates = bench.rates(batches, seconds)
    results = [{"batch": b, "events_per_s": round(rates[b], 1)} for b in batches]
    by_batch = {b: round(rates[b], 1) for b in batches}
    gemm = gemm_flops(device)
    ref = 1024 if 1024 in by_batch else max(by_batch)
    score_s = bench.score_only(ref)
    score_flops = 2 * ref * embedding_dim * n_items / score_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "config": {"items": n_items, "embedding_dim": embedding_dim, "hidden_dim": hidden_dim, "layers": layers,
                   "users_in_state": n_users, "k": k},
        "results": results,
        "speedup": round(by_batch[ref] / by_batch[min(by_batch)], 1),
        "gemm_flops": round(gemm),
        "scoring_flops_at_batch": round(score_flops),
        "gemm_efficiency": float(f"{score_flops / gemm:.4g}"),  # 4 significant digits: tiny runs stay > 0
    }
