"""Scorers: the k best items for a batch of query vectors, exactly or approximately.

    exact  every item scored (one GEMM per block of queries) and an exact top-k; blocks are sized
           for the CPU's cache, or on a GPU to a memory budget, so that a batch of 4,096 against
           1,000,000 items never allocates a 16 GB score matrix
    bf16   exact's results, with the product in bfloat16 (AVX-512 BF16) fused with the top-k, the
           kept items scored again in float32 and a proof that no item left out belongs in the k
           best (`models/bf16.py`); `auto` picks it over exact on a CPU that has AVX-512 BF16 and
           a C compiler
    ann    approximate maximum-inner-product search (faiss IVF, the items lifted onto a sphere) over
           the model's item embeddings and biases, then exact re-scoring of the candidates with the
           model's own weights

Both keep one contract (`tests/unit/test_scorers.py`): K distinct items per query, best first;
the items in a query's `exclude` list never returned; fewer than K only when fewer than K items
are left after exclusion (the rest score -inf). An ANN query that finds too few usable candidates
is answered exactly.

`build_scorer` makes the configured one for a loaded model; it can take seconds for the index at
1,000,000 items, so callers build it where the model is loaded, off the event loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ConfigError
from models.topk import top_k

if TYPE_CHECKING:
    from models.lstm import RecurrentRecommender

log = logging.getLogger(__name__)
Exclude = Sequence[Sequence[int]]  # per query row: item indices that must not be recommended
SCORERS = ("auto", "exact", "bf16", "ann")
# the fewest IVF lists searched by default: on yoochoose-100k (2,873 items, 73 lists) the scaled-cosine
# model lost 0.0125 Recall@20 against exact at 24 lists, 0.0029 at 48 (docs/performance.md)
ANN_MIN_PROBE = 48
# Queries scored per block on a CPU, per torch thread. A block's scores are written by the product
# and read back by the top-k; small blocks keep them in cache, large ones read the item matrix
# fewer times. With caches cold (as in the worker, between batches), one thread, microseconds a
# query for product and top-k: 20,000 items 34.6 at 64 rows, 40.3 at 256; 100,000 165 and 209;
# 1,000,000 items 2,337 and 2,131 (docs/performance.md).
CPU_BLOCK_ROWS = 64
CPU_BLOCK_ROWS_LARGE = 256  # from CPU_LARGE_CATALOGUE items, whatever the threads
CPU_LARGE_CATALOGUE = 500_000
# k-means points per IVF list (at most all items): at 1,000,000 items and probe 64, 64 a list gave
# overlap 0.941 with exact, 128 0.955 and 250 (every item) 0.971, in 11, 19 and 32 s of building
TRAIN_POINTS_PER_LIST = 256


def probe_for(lists: int, config: ScorerConfig) -> int:
    """IVF lists searched per query: the configured number, else lists / 64 but at least
    ANN_MIN_PROBE; never more than there are. At 1,000,000 items: 62 of 4,000 lists
    (docs/performance.md)."""
    return min(lists, config.ann_probe or max(ANN_MIN_PROBE, lists // 64))


class Scorer(Protocol):
    name: str

    def __call__(self, model: RecurrentRecommender, queries: torch.Tensor, k: int,
                 exclude: Exclude | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, E) -> (values (B, k), item indices (B, k)), best first."""
        ...


