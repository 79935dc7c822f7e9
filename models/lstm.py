"""The sequence recommender: config, module and the one batched `step`.

`step` is the only way a batch of users advances by one event and is scored: the streaming
worker (top-k with masks and a scratch buffer), the offline evaluator (every item's score), the
re-warm after a model swap (no scoring) and the benchmark all call it.
`RecurrentRecommender.forward` is the full-sequence form used in training and is tested to
agree with repeated `step` calls.

Per-user recurrent state is one flat float vector per user (a row of a
``(B, S)`` tensor), laid out as::

    [h_1 .. h_L | c_1 .. c_L (LSTM only) | last W top-layer outputs | count]

where the last two parts exist only when ``attention_window > 0``. A row of
zeros is the state of a user who has seen nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import ModelError
from models.events import EVENT_TYPES
from models.scorers import ExactScorer, Exclude, Scorer


@dataclass
class ModelConfig:
    n_items: int  # size of the item vocabulary (rows of the item embedding)
    n_event_types: int = len(EVENT_TYPES)  # click, purchase
    embedding_dim: int = 64  # item embedding width E
    hidden_dim: int = 128  # recurrent width H
    num_layers: int = 1  # stacked recurrent layers L
    cell: str = "lstm"  # "lstm" or "gru"
    attention_window: int = 0  # W: attend over the last W outputs; 0 = off
    dropout: float = 0.25  # on embeddings and recurrent outputs, training only
    tie_weights: bool = True  # score items with the input item embedding
    input_skip: bool = True  # add the current item's embedding to the query vector
    score_scale: float = 0.0  # > 0: query and item vectors L2-normalised, score = scale * cosine + bias (NISER)
    members: int = 1  # > 1: an ensemble of this many such models, trained apart, their scores summed

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ModelError(f"config: cell must be 'lstm' or 'gru', got {self.cell!r}")
        if self.n_items < 1 or self.hidden_dim < 1 or self.num_layers < 1:
            raise ModelError("config: n_items, hidden_dim and num_layers must be positive")
        if self.attention_window < 0:
            raise ModelError("config: attention_window must be >= 0")
        if self.score_scale < 0:
            raise ModelError("config: score_scale must be >= 0 (0 = raw inner products)")
        if self.members < 1:
            raise ModelError("config: members must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def state_size(self) -> int:
        """Length S of one user's flat state vector."""
        per_layer = 2 if self.cell == "lstm" else 1
        size = per_layer * self.num_layers * self.hidden_dim
        if self.attention_window:
            size += self.attention_window * self.hidden_dim + 1
        return size * self.members

    @property
    def query_dim(self) -> int:
        """Width of a query vector (and of an item's output vector): E, or E per member."""
        return self.embedding_dim * self.members


def build_model(config: ModelConfig) -> RecurrentRecommender:
    """The module for `config`: one recurrent model, or an ensemble of `config.members`."""
    return EnsembleRecommender(config) if config.members > 1 else RecurrentRecommender(config)


