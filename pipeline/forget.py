"""Erasure requests in the worker: the `forget` agent.

A request is a record on the forget topic keyed by the user id (`recur forget`, or a shop's
own producer). The topic has the events topic's partitions and key, so the request reaches the
worker that holds the user's state, and faust's consumer group hands both topics' partition N to
the same worker. For each request the agent, between two batches of events:
  - deletes the user's state from the local store and writes a tombstone to the table's
    changelog (compaction then removes the state from the broker too): the recent items, the
    last list and the recurrent state go with it, and the user's next event starts afresh;
  - writes a tombstone (the user's key, no value) to the recommendations topic;
  - reports to the forget-reports topic (request id, no user id) and counts it.
The snapshot consumer does the snapshot side (`pipeline/snapshots.py`). Requests are acked
after they are carried out; one carried out twice (a redelivery) changes nothing more.
"""

from __future__ import annotations

import logging
import time

from faust.types import EventT

from models.errors import BadRecord
from pipeline.app import Streams
from pipeline.config import Settings
from pipeline.handler import BatchHandler
from pipeline.metrics import Metrics
from pipeline.records import decode_forget, encode_forget_report

log = logging.getLogger(__name__)


class Forgetter:
    def __init__(self, handler: BatchHandler) -> None:
        self.handler = handler  # its store, dead-letter path and metrics
        self.streams: Streams = handler.streams
        self.metrics: Metrics = handler.metrics
        self.settings: Settings = handler.settings

    async def handle(self, event: EventT) -> None:
        msg = event.message
        try:
            key, request_id = decode_forget(msg.key, msg.value, msg.partition, msg.offset)
        except BadRecord as error:
            await self.handler.dead_letter(event, error)
            return
        had_state = self.handler.store.delete(key, msg.partition)
        producer = self.streams.app.producer
        changelog = self.streams.state.changelog_topic.get_topic_name()
        await producer.send(changelog, key, None, msg.partition, None, None)  # the table's tombstone
        await producer.send(self.settings.recommendations_topic, key, None, None, None, None)
        seconds = max(0.0, time.time() - msg.timestamp) if msg.timestamp else 0.0
        report_key, report = encode_forget_report(request_id, "state", had_state=had_state, seconds=round(seconds, 3))
        await producer.send(self.settings.forget_reports_topic, report_key, report, None, None, None)
        self.metrics.forget_requests.labels("state").inc()
        self.metrics.forget_seconds.labels("state").observe(seconds)
        log.info("forget: request %s: state %s, tombstones sent", request_id,
                 "deleted" if had_state else "none held")


def register_forget(streams: Streams, forgetter: Forgetter) -> None:
    @streams.app.agent(streams.forget, name="forget")
    async def forget(stream):  # noqa: ANN001 - faust passes a StreamT
        async for event in stream.events():  # acked after each request is carried out
            await forgetter.handle(event)
