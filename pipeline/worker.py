"""The worker process: `recur worker`.

Loads the live model from the registry, builds the Faust app, serves /metrics on
127.0.0.1 and runs until SIGTERM/SIGINT (faust stops consuming, finishes the
batch, flushes the producer and commits).
"""

from __future__ import annotations

import atexit
import gc
import logging
from typing import Any

import faust
import torch
from prometheus_client import CollectorRegistry, start_http_server

from models.artifacts import current_version, load_artifact
from models.lstm import resolve_device
from models.online import OnlineConfig, OnlineRecommender
from pipeline.agents import register, register_users_gauge
from pipeline.app import Streams, create_app
from pipeline.config import Settings
from pipeline.forget import Forgetter, register_forget
from pipeline.handler import BatchHandler
from pipeline.metrics import Metrics
from pipeline.model_watch import register_model_watch
from pipeline.recovery_watch import RecoveryWatch
from pipeline.snapshot_tools import recent_items
from pipeline.snapshots import SnapshotConsumer

log = logging.getLogger(__name__)


def build(settings: Settings,
          registry: CollectorRegistry | None = None) -> tuple[Streams, BatchHandler, SnapshotConsumer | None]:
    device = resolve_device(settings.device)
    if current_version(settings.models_path) is None:
        log.warning("worker: no model in %s yet: cold start, trending lists only, until one is published",
                    settings.models_path)
        artifact = None
    else:
        artifact = load_artifact(settings.models_path, device)
    recommender = OnlineRecommender(
        artifact,
        OnlineConfig(
            k=settings.k,
            recent_n=settings.recent_n,
            exclude_purchased=settings.exclude_purchased,
            exclude_current=settings.exclude_current,
            trending_window=settings.trending_window,
            scorer=settings.scorer_config(),
        ),
        device,
    )
    if artifact is not None:
        log.info("worker: model %s, %d items, scorer %s on %s", recommender.version, len(recommender.vocab),
                 recommender.scorer.name, device)
    _rebuild_trending(recommender, settings)
    metrics = Metrics(registry or CollectorRegistry())
    streams = create_app(settings)
    handler = BatchHandler(streams, recommender, metrics, settings)
    register(streams, handler, settings)
    register_forget(streams, Forgetter(handler))
    register_model_watch(streams, handler, settings)
    register_users_gauge(streams, handler, metrics, settings.users_count_interval)
    snapshots = None
    if settings.snapshot_interval > 0:
        snapshots = SnapshotConsumer(settings, metrics)

        @streams.app.task
        async def write_snapshots() -> None:
            await snapshots.run()

    return streams, handler, snapshots


def _rebuild_trending(recommender: OnlineRecommender, settings: Settings) -> None:
    """Seed the cold-start trending window with the newest snapshot events, so that a restart
    does not start it from nothing."""
    try:
        items = recent_items(settings.snapshot_root, settings.trending_window)
    except Exception as e:  # unreadable snapshots must not keep the worker from starting
        log.warning("worker: trending not rebuilt from the snapshots (%s); it starts empty", type(e).__name__)
        return
    log.info("worker: trending rebuilt from the newest %d snapshot events", recommender.trending.seed(items))


class RecurWorker(faust.Worker):
    """faust.Worker that stops the snapshot consumer (final write and commit) before the app."""

    def __init__(self, app: faust.App, snapshots: SnapshotConsumer | None, *services: Any, **kwargs: Any) -> None:
        self.snapshots = snapshots
        super().__init__(app, *services, **kwargs)

    async def on_stop(self) -> None:
        if self.snapshots is not None:
            await self.snapshots.stop()
        await super().on_stop()


def recovery_watch(streams: Streams, metrics: Metrics, settings: Settings) -> RecoveryWatch | None:
    """The watch that starts a stalled table restore again (None when turned off); each restart
    is counted, and what is left is then read by the bulk restore."""
    if settings.recovery_stall_seconds <= 0:
        return None

    def restarted() -> None:
        metrics.recovery_restarts.inc()
        streams.restore_threshold.lower()

    return RecoveryWatch(streams.app, settings.recovery_stall_seconds, restarted, loop=streams.app.loop)


GC_YOUNG = 50_000  # container objects allocated (net) between two young collections; Python's default is 700


def quiet_gc() -> None:
    """Keep the cyclic garbage collector out of the event loop's way.

    Everything imported and built so far (torch, faust, the model: ~10^6 objects) lives as long
    as the process; left to the collector, each full collection walked it all and paused the
    event loop ~170 ms. Freezing moves it out of the collector's way. And a batch keeps tens of
    thousands of short-lived objects alive at once (records, events, states, lists: ~50 an
    event, 1,024 events): at the default threshold (700) the young collection ran ~100 times a
    second in a backlog, promoted the batch's objects, and the older generations' collections
    followed (~1 a second, ~30 ms each): ~5% of the loop's time (gc.callbacks, `recur bench e2e
    --events 300000`). Nearly all of them are freed by reference counting at the end of the
    batch, so a young threshold above a batch's allocations lets the collector run only when
    garbage in cycles accumulates (at most ~GC_YOUNG objects of it)."""
    gc.collect()
    gc.freeze()
    # ...and back before the interpreter's teardown: objects left frozen are never freed, and
    # torch's triton bindings (nanobind) then print ~30 lines of "leaked ... reference counting
    # issue" after every clean stop.
    atexit.register(gc.unfreeze)
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def run_worker(settings: Settings) -> None:
    (settings.var_path / "faust").mkdir(parents=True, exist_ok=True)
    if settings.torch_threads:
        # one model thread beside the event loop: on a small machine more threads spin against
        # faust's own (a batch of 15 events took 10 ms with one thread, 22 ms with two)
        torch.set_num_threads(settings.torch_threads)
    streams, handler, snapshots = build(settings)
    quiet_gc()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=handler.metrics.registry)
    log.info("worker: model %s on %s, metrics on %s:%s", handler.recommender.version,
             handler.recommender.device, settings.metrics_host, settings.metrics_port or "off")
    watch = recovery_watch(streams, handler.metrics, settings)
    worker = RecurWorker(streams.app, snapshots, *([watch] if watch else []), loglevel=settings.log_level.upper(),
                         quiet=True)
    worker.execute_from_commandline()
