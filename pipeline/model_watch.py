"""The live model: picking up newly published versions, and checking that it knows the stream.

The registry's CURRENT is polled on a timer; a new version is loaded, checked and its scorer
built (the ANN index) in a thread, off the event loop, then swapped in on the loop, between two
batches (`BatchHandler.swap_model`).
A version that fails its checks is counted once and not tried again; the live model stays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from models.artifacts import Artifact, current_version, load_artifact
from models.errors import RecurError
from models.online import BatchStats, OnlineRecommender
from models.scorers import Scorer

log = logging.getLogger(__name__)

COVERAGE_WINDOW = 1000  # events per judgement of how much of the stream the live model knows


class ItemCoverage:
    """Share of events whose item the live model knows, over windows of COVERAGE_WINDOW events
    since it went live (`recur_model_known_items_ratio`). A model that knows none of a window's
    items was trained on another catalogue: said once in the log, per version."""

    def __init__(self, gauge) -> None:  # noqa: ANN001 - a prometheus Gauge
        self.gauge = gauge
        self.reset()

    def reset(self) -> None:
        """A new model went live."""
        self.seen = self.known = 0
        self.warned = False

    def add(self, version: str, stats: BatchStats) -> None:
        """One batch's events applied with `version` live."""
        self.seen += stats.applied
        self.known += stats.applied - stats.unknown_items
        if self.seen:
            self.gauge.set(self.known / self.seen)
        if self.seen < COVERAGE_WINDOW:
            return
        if self.known == 0 and not self.warned:
            self.warned = True
            log.warning("model: %s knows none of the items of the last %d events: it was trained on another "
                        "catalogue; users get trending lists until a model trained on this stream is published",
                        version, self.seen)
        self.seen = self.known = 0


def load_and_prepare(recommender: OnlineRecommender, path: Path) -> tuple[Artifact, Scorer]:
    """The slow half of a swap, run in a thread: load and check the artifact, move it to the
    device, build its scorer (an ANN index: seconds at 1,000,000 items)."""
    artifact = load_artifact(path, recommender.device)
    return artifact, recommender.prepare(artifact)


def register_model_watch(streams, handler, settings) -> None:  # noqa: ANN001 - Streams, BatchHandler, Settings
    """Poll the registry's CURRENT; load and check a new version in a thread, off the hot path."""
    failed: set[str] = set()

    @streams.app.timer(settings.model_poll_interval)
    async def watch_models() -> None:
        version = current_version(settings.models_path)  # ticks run one after another: no load overlaps
        if version is None or version == handler.recommender.version or version in failed:
            return
        try:
            artifact, scorer = await asyncio.get_running_loop().run_in_executor(
                None, load_and_prepare, handler.recommender, settings.models_path / version)
        except RecurError as e:
            failed.add(version)
            handler.metrics.model_load_failures.inc()
            log.error("model: version %s was not loaded (the live model %s stays): %s", version,
                      handler.recommender.version, e)
            return
        handler.swap_model(artifact, scorer)
