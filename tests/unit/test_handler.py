"""The batch handler's own bookkeeping, without a broker (the batches themselves are tested
against the real broker in tests/integration)."""

import torch
from prometheus_client import CollectorRegistry

from models.artifacts import Artifact
from models.lstm import ModelConfig, RecurrentRecommender
from models.online import OnlineConfig, OnlineRecommender
from models.scorers import ExactScorer
from models.vocab import Vocabulary
from pipeline.config import load_settings
from pipeline.handler import BatchHandler
from pipeline.metrics import Metrics


def _info(registry: CollectorRegistry) -> dict[str, str]:
    samples = [s for m in registry.collect() if m.name == "recur_model" for s in m.samples]
    assert len(samples) == 1 and samples[0].value == 1
    return samples[0].labels


def test_the_model_info_names_the_live_version_and_its_scorer_and_none_while_cold():
    registry = CollectorRegistry()
    handler = BatchHandler(None, OnlineRecommender(None, OnlineConfig()), Metrics(registry), load_settings({}))
    assert _info(registry) == {"version": "none", "scorer": "none"}  # cold: trending lists, nothing scored
    torch.manual_seed(0)
    model = RecurrentRecommender(ModelConfig(n_items=5, embedding_dim=4, hidden_dim=4)).eval()
    scorer = ExactScorer()
    handler.swap_model(Artifact(model, Vocabulary([f"i{n}" for n in range(5)]), {"version": "v7"}, path=None), scorer)
    assert _info(registry) == {"version": "v7", "scorer": "exact"}
    assert handler.recommender.scorer is scorer
