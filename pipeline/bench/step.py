"""`recur bench step`: the model step alone, batch sizes taking turns, against the machine's GEMM rate,
with the exact or the approximate scorer (and how much of the exact top-k the latter finds).

    recur bench step --json [--device cpu|cuda] [--items 20000] [--scorer exact|ann] [--model DIR]
"""

from __future__ import annotations

import time

import torch

from models.artifacts import Artifact
from models.lstm import RecurrentRecommender, resolve_device, step
from models.scorers import AnnScorer, ExactScorer, Scorer, ScorerConfig, build_scorer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPEATS = 20  # best of: on this shared VM single runs of the scoring GEMM moved by 25%


def gemm_flops(device: torch.device, n: int = 2048, repeats: int = REPEATS) -> float:
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

    def __init__(self, model: RecurrentRecommender, n_users: int, k: int, device: torch.device,
                 scorer: Scorer | None = None) -> None:
        torch.manual_seed(0)
        self.device = device
        self.k = k
        self.model = model.to(device).eval()
        self.n_items = model.config.n_items
        self.scorer = scorer or ExactScorer()
        self.store = torch.zeros(n_users, self.model.config.state_size, dtype=torch.float16, device=device)
        self.n_users = n_users

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

    def step(self, users: torch.Tensor, items: torch.Tensor, types: torch.Tensor,
             scorer: Scorer | None = None, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            state = self.store[users].float()  # gather (B, S)
            out = step(self.model, state, items, types, k=self.k, scorer=scorer or self.scorer)  # the worker's step
            if write:
                self.store[users] = out.state.to(torch.float16)  # scatter
        assert out.top_scores is not None and out.top_items is not None
        return out.top_scores, out.top_items

    def overlap(self, batch: int, steps: int = 5) -> float:
        """The share of the exact top-k that this bench's scorer returns, averaged over `steps`
        batches of `batch` queries (1.0 for exact). The queries are those of users who follow their
        recommendations: each starts on an item drawn by popularity (a model's vocabulary is in
        training-popularity order) and then clicks one of its exact top-k at random, so that the
        states are the kind the model was trained on, not random item sequences."""
        if self.scorer.name == "exact" and not getattr(self.scorer, "tf32", False):
            return 1.0
        exact = ExactScorer()
        gen = torch.Generator().manual_seed(1)
        popularity = 1.0 / (1.0 + torch.arange(self.n_items, dtype=torch.float64)) ** 0.8
        users = torch.randperm(self.n_users, generator=gen)[:batch].to(self.device)
        self.store[users] = 0  # new users: the timing's random item sequences are no one's history
        items = torch.multinomial(popularity, users.numel(), replacement=True, generator=gen).to(self.device)
        types = torch.zeros_like(items)
        shares = []
        for _ in range(steps):
            _, want = self.step(users, items, types, scorer=exact, write=False)
            _, got = self.step(users, items, types)  # same states; then writes the new ones
            for a, b in zip(got.tolist(), want.tolist()):
                shares.append(len(set(a) & set(b)) / len(b))
            pick = torch.randint(0, want.size(1), (want.size(0),), generator=gen).to(self.device)
            items = want[torch.arange(want.size(0), device=self.device), pick]
        return sum(shares) / len(shares)

    def score_only(self, batch: int) -> tuple[int, float]:
        """(rows, seconds) for the catalog scoring GEMM alone at `batch` rows, or as many as fit in
        1 GiB of scores (best of REPEATS, as the square GEMM it is compared with)."""
        rows = max(1, min(batch, 2**30 // (4 * self.n_items)))
        q = torch.randn(rows, self.model.config.query_dim, device=self.device)
        out = torch.empty(rows, self.n_items, device=self.device)
        best = float("inf")
        with torch.inference_mode():
            self.model.score(q, out=out)
            for _ in range(REPEATS):
                _sync(self.device)
                t = time.perf_counter()
                self.model.score(q, out=out)
                _sync(self.device)
                best = min(best, time.perf_counter() - t)
        return rows, best

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


def run_step_bench(device_name: str, artifact: Artifact, scorer_config: ScorerConfig, n_users: int, k: int,
                   batches: list[int], seconds: float, source: str) -> dict:
    """`artifact`: the model whose item embeddings are searched (`pipeline/bench/learned.py` by default)."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = artifact.model.to(device).eval()
    n_items = model.config.n_items
    scorer = build_scorer(model, scorer_config, device)  # threads: the caller's (the CLI: all cores)
    bench = StepBench(model, n_users, k, device, scorer)
    rates = bench.rates(batches, seconds)
    results = [{"batch": b, "events_per_s": round(rates[b], 1)} for b in batches]
    by_batch = {b: round(rates[b], 1) for b in batches}
    ref = 1024 if 1024 in by_batch else max(by_batch)
    exact_rate = None
    if isinstance(scorer, AnnScorer):  # the same step with exact scoring, in the same run
        bench.scorer = ExactScorer(scorer_config.score_memory_mb)
        exact_rate = round(bench.rates([ref], seconds)[ref], 1)
        bench.scorer = scorer
    gemm = gemm_flops(device)
    rows, score_s = bench.score_only(ref)
    score_flops = 2 * rows * model.config.query_dim * n_items / score_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    cfg = model.config
    return {
        "device": name,
        "scorer": scorer.name,
        "items": n_items,
        "model": source,
        "config": {"items": n_items, "embedding_dim": cfg.embedding_dim, "hidden_dim": cfg.hidden_dim,
                   "layers": cfg.num_layers, "members": cfg.members, "users_in_state": n_users, "k": k},
        "results": results,
        "speedup": round(by_batch[ref] / by_batch[min(by_batch)], 1),
        "overlap_at_k": round(bench.overlap(min(ref, 1024)), 4),
        "exact_events_per_s": exact_rate,  # ann only: exact scoring at the reference batch, measured after it
        "over_exact": round(by_batch[ref] / exact_rate, 1) if exact_rate else None,
        "index_build_seconds": round(getattr(scorer, "build_seconds", 0.0), 3),
        "index_bytes": int(getattr(scorer, "index_bytes", 0)),
        "ann": {"lists": scorer.lists, "probe": scorer.probe, "candidates": scorer.candidates}
        if isinstance(scorer, AnnScorer) else None,
        "gemm_flops": round(gemm),
        "scoring_flops_at_batch": round(score_flops),
        "gemm_efficiency": float(f"{score_flops / gemm:.4g}"),  # 4 significant digits: tiny runs stay > 0
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "score_memory_mb": getattr(scorer, "memory_bytes", 0) // 2**20 or None,  # on a GPU: the block used
        "gpu_tf32": bool(getattr(scorer, "tf32", False)),
    }
