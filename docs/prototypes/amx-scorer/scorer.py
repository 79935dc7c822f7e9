"""PROTOTYPE, not used by recur: the AMX scorer of fused.c behind recur's scorer interface.

Build fused.so beside this file first (see fused.c). `AmxScorer()(model, queries, k)` returns the
float32 top-k, as `models.scorers.ExactScorer` does: rows whose certificate fails, rows with
exclusions and models whose vectors are not 64 wide go to `ExactScorer`.

Measure (from the repository root, the venv active):
    python docs/prototypes/amx-scorer/scorer.py            # speed and agreement with ExactScorer
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
M = 48  # items kept per query (fused.c)
_lib = ctypes.CDLL(str(HERE / "fused.so"))
if _lib.amx_init() != 0:
    raise OSError("the kernel refused AMX (arch_prctl ARCH_REQ_XCOMP_PERM)")


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


class AmxScorer:
    name = "exact"
    U = 2.0**-9  # bfloat16's unit roundoff (round to nearest even)

    def __init__(self, two_pass: bool = False) -> None:
        self.two_pass = two_pass  # start_thresholds first: one more product, far fewer items kept
        self.prepared = False
        self.rows = 0
        self.fallbacks = 0

    def _prepare(self, model) -> None:  # noqa: ANN001 - a RecurrentRecommender
        with torch.no_grad():
            S = model.scoring_matrix().float().contiguous()  # [item vector | bias], (V, 65)
        V = S.size(0)
        nc = -(-V // 64)
        W = torch.zeros(nc * 64, 64)
        W[:V] = S[:, :64]
        bias = torch.full((nc * 64,), float("-inf"))  # padding items never pass
        bias[:V] = S[:, 64]
        # AMX's B tiles: [chunk][4 tiles of 16 items][2 halves of 32 dims][16 pairs][16 items][2]
        self.E = W.to(torch.bfloat16).view(nc, 4, 16, 2, 16, 2).permute(0, 1, 3, 4, 2, 5).contiguous()
        self.E = self.E.view(torch.int16).numpy()
        self.bias, self.nc, self.S = bias.numpy(), nc, S.numpy()
        self.emax = float(S[:, :64].norm(dim=1).max())
        self.bmax = float(S[:, 64].abs().max())
        self.prepared = True

    def __call__(self, model, queries: torch.Tensor, k: int, exclude=None):  # noqa: ANN001
        from models.scorers import ExactScorer

        if (exclude is not None and any(exclude)) or queries.size(1) != 64 or k > M:
            return ExactScorer()(model, queries, k, exclude)
        if not self.prepared:
            self._prepare(model)
        B = queries.size(0)
        Bp = -(-B // 16) * 16
        qf = np.zeros((Bp, 64), dtype=np.float32)
        qf[:B] = queries.float().numpy()
        qb = torch.from_numpy(qf).to(torch.bfloat16).view(torch.int16).numpy()
        top_v = np.empty((Bp, k), dtype=np.float32)
        top_i = np.empty((Bp, k), dtype=np.int32)
        tau = np.empty(Bp, dtype=np.float32)
        kth = np.empty(Bp, dtype=np.float32)
        start = np.empty(Bp, dtype=np.float32)
        for s in range(0, Bp, 64):
            n = min(64, Bp - s)
            if self.two_pass:
                _lib.start_thresholds(_ptr(qb[s:]), _ptr(self.E), _ptr(self.bias), n, self.nc, _ptr(start[s:]))
            _lib.score_topk(_ptr(qb[s:]), _ptr(self.E), _ptr(self.bias), n, self.nc, _ptr(qf[s:]), _ptr(self.S), k,
                            _ptr(top_v[s:]), _ptr(top_i[s:]), _ptr(tau[s:]), _ptr(kth[s:]),
                            _ptr(start[s:]) if self.two_pass else None)
        # |q.e - bf16(q).bf16(e)| <= (2u + u^2) |q| |e|; 1e-5 relative and 1e-6 of the largest bias
        # cover the float32 sums of both sides
        bound = (2 * self.U + self.U**2 + 1e-5) * np.linalg.norm(qf[:B], axis=1) * self.emax + 1e-6 * self.bmax
        ok = kth[:B] > tau[:B] + bound
        values, items = torch.from_numpy(top_v[:B]), torch.from_numpy(top_i[:B]).long()
        self.rows += B
        if not ok.all():
            bad = torch.from_numpy(np.flatnonzero(~ok))
            self.fallbacks += bad.numel()
            values[bad], items[bad] = ExactScorer()(model, queries[bad], k, None)
        return values, items


def _measure() -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    from models.lstm import ModelConfig, RecurrentRecommender
    from models.scorers import ExactScorer

    torch.set_num_threads(1)
    torch.manual_seed(0)  # recur bench e2e's untrained 20,000-item model
    model = RecurrentRecommender(ModelConfig(n_items=20000, embedding_dim=64, hidden_dim=128)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        state = torch.zeros(1024, model.config.state_size)
        for _ in range(3):
            items = torch.randint(0, 20000, (1024,), generator=g)
            state, queries = model.advance(state, items, torch.zeros(1024, dtype=torch.long))
        exact_items = ExactScorer()(model, queries, 20)[1]
        started = time.perf_counter()
        ExactScorer()(model, queries, 20)
        print(f"exact: {(time.perf_counter() - started) / 1024 * 1e6:.2f} us a query")
        for name, amx in (("amx", AmxScorer()), ("amx, two passes", AmxScorer(two_pass=True))):
            amx(model, queries[:64], 20)
            started = time.perf_counter()
            items = amx(model, queries, 20)[1]
            took = (time.perf_counter() - started) / 1024 * 1e6
            same = (items.sort(1).values == exact_items.sort(1).values).all(1).float().mean()
            print(f"{name}: {took:.2f} us a query; rows with the same 20 items as exact: {float(same):.4f}; "
                  f"rows scored again in float32: {amx.fallbacks} of {amx.rows}")


if __name__ == "__main__":
    _measure()
