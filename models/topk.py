"""Exact top-k of a block of scores (the exact scorer's last stage, `models/scorers.py`)."""

from __future__ import annotations

import torch


def top_k(scores: torch.Tensor, k: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of `scores` (B, V) -> (values (B, k), indices (B, k)), sorted.

    Two stages: the maximum of each chunk of `chunk` items, the k chunks with the highest
    maxima, then top-k among those k * chunk candidates. Exact: every top-k item's chunk has a
    maximum at least the k-th best score, and at most k chunks can. Equal to torch.topk up to
    the order of exactly tied scores; falls back to torch.topk where it would not save work."""
    B, V = scores.shape
    n_chunks = V // chunk
    if n_chunks < 4 * k or B < 16:  # small catalogs and batches: one topk call is cheaper
        return torch.topk(scores, k, dim=1)
    main = scores[:, : n_chunks * chunk].view(B, n_chunks, chunk)
    best_chunks = torch.topk(main.amax(dim=2), k, dim=1).indices  # (B, k)
    offsets = torch.arange(chunk, device=scores.device)
    candidates = (best_chunks.unsqueeze(-1) * chunk + offsets).reshape(B, k * chunk)
    if V > n_chunks * chunk:  # the last partial chunk is always a candidate
        tail = torch.arange(n_chunks * chunk, V, device=scores.device).expand(B, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, pos = torch.topk(scores.gather(1, candidates), k, dim=1)
    return values, candidates.gather(1, pos)
