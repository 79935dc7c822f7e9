"""The worker's agent and timers: batches of events from the events topic to the handler.

Each batch is acknowledged only after the handler processed it (faust commits acknowledged
offsets in order); a bug ends the process before the batch is acknowledged, so it is re-delivered.
"""

from __future__ import annotations

import logging
import os

from pipeline import faust_internals as internals
from pipeline.app import Streams
from pipeline.batching import batches, broker_backlog
from pipeline.config import Settings
from pipeline.handler import BatchHandler
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)


def register(streams: Streams, handler: BatchHandler, settings: Settings) -> None:
    @streams.app.agent(streams.events, name="recommend")
    async def recommend(stream):  # noqa: ANN001 - faust passes a StreamT
        behind = broker_backlog(streams.app, settings.max_batch)
        async for batch in batches(stream, settings.max_batch, settings.max_wait, settings.backlog_wait, behind):
            try:
                await handler.handle(batch, bind=internals.bind_current_event)
            except Exception:
                # A bug must crash loudly before the batch is acked, so that it is
                # re-delivered; faust would otherwise restart the agent and move on.
                log.critical("worker: unexpected error in a batch; exiting without committing it", exc_info=True)
                logging.shutdown()
                os._exit(70)
            internals.ack_all(streams.app, batch)  # the offsets may be committed now (faust commits acked offsets in order)


def register_users_gauge(streams: Streams, handler: BatchHandler, metrics: Metrics, interval: float) -> None:
    """Users in state, counted exactly on a slow timer, never per batch."""

    @streams.app.timer(interval)
    async def count_users_in_state() -> None:
        metrics.users.set(await handler.store.count())