@dataclass
class ScorerConfig:
    kind: str = "auto"  # auto, exact, bf16 or ann
    ann_min_items: int = 200_000  # auto picks ann on a CPU from this many items (docs/performance.md)
    ann_lists: int = 0  # IVF lists; 0 = 4 * sqrt(items), at least 1
    ann_probe: int = 0  # lists searched per query; 0 = lists / 64, at least ANN_MIN_PROBE
    ann_candidates: int = 40  # candidates re-scored exactly per query (at least k + excluded)
    score_memory_mb: int = 0  # exact scoring on a GPU: memory for one block of scores; 0 = auto_block_bytes
    gpu_tf32: bool = False  # exact scoring on a GPU: candidates by a TF32 product, re-scored in float32
    threads: int = 0  # faiss threads; 0 = its default (all cores)
    native_dir: str = ""  # where the bf16 kernel is compiled; empty = no bf16

    def __post_init__(self) -> None:
        if self.kind not in SCORERS:
            raise ConfigError(f"config: scorer must be one of {', '.join(SCORERS)}, got {self.kind!r}")
        if self.score_memory_mb < 0 or self.ann_candidates < 1 or self.ann_lists < 0 or self.ann_probe < 0:
            raise ConfigError("config: ann_candidates must be >= 1, score_memory_mb, ann_lists and ann_probe >= 0")


