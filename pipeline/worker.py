"""The worker process: `recur worker`.

Loads the live model from the registry, builds the Faust app, serves /metrics on
127.0.0.1 and runs until SIGTERM/SIGINT (faust stops consuming, finishes the
batch, flushes the producer and commits).
"""

from __future__ import annotations

import logging

import faust
from prometheus_client import CollectorRegistry, start_http_server

from models.artifacts import load_artifact
from models.lstm import resolve_device
from models.online import OnlineConfig, OnlineRecommender
from pipeline.agents import BatchHandler, register, register_model_watch
from pipeline.app import create_app
from pipeline.config import Settings
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)


def build(settings: Settings, registry: CollectorRegistry | None = None):
    device = resolve_device(settings.device)
    artifact = load_artifact(settings.models_path, device)
    recommender = OnlineRecommender(
        artifact,
        OnlineConfig(
            k=settings.k,
            recent_n=settings.recent_n,
            exclude_purchased=settings.exclude_purchased,
            exclude_current=settings.exclude_current,
            trending_window=settings.trending_window,
        ),
        device,
    )
    metrics = Metrics(registry or CollectorRegistry())
    metrics.model.info({"version": artifact.version})
    streams = create_app(settings)
    handler = BatchHandler(streams, recommender, metrics, settings)
    register(streams, handler, settings)
    register_model_watch(streams, handler, settings)
    return streams, handler


def run_worker(settings: Settings) -> None:
    (settings.var_path / "faust").mkdir(parents=True, exist_ok=True)
    streams, handler = build(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=handler.metrics.registry)
    log.info("worker: model %s on %s, metrics on %s:%s", handler.recommender.version,
             handler.recommender.device, settings.metrics_host, settings.metrics_port or "off")
    worker = faust.Worker(streams.app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()
