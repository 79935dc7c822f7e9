"""Learned item embeddings for the benchmarks: approximate search behaves differently on trained
embeddings (skewed norms, clustered directions) than on random vectors, so the benchmarks use a
model trained by `models.train` on synthetic data with realistic structure, cached outside git."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from models.artifacts import Artifact, current_version, load_artifact, save_artifact
from models.synthetic import SyntheticConfig, synthetic_sessions
from models.train import TrainConfig, train

log = logging.getLogger(__name__)


def learned_model(n_items: int, embedding_dim: int, hidden_dim: int, layers: int, cache: Path,
                  say: Callable[[str], None], min_events: int = 50_000) -> Artifact:
    """A model over `n_items` synthetic items, trained once (one epoch on 3 events per item, at
    least `min_events`) and then loaded from `cache`/bench-models."""
    registry = cache / "bench-models" / f"items{n_items}-e{embedding_dim}-h{hidden_dim}-l{layers}"
    if current_version(registry) is None:
        n_events = max(min_events, 3 * n_items)
        say(f"training the benchmark's model once: {n_events} synthetic events over {n_items} items "
            f"(cached in {registry})")
        sessions, catalog = synthetic_sessions(SyntheticConfig(n_events=n_events, n_items=n_items,
                                                               n_users=max(1, n_events // 20)))
        cfg = TrainConfig(epochs=1, batch_size=256, valid_fraction=0.02, refit=False)
        result = train(sessions, dict(embedding_dim=embedding_dim, hidden_dim=hidden_dim, num_layers=layers),
                       cfg, catalog=catalog)
        save_artifact(registry, result.model, result.vocab, {**result.metadata(cfg), "source": "bench"},
                      publish=True)
        say(f"trained in {result.seconds:.0f}s; validation {result.best}")
    return load_artifact(registry)