class RecurrentRecommender(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.n_items, c.embedding_dim)
        self.type_emb = nn.Embedding(c.n_event_types, c.embedding_dim)
        rnn_cls = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            c.embedding_dim,
            c.hidden_dim,
            num_layers=c.num_layers,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(c.dropout)
        if c.attention_window:
            self.att_q = nn.Linear(c.hidden_dim, c.hidden_dim, bias=False)
            self.att_k = nn.Linear(c.hidden_dim, c.hidden_dim, bias=False)
            self.att_out = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.proj = nn.Linear(c.hidden_dim, c.embedding_dim)
        if not c.tie_weights:
            self.out_emb = nn.Embedding(c.n_items, c.embedding_dim)
        self.item_bias = nn.Parameter(torch.zeros(c.n_items))
        self._unit_rows: tuple[int, int, torch.Tensor] | None = None  # score_scale: (weight data_ptr, version, unit rows)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.type_emb.weight, std=0.05)

    # -- pieces shared by forward and step -------------------------------
    def embed(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.drop(self.item_emb(items) + self.type_emb(types))  # (..., E)

    def output_embedding(self) -> torch.Tensor:
        """The item vectors scored against: (V, E); unit rows with score_scale (computed once per
        weight version outside training: at 1,000,000 items a step must not renormalise them)."""
        weight = (self.item_emb if self.config.tie_weights else self.out_emb).weight
        if not self.config.score_scale:
            return weight
        if self.training or torch.is_grad_enabled():
            return F.normalize(weight, dim=-1)
        cached = self._unit_rows
        if cached is None or cached[0] != weight.data_ptr() or cached[1] != weight._version:
            with torch.no_grad():
                cached = self._unit_rows = (weight.data_ptr(), weight._version, F.normalize(weight, dim=-1))
        return cached[2]

    def scoring_matrix(self) -> torch.Tensor:
        """[item vectors | biases] (V, E + 1), for inference: a query with a 1 appended scores
        q.e + b in one product. `addmm` first fills its output with the biases and then adds the
        product to it, two passes over a B x V block that does not fit in cache; at 20,000 items
        and batch 1,024 on a 2-core Xeon the one product ran at 325 GFLOP/s against addmm's 213
        (docs/performance.md). Built once per weight version, kept with the tensors it came from."""
        weight, bias = self.output_embedding(), self.item_bias
        versions = tuple(0 if t.is_inference() else t._version for t in (weight, bias))  # inference tensors keep none
        cached = self.__dict__.get("_scoring")
        if cached is None or cached[0] is not weight or cached[1] is not bias or cached[2] != versions:
            with torch.no_grad():
                matrix = torch.cat([weight, bias.unsqueeze(1)], dim=1)
            cached = self.__dict__["_scoring"] = (weight, bias, versions, matrix)
        return cached[3]

    def query(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Recurrent outputs (..., H) and input embeddings (..., E) -> query vectors (..., E)."""
        q = self.proj(self.drop(out))
        q = q + x if self.config.input_skip else q
        return F.normalize(q, dim=-1) * self.config.score_scale if self.config.score_scale else q

    def score(self, queries: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores for every item: queries (..., E) -> (..., V).

        For a (B, E) batch, `out` may be a reusable contiguous (B, V) buffer: writing into it
        saves allocating (and page-faulting) a fresh B x V matrix on every step. On a CPU outside
        training the bias rides in the product (`scoring_matrix`)."""
        if queries.dim() == 2 and queries.device.type == "cpu" and not (self.training or torch.is_grad_enabled()):
            ones = torch.ones(queries.size(0), 1, dtype=queries.dtype)
            lifted = torch.cat([queries, ones], dim=1)
            matrix = self.scoring_matrix()
            return torch.mm(lifted, matrix.T, out=out) if out is not None else torch.mm(lifted, matrix.T)
        weight = self.output_embedding()
        if queries.dim() == 2:
            if out is not None:
                return torch.addmm(self.item_bias, queries, weight.T, out=out)
            return torch.addmm(self.item_bias, queries, weight.T)
        return queries @ weight.T + self.item_bias

    def _attend(self, q_src: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q_src (N, H), keys (N, W, H), mask (N, W) True = usable -> (N, H)."""
        q = self.att_q(q_src).unsqueeze(1)  # (N, 1, H)
        k = self.att_k(keys)  # (N, W, H)
        logits = (q * k).sum(-1) / math.sqrt(self.config.hidden_dim)  # (N, W)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).unsqueeze(-1)  # (N, W, 1)
        return q_src + self.att_out((weights * keys).sum(1))

    def advance(self, state: torch.Tensor, items: torch.Tensor,
                event_types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent step without scoring: -> (new_state (B, S), queries (B, E))."""
        cfg = self.config
        h, c, ring, count = _unpack(cfg, state)
        x = self.embed(items, event_types)  # (B, E)
        if cfg.cell == "lstm":
            out, (h, c) = self.rnn(x.unsqueeze(0), (h, c))
        else:
            out, h = self.rnn(x.unsqueeze(0), h)
        out = out[0]  # (B, H)
        if cfg.attention_window:
            W = cfg.attention_window
            ring = torch.cat([ring[:, 1:], out.unsqueeze(1)], dim=1)  # (B, W, H)
            count = torch.clamp(count + 1, max=W)
            mask = torch.arange(W, device=state.device).unsqueeze(0) >= (W - count).unsqueeze(1)
            out = self._attend(out, ring, mask)
        return _pack(h, c, ring, count), self.query(out, x)

    # -- full sequences (training) ----------------------------------------
    def forward(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """items, types (B, T) from a fresh state -> (queries (B, T, E), loss).

        With ``targets`` (B, T; -1 = ignore) the loss is full-softmax cross-entropy.
        Positions after a sequence's end may hold any item; they do not affect
        earlier positions.
        """
        x = self.embed(items, types)  # (B, T, E)
        out, _ = self.rnn(x.transpose(0, 1))  # (T, B, H)
        out = out.transpose(0, 1)  # (B, T, H)
        if self.config.attention_window:
            out = self._attend_sequence(out)
        queries = self.query(out, x)  # (B, T, E)
        loss = None
        if targets is not None:
            logits = self.score(queries)  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return queries, loss

    def _attend_sequence(self, out: torch.Tensor) -> torch.Tensor:
        W = self.config.attention_window
        B, T, H = out.shape
        padded = F.pad(out, (0, 0, W - 1, 0))  # (B, T+W-1, H)
        keys = padded.unfold(1, W, 1).permute(0, 1, 3, 2)  # (B, T, W, H)
        pos = torch.arange(T, device=out.device).unsqueeze(1) + torch.arange(W, device=out.device) - (W - 1)
        mask = (pos >= 0).unsqueeze(0).expand(B, T, W)  # (B, T, W)
        res = self._attend(out.reshape(B * T, H), keys.reshape(B * T, W, H), mask.reshape(B * T, W))
        return res.reshape(B, T, H)


def init_state(config: ModelConfig, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fresh (all-zero) states for `batch` users: (B, S)."""
    return torch.zeros(batch, config.state_size, device=device)


def _unpack(config: ModelConfig, state: torch.Tensor):
    L, H, W = config.num_layers, config.hidden_dim, config.attention_window
    B = state.size(0)
    off = L * H
    h = state[:, :off].reshape(B, L, H).transpose(0, 1).contiguous()  # (L, B, H)
    c = None
    if config.cell == "lstm":
        c = state[:, off : 2 * off].reshape(B, L, H).transpose(0, 1).contiguous()
        off *= 2
    ring = count = None
    if W:
        ring = state[:, off : off + W * H].reshape(B, W, H)  # oldest first
        count = state[:, off + W * H]  # (B,)
    return h, c, ring, count


def _pack(h: torch.Tensor, c: torch.Tensor | None, ring: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
    B = h.size(1)
    parts = [h.transpose(0, 1).reshape(B, -1)]
    if c is not None:
        parts.append(c.transpose(0, 1).reshape(B, -1))
    if ring is not None and count is not None:  # both or neither (attention_window > 0)
        parts += [ring.reshape(B, -1), count.unsqueeze(1)]
    return torch.cat(parts, dim=1)


class EnsembleRecommender(RecurrentRecommender):
    """`config.members` recurrent models of one configuration, trained apart (different seeds and
    data order, `models/train.py`), whose scores are summed. Each member's score is an inner product
    (plus a bias), so the sum is one inner product of the members' queries, concatenated, with their
    item vectors, concatenated, plus the summed biases: the scorers, the approximate index and the
    evaluator treat the ensemble as one model with query width E * members. A user's state is the
    members' states side by side. On yoochoose-100k three members lift Recall@20 from 0.641 to 0.653
    (docs/performance.md)."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        single = ModelConfig(**{**config.to_dict(), "members": 1})
        self.members = nn.ModuleList([RecurrentRecommender(single) for _ in range(config.members)])
        self._joined: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, models: list[RecurrentRecommender]) -> EnsembleRecommender:
        """An ensemble of trained single models of one configuration (their weights are shared, not copied)."""
        first = models[0].config
        if any(m.config != first or isinstance(m, EnsembleRecommender) for m in models):
            raise ModelError("ensemble: members must be single models of one configuration")
        with torch.device("meta"):
            ensemble = cls(ModelConfig(**{**first.to_dict(), "members": len(models)}))
        ensemble.members = nn.ModuleList(models)
        return ensemble

    @property
    def parts(self) -> list[RecurrentRecommender]:
        """The members, typed."""
        return cast(list[RecurrentRecommender], list(self.members))

    def _join(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(item vectors (V, E * members), summed biases (V,)); outside training computed once per
        weight version, like a single model's unit rows."""
        def joined() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.cat([m.output_embedding() for m in self.parts], dim=1),
                    torch.stack([m.item_bias for m in self.parts]).sum(0))

        if self.training or torch.is_grad_enabled():
            return joined()
        key = tuple((p.data_ptr(), p._version) for m in self.parts for p in (m.item_emb.weight, m.item_bias))
        if self._joined is None or self._joined[0] != key:
            with torch.no_grad():
                self._joined = (key, *joined())
        return self._joined[1], self._joined[2]

    def output_embedding(self) -> torch.Tensor:
        return self._join()[0]

    @property
    def item_bias(self) -> torch.Tensor:  # type: ignore[override]
        return self._join()[1]

    def advance(self, state: torch.Tensor, items: torch.Tensor,
                event_types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's `advance` on its slice of the state -> (states, queries) side by side."""
        size = self.config.state_size // self.config.members
        parts = [m.advance(state[:, n * size : (n + 1) * size], items, event_types)
                 for n, m in enumerate(self.parts)]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def forward(self, items: torch.Tensor, types: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' queries side by side, and the loss of the summed scores."""
        queries = torch.cat([m(items, types)[0] for m in self.parts], dim=-1)
        loss = None
        if targets is not None:
            logits = self.score(queries)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return queries, loss


@dataclass
class StepResult:
    state: torch.Tensor  # (B, S) the users' new states
    scores: torch.Tensor | None = None  # (B, V) every item's score (k=None)
    top_scores: torch.Tensor | None = None  # (B, k) best first (k given); masked items score -inf
    top_items: torch.Tensor | None = None  # (B, k) item indices


def step(
    model: RecurrentRecommender,
    state: torch.Tensor,
    items: torch.Tensor,
    event_types: torch.Tensor,
    *,
    k: int | None = None,
    score: bool = True,
    exclude: Exclude | None = None,
    scorer: Scorer | None = None,
) -> StepResult:
    """The batched online step: state (B, S), items (B,), event_types (B,) -> the new states and
    the scores. Rows of zeros in `state` are new users.

    k=None: every item's score (B, V) in `scores` (the evaluator). k given: the k best items per
    user in `top_scores` / `top_items` (the worker, the benchmark), by `scorer` (default a new
    `ExactScorer`; see `models/scorers.py`), never one of the row's `exclude` items.
    score=False: the new states only (re-warming users after a swap).
    Results are inference tensors: clone them before editing in place."""
    with torch.inference_mode():
        new_state, queries = model.advance(state, items, event_types)
        if not score:
            return StepResult(new_state)
        if k is None:
            return StepResult(new_state, scores=model.score(queries))
        values, indices = (scorer or ExactScorer())(model, queries, k, exclude)
        return StepResult(new_state, top_scores=values, top_items=indices)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)
