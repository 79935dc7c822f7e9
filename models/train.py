"""Training: padded session mini-batches, cross-entropy over all items (or sampled
softmax with in-batch and popularity negatives and the log-Q correction),
early stopping on a time-based validation split evaluated through `step`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.nn import functional as F

from models.data import IndexedSession, Session, index_sessions
from models.errors import ConfigError, DataError
from models.evaluate import evaluate_model
from models.lstm import EnsembleRecommender, ModelConfig, RecurrentRecommender
from models.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 25  # upper bound; early stopping usually ends sooner
    batch_size: int = 64  # sessions per mini-batch
    lr: float = 3e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    max_len: int = 50  # longer sessions are split into windows of this length
    loss: str = "auto"  # "ce" (all items), "sampled", or "auto" (ce up to 50k items)
    n_negatives: int = 2048  # sampled negatives for the sampled loss
    uniform_negatives: float = 0.0  # share of them drawn uniformly over the catalogue, the rest by popularity
    valid_fraction: float = 0.1  # newest share of sessions held out for early stopping
    patience: int = 3  # epochs without validation gain before stopping
    metric: str = "mrr@20"  # validation metric for early stopping
    refit: bool = True  # after early stopping, retrain on all sessions for the best epoch count
    max_minutes: float = 9.0  # wall-clock cap on training
    seed: int = 42  # fixes data order and initial weights
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.loss not in ("auto", "ce", "sampled"):
            raise ConfigError(f"train: loss must be auto, ce or sampled, got {self.loss!r}")


@dataclass
class TrainResult:
    model: RecurrentRecommender
    vocab: Vocabulary
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    seconds: float = 0.0
    data_range: tuple[float, float] = (0.0, 0.0)
    n_train_sessions: int = 0

    def metadata(self, train_config: TrainConfig) -> dict:
        return {
            "train_config": asdict(train_config),
            "validation": self.best,
            "history": self.history,
            "training_seconds": round(self.seconds, 1),
            "data_start": self.data_range[0],
            "data_end": self.data_range[1],
            "train_sessions": self.n_train_sessions,
        }


def make_batches(sessions: Sequence[IndexedSession], batch_size: int, max_len: int,
                 rng: random.Random) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows of at most max_len+1 events, grouped by length into padded batches
    -> list of (items (B,T), types (B,T), targets (B,T) with -1 = no target)."""
    windows = []
    for s in sessions:
        for start in range(0, len(s.items) - 1, max_len):
            end = min(start + max_len + 1, len(s.items))
            windows.append((s.items[start:end], s.types[start:end]))
    windows.sort(key=lambda w: len(w[0]))
    batches = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        T = max(len(w[0]) for w in chunk) - 1
        items = np.zeros((len(chunk), T), dtype=np.int64)
        types = np.zeros((len(chunk), T), dtype=np.int64)
        targets = np.full((len(chunk), T), -1, dtype=np.int64)
        for r, (it, ty) in enumerate(chunk):
            n = len(it) - 1
            items[r, :n], types[r, :n], targets[r, :n] = it[:-1], ty[:-1], it[1:]
        batches.append((torch.from_numpy(items), torch.from_numpy(types), torch.from_numpy(targets)))
    rng.shuffle(batches)
    return batches


def sampled_softmax_loss(
    model: RecurrentRecommender, queries: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, n_neg: int
) -> torch.Tensor:
    """Candidates = the batch's targets plus `n_neg` popularity-sampled items; every
    candidate's logit is corrected by -log Q(item) (Q = sampling probability)."""
    valid = targets >= 0
    q_vec = queries[valid]  # (N, E)
    tgt = targets[valid]
    negatives = torch.multinomial(log_q.exp(), n_neg, replacement=True)
    cand, inverse = torch.unique(torch.cat([tgt, negatives]), return_inverse=True)
    out = model.item_emb if model.config.tie_weights else model.out_emb
    emb = F.embedding(cand, out.weight, sparse=out.sparse)  # (C, E); sparse gradients at large catalogues
    if model.config.score_scale:
        emb = F.normalize(emb, dim=-1)
    logits = q_vec @ emb.T + model.item_bias[cand] - log_q[cand]  # (N, C)
    return F.cross_entropy(logits, inverse[: tgt.numel()])