def auto_block_bytes(device_memory: int) -> int:
    """The default block of scores on a GPU: 1/16 of its memory, at most 4 GiB (an H200: 4 GiB,
    a 16 GB card: 1 GiB). On an H200 at 1,000,000 items, 1 GiB blocks ran at 98,002 events/s and
    4 GiB at 110,932 (docs/performance.md): fewer, larger blocks launch fewer kernels."""
    return max(2**20, min(4 * 2**30, device_memory // 16))


def block_rows(device: torch.device, n_items: int, batch: int, memory_bytes: int) -> int:
    """Queries scored per block: CPU_BLOCK_ROWS per thread on a CPU (CPU_BLOCK_ROWS_LARGE for large
    catalogues); on a GPU as many as fit in `memory_bytes` of float32 scores (at least 1, at most
    the batch)."""
    if device.type == "cpu":
        return CPU_BLOCK_ROWS_LARGE if n_items >= CPU_LARGE_CATALOGUE else CPU_BLOCK_ROWS * torch.get_num_threads()
    return max(1, min(batch, memory_bytes // (4 * n_items)))


def exclusion_index(exclude: Exclude, first: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows first..first+n of `exclude` -> (row indices, item indices) relative to the block."""
    rows: list[int] = []
    cols: list[int] = []
    for r in range(n):
        items = exclude[first + r]
        rows.extend([r] * len(items))
        cols.extend(items)
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))


@contextmanager
def tf32_products(on: bool) -> Iterator[None]:
    """With `on`, matrix products on a GPU run in TF32 inside the block; the setting is restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on or previous
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def rescore(model: RecurrentRecommender, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Float32 scores of candidate `items` (B, C) for `queries` (B, E) -> (B, C)."""
    weight = model.output_embedding()
    return torch.bmm(weight[items].float(), queries.float().unsqueeze(2)).squeeze(2) + model.item_bias[items]


class ExactScorer:
    """Every item scored; the block of scores is a reused buffer (no fresh B x V matrix per step).

    `tf32`: the block's product runs in TF32 on a GPU's tensor cores (about 1e-3 relative error)
    and only picks the best 4k candidates, which are then re-scored in float32 and ranked: the
    same top k unless an item outside the TF32 top 4k is within that error of the k-th best."""

    name = "exact"

    def __init__(self, score_memory_mb: int = 0, rows: int | None = None, tf32: bool = False) -> None:
        self.memory_bytes = score_memory_mb * 2**20  # 0: auto_block_bytes of the device in use
        self.tf32 = tf32
        self.rows = rows  # forced block size (tests); None = block_rows()
        self.largest_block = 0  # rows of the largest block scored so far
        self._buffer: torch.Tensor | None = None

    def _scratch(self, rows: int, n_items: int, device: torch.device) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.size(0) < rows or buf.size(1) != n_items or buf.device != device:
            buf = self._buffer = torch.empty(rows, n_items, device=device)
        return buf

    def __call__(self, model: RecurrentRecommender, queries: torch.Tensor, k: int,
                 exclude: Exclude | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, V = queries.size(0), model.config.n_items
        if not self.memory_bytes and queries.device.type == "cuda":
            self.memory_bytes = auto_block_bytes(torch.cuda.get_device_properties(queries.device).total_memory)
        rows = self.rows or block_rows(queries.device, V, B, self.memory_bytes or 2**30)
        rows = min(rows, max(B, 1))
        buffer = self._scratch(rows, V, queries.device)
        values = torch.empty(B, k, device=queries.device)
        indices = torch.empty(B, k, dtype=torch.long, device=queries.device)
        for start in range(0, B, rows):
            block = queries[start : start + rows]
            n = block.size(0)
            self.largest_block = max(self.largest_block, n)
            with tf32_products(self.tf32):  # the GEMM only: candidates are re-scored in float32
                scores = model.score(block, out=buffer[:n])
            if exclude is not None:
                r, c = exclusion_index(exclude, start, n, scores.device)
                scores[r, c] = float("-inf")
            if self.tf32 and 4 * k < V:
                _, cand = top_k(scores, 4 * k)
                rescored = rescore(model, block, cand).masked_fill(~torch.isfinite(scores.gather(1, cand)),
                                                                   float("-inf"))
                best, pos = torch.topk(rescored, k, dim=1)
                values[start : start + n], indices[start : start + n] = best, cand.gather(1, pos)
            else:
                values[start : start + n], indices[start : start + n] = top_k(scores, k)
        return values, indices


class AnnScorer:
    """faiss IVF search for the items of highest score q.e + b: each item becomes a point
    x = [e, b, sqrt(M^2 - |[e, b]|^2)] on a sphere of radius M (the largest norm) and a query
    y = [q, 1, 0], so that |y - x|^2 = |y|^2 + M^2 - 2 (q.e + b): the nearest points in L2 are the
    best-scored items, and k-means lists suit points on a sphere far better than raw inner
    products (overlap 0.98 against 0.69 at the same probe on a learned 200,000-item model,
    docs/performance.md). The candidates are then re-scored with the model's own weights.

    Three things make a search cheaper at the same overlap (docs/performance.md, 1,000,000 items):
    - The query is scaled to QUERY_RADIUS x M. Any positive scale keeps the order of the items
      (all are on the sphere) but not that of the lists' centroids, which lie inside it: a query
      far outside ranks lists nearly by inner product. Overlap 0.927 -> 0.947 at probe 64.
    - The points are stored as float16, padded to a multiple of 8 wide for faiss's SIMD scan:
      the scan reads half the bytes of float32 (padded to 80, probe 64: 15,661 -> 19,993 events/s).
    - The lists to search are chosen by one product and a chunked top-k in torch, instead of
      faiss's per-query selection (1,024 queries over 4,000 lists: 19.6 ms in faiss; the product
      4 ms and the top-k 8, where `torch.topk` took 13)."""

    name = "ann"
    FORMAT = 2  # of a stored index; older ones are rebuilt
    QUERY_RADIUS = 0.6  # the query's norm over the sphere's: 0.9523 overlap at probe 76, 0.9500 at 0.8, 0.9473 at 1.0

    def __init__(self, model: RecurrentRecommender, config: ScorerConfig, stored: Path | None = None,
                 weights_sha256: str = "") -> None:
        """`stored`: an index file written by `save` for these weights (`weights_sha256`): read
        instead of built when it matches (a second, not ~34 s at 1,000,000 items)."""
        try:
            import faiss  # a compute library, imported only when ann is chosen
        except ImportError:
            raise ConfigError("scorer ann needs the faiss-cpu package (pip install faiss-cpu)") from None
        started = time.perf_counter()
        if config.threads:
            faiss.omp_set_num_threads(config.threads)
        self.candidates = config.ann_candidates
        self.exact = ExactScorer(config.score_memory_mb, tf32=config.gpu_tf32)
        self.n_items = model.config.n_items
        self.loaded = False
        with torch.no_grad():
            weight = model.output_embedding().detach().float()
            bias = model.item_bias.detach().float()
        points = torch.cat([weight, bias.unsqueeze(1)], dim=1).cpu()
        norms = points.norm(dim=1)
        self.radius = float(norms.max())
        self.width = -(-(points.size(1) + 1) // 8) * 8  # [e, b, lift] padded to a multiple of 8
        if stored is not None and self._read(faiss, stored, weights_sha256, config):
            self.build_seconds = time.perf_counter() - started
            return
        lift = (self.radius**2 - norms**2).clamp(min=0).sqrt().unsqueeze(1)
        lifted = F.pad(torch.cat([points, lift], dim=1), (0, self.width - points.size(1) - 1))
        vectors = np.ascontiguousarray(lifted.numpy(), dtype=np.float32)
        V, d = vectors.shape
        lists = config.ann_lists or max(1, min(int(4 * math.sqrt(V)), V // 39 or 1))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, lists, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_L2, False)  # the points, not residuals: 4% faster
        rng = np.random.default_rng(0)
        index.train(vectors[rng.choice(V, size=min(V, TRAIN_POINTS_PER_LIST * lists), replace=False)])
        index.add(vectors)
        self._use(index, lists, config)
        self.build_seconds = time.perf_counter() - started
        self.index_bytes = int(V * (d * 2 + 8) + lists * d * 4)  # float16 points, ids, centroids

    def _use(self, index, lists: int, config: ScorerConfig) -> None:  # noqa: ANN001 - a faiss index
        self.index, self.lists = index, lists
        self.probe = probe_for(lists, config)
        index.nprobe = self.probe
        index.parallel_mode = 3  # search_preassigned splits its queries among the threads itself
        centroids = torch.from_numpy(index.quantizer.reconstruct_n(0, lists))
        # |y - c|^2 - |y|^2 = [y, 1] . [-2c, |c|^2]: the lists' order for a query in one product
        self._centroids = torch.cat([-2 * centroids, (centroids**2).sum(1, keepdim=True)], dim=1)

    def save(self, path: Path, weights_sha256: str) -> None:
        """Write the index beside a model artifact (`path`, plus `path`.json naming the weights it
        was built from), so that a worker loading that model reads it instead of building it."""
        import faiss

        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(path)
        path.with_name(path.name + ".json").write_text(json.dumps(
            {"weights_sha256": weights_sha256, "lists": self.lists, "items": self.n_items, "format": self.FORMAT}))

    def _read(self, faiss, path: Path, weights_sha256: str, config: ScorerConfig) -> bool:  # noqa: ANN001
        """Use a stored index when it was built from these weights (and with these lists)."""
        try:
            meta = json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            return False
        if (meta.get("weights_sha256") != weights_sha256 or not weights_sha256 or meta.get("items") != self.n_items
                or meta.get("format") != self.FORMAT or (config.ann_lists and meta.get("lists") != config.ann_lists)):
            return False
        self._use(faiss.read_index(str(path)), int(meta["lists"]), config)
        self.index_bytes = path.stat().st_size
        self.loaded = True
        return True

    def search(self, queries: torch.Tensor, n: int) -> np.ndarray:
        """queries (B, E) -> the ids of the `n` best candidates of each, (B, n); -1 = none."""
        B = queries.size(0)
        y = torch.cat([queries.detach().float().cpu(), torch.ones(B, 1)], dim=1)
        y = F.pad(y, (0, self.width - y.size(1)))
        y = y * (self.QUERY_RADIUS * self.radius / y.norm(dim=1, keepdim=True))
        order = torch.mm(torch.cat([y, torch.ones(B, 1)], dim=1), self._centroids.T)  # (B, lists)
        probe = min(self.probe, self.lists)
        best, lists = top_k(-order, probe, chunk=8)
        dists = (y * y).sum(1, keepdim=True) - best  # the L2 distances to those centroids
        _, found = self.index.search_preassigned(np.ascontiguousarray(y.numpy()), n, lists.numpy(),
                                                 np.ascontiguousarray(dists.numpy()))
        return found

    def __call__(self, model: RecurrentRecommender, queries: torch.Tensor, k: int,
                 exclude: Exclude | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, device = queries.size(0), queries.device
        longest = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        n_cand = min(self.n_items, max(self.candidates, k + longest))
        cand = torch.from_numpy(self.search(queries, n_cand)).to(device)  # (B, C); -1 = no candidate
        usable = cand >= 0
        safe = cand.clamp(min=0)
        scores = rescore(model, queries, safe)
        if exclude is not None and longest:
            banned = torch.full((B, longest), -1, dtype=torch.long, device=device)
            for r, items in enumerate(exclude):
                if items:
                    banned[r, : len(items)] = torch.tensor(list(items), dtype=torch.long, device=device)
            usable &= ~(cand.unsqueeze(2) == banned.unsqueeze(1)).any(dim=2)
        scores = scores.masked_fill(~usable, float("-inf"))
        values, pos = torch.topk(scores, min(k, n_cand), dim=1)
        indices = safe.gather(1, pos)
        if values.size(1) < k:  # a catalogue smaller than k: pad as exact scoring would
            pad = k - values.size(1)
            values = torch.cat([values, torch.full((B, pad), float("-inf"), device=device)], dim=1)
            indices = torch.cat([indices, torch.zeros(B, pad, dtype=torch.long, device=device)], dim=1)
        allowed = self.n_items - torch.tensor([len(set(e)) for e in exclude] if exclude is not None else [0] * B,
                                              device=device)
        short = (torch.isfinite(values).sum(dim=1) < torch.clamp(allowed, max=k)).nonzero().flatten()
        if short.numel():  # too few usable candidates: these queries are answered exactly
            rows = short.tolist()
            sub = [exclude[r] for r in rows] if exclude is not None else None
            values[short], indices[short] = self.exact(model, queries[short], k, sub)
        return values, indices


def choose(config: ScorerConfig, device: torch.device, n_items: int) -> str:
    """'auto' -> ann on a CPU from `ann_min_items` items, else bf16 on a CPU where it can be built
    (`bf16_or_why`), exact otherwise."""
    if config.kind != "auto":
        return config.kind
    if device.type != "cpu":
        return "exact"
    if n_items >= config.ann_min_items:
        return "ann"
    return "bf16" if not isinstance(bf16_or_why(config), str) else "exact"


def bf16_or_why(config: ScorerConfig):  # noqa: ANN201 - the loaded kernel (ctypes.CDLL) or why not (str)
    from models import bf16

    return bf16.load(Path(config.native_dir).expanduser()) if config.native_dir else "no folder for the kernel"


INDEX_FILE = "ann-index.faiss"  # beside a model artifact's files: its ann index, optional


def build_scorer(model: RecurrentRecommender, config: ScorerConfig, device: torch.device | str,
                 artifact_dir: Path | None = None, weights_sha256: str = "") -> Scorer:
    """The configured scorer for `model` (which must be on `device`); ann reads the index stored
    with the artifact (`artifact_dir`/INDEX_FILE) when it fits these weights, else builds it here."""
    kind = choose(config, torch.device(device), model.config.n_items)
    if kind == "ann":
        return AnnScorer(model, config, artifact_dir / INDEX_FILE if artifact_dir else None, weights_sha256)
    exact = ExactScorer(config.score_memory_mb, tf32=config.gpu_tf32 and torch.device(device).type == "cuda")
    if kind == "bf16":
        from models.bf16 import Bf16Scorer

        lib = bf16_or_why(config)
        if isinstance(lib, str):
            raise ConfigError(f"config: scorer bf16 is not available here: {lib}")
        return Bf16Scorer(lib, exact, model)
    if config.kind == "auto" and torch.device(device).type == "cpu":
        log.info("scorer: exact, not bf16: %s", bf16_or_why(config))
    return exact