def make_optimizers(model: RecurrentRecommender, cfg: TrainConfig,
                    sparse: bool) -> tuple[list[torch.optim.Optimizer], list[torch.nn.Parameter]]:
    """Adam for everything; with `sparse` (the sampled loss) the item embeddings get sparse
    gradients and SparseAdam, which updates only the rows a batch touched: at 1,000,000 items a
    dense Adam step reads and writes ~1 GB of weights and moments per batch.
    -> (optimizers, the dense parameters, whose gradient norm is clipped)."""
    tables = [model.item_emb] if model.config.tie_weights else [model.item_emb, model.out_emb]
    if not sparse:
        params = list(model.parameters())
        return [torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)], params
    for table in tables:
        table.sparse = True
    sparse_ids = {id(t.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return [torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay),
            torch.optim.SparseAdam([t.weight for t in tables], lr=cfg.lr)], dense


def split_by_time(sessions: Sequence[Session], valid_fraction: float) -> tuple[list[Session], list[Session]]:
    """Sessions are in start-time order: the newest `valid_fraction` become validation."""
    n_valid = int(len(sessions) * valid_fraction)
    if n_valid == 0 or n_valid >= len(sessions):
        return list(sessions), []
    return list(sessions[:-n_valid]), list(sessions[-n_valid:])


def train(
    sessions: Sequence[Session],
    model_config: dict,
    cfg: TrainConfig,
    on_progress: Callable[[dict], None] | None = None,
    catalog: Sequence[str] = (),
) -> TrainResult:
    """Train a model on `sessions` (start-time order). `model_config` holds ModelConfig
    fields except n_items, which comes from the vocabulary: every item of the sessions, then
    those of `catalog` (a shop's whole catalogue) that no session holds."""
    if not sessions:
        raise DataError("train: no sessions to train on")
    members = int(model_config.get("members", 1))
    if members > 1:
        return _train_ensemble(sessions, model_config, cfg, members, on_progress, catalog)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    train_sessions, valid_sessions = split_by_time(sessions, cfg.valid_fraction)
    vocab = Vocabulary.from_sessions(sessions)  # every item known at training
    if catalog:
        vocab = Vocabulary(vocab.items + [item for item in catalog if vocab.get(item) < 0])
    train_idx = index_sessions(train_sessions, vocab)
    valid_idx = index_sessions(valid_sessions, vocab)
    if not train_idx:
        raise DataError("train: no training session has two or more events")
    device = torch.device(cfg.device)
    full_model_config = ModelConfig(n_items=len(vocab), **model_config)
    use_sampled = cfg.loss == "sampled" or (cfg.loss == "auto" and len(vocab) > 50_000)
    result = TrainResult(RecurrentRecommender(full_model_config), vocab, n_train_sessions=len(train_idx))
    result.data_range = (sessions[0].times[0], max(s.times[-1] for s in sessions))

    def fit(data: list[IndexedSession], valid: list[IndexedSession], epochs: int, phase: str) -> RecurrentRecommender:
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        model = RecurrentRecommender(full_model_config).to(device)
        optimizers, dense = make_optimizers(model, cfg, sparse=use_sampled)
        counts = np.bincount(np.concatenate([s.items for s in data]), minlength=len(vocab)).astype(np.float64)
        probs = (counts + 1.0) ** 0.75
        probs = (1 - cfg.uniform_negatives) * probs / probs.sum() + cfg.uniform_negatives / len(vocab)
        log_q = torch.tensor(np.log(probs / probs.sum()), dtype=torch.float32, device=device)
        best_score, best_state, stale = -math.inf, None, 0
        for epoch in range(1, epochs + 1):
            model.train()
            batches = make_batches(data, cfg.batch_size, cfg.max_len, rng)
            total, seen = 0.0, 0
            for n, (items, types, targets) in enumerate(batches, start=1):
                items, types, targets = items.to(device), types.to(device), targets.to(device)
                if use_sampled:
                    queries, _ = model(items, types)
                    loss = sampled_softmax_loss(model, queries, targets, log_q, cfg.n_negatives)
                else:
                    _, loss = model(items, types, targets)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(dense, 5.0)
                for opt in optimizers:
                    opt.step()
                total += loss.item() * items.size(0)
                seen += items.size(0)
                if on_progress:
                    on_progress({"phase": phase, "epoch": epoch, "batch": n, "batches": len(batches), "loss": total / seen})
            row = {"phase": phase, "epoch": epoch, "loss": round(total / max(seen, 1), 4)}
            if valid:
                row.update(evaluate_model(model, valid, k=20, device=device))
            result.history.append(row)
            if on_progress:
                on_progress({**row, "done": True})
            if not valid:
                continue
            score = float(row[cfg.metric])  # type: ignore[arg-type]
            if score > best_score:
                best_score, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
                result.best = row
            else:
                stale += 1
            out_of_time = time.monotonic() - started > cfg.max_minutes * 60 / (2 if cfg.refit else 1)
            if stale >= cfg.patience or out_of_time:
                if out_of_time:
                    log.warning("train: stopping after epoch %d: time budget reached", epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.item_emb.sparse = False  # sparse gradients were for training
        if not full_model_config.tie_weights:
            model.out_emb.sparse = False
        return model

    model = fit(train_idx, valid_idx, cfg.epochs, "select")
    if cfg.refit and valid_idx and result.best:
        model = fit(index_sessions(sessions, vocab), [], result.best["epoch"], "refit")
    result.model = model
    model.eval()
    result.seconds = time.monotonic() - started
    return result


def _train_ensemble(sessions: Sequence[Session], model_config: dict, cfg: TrainConfig, members: int,
                    on_progress: Callable[[dict], None] | None, catalog: Sequence[str]) -> TrainResult:
    """`members` single models, each trained as `train` trains one (early stopping, refit) but with
    its own seed (`cfg.seed` + n: its own initial weights and data order), the time budget shared
    out; -> their ensemble (`models/lstm.py` EnsembleRecommender). `best` holds the members' mean
    validation metrics (each member alone) and their epochs."""
    started = time.monotonic()
    single = {**model_config, "members": 1}
    results: list[TrainResult] = []
    for n in range(members):
        left = cfg.max_minutes - (time.monotonic() - started) / 60
        budget = replace(cfg, seed=cfg.seed + n, max_minutes=max(left / (members - n), 0.05))
        log.info("train: member %d of %d (seed %d)", n + 1, members, budget.seed)

        def tagged(p: dict, n: int = n) -> None:
            assert on_progress is not None
            on_progress({**p, "member": n + 1, "members": members})

        results.append(train(sessions, single, budget, tagged if on_progress else None, catalog))
    first = results[0]
    result = TrainResult(EnsembleRecommender.of([r.model for r in results]), first.vocab,
                         n_train_sessions=first.n_train_sessions, data_range=first.data_range)
    result.model.eval()
    result.history = [{**row, "member": n + 1} for n, r in enumerate(results) for row in r.history]
    bests = [r.best for r in results if r.best]
    if bests:
        result.best = {"members": members, "epochs": [b.get("epoch") for b in bests],
                       **{k: float(np.mean([b[k] for b in bests])) for k in ("recall@20", "mrr@20", "ndcg@20")
                          if all(k in b for b in bests)}}
    result.seconds = time.monotonic() - started
    return result
