"""The Faust app: topics, the per-user state table and worker settings.

    recur worker            # run it (see pipeline/cli.py)
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import faust
import faust.transport.drivers.aiokafka as faust_aiokafka

from pipeline.config import Settings


@dataclass
class Streams:
    app: faust.App
    events: faust.TopicT
    recommendations: faust.TopicT
    dlq: faust.TopicT
    state: faust.Table


def _credentials(settings: Settings):
    if settings.security_protocol == "PLAINTEXT":
        return None
    context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=settings.sasl_password,
        mechanism=settings.sasl_mechanism,
        ssl_context=context if settings.security_protocol == "SASL_SSL" else None,
    )


def _limit_fetch_wait(ms: int) -> None:
    """Make faust's consumer ask the broker to hold a fetch with no new data for `ms`.

    Faust's aiokafka driver hard-codes 1,500 ms and has no setting for it. aiokafka keeps
    one fetch in flight per broker and leaves out partitions whose records are still being
    processed, so the broker holds that fetch for the full wait on partitions with nothing
    new (the table's changelog), and no new events reach the worker meanwhile: under a
    steady 700 events/s the worker stalled 0.7-1.5 s every couple of seconds (p50 latency
    1.3 s; 93 ms with a 10 ms wait). The wait is set on the consumer faust creates, before
    it starts (aiokafka reads it when it builds its fetcher)."""
    create = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "recur_fetch_wait_ms", None) == ms:
        return

    def create_worker_consumer(self, transport):  # noqa: ANN001, ANN202 - faust's signature
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    create_worker_consumer.recur_fetch_wait_ms = ms
    create_worker_consumer.__wrapped__ = getattr(create, "__wrapped__", create)
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer


def _seek_before_fetching(app: faust.App) -> None:
    """After a rebalance, keep the consumer from delivering events until recovery has
    sought the input partitions back to their committed offsets.

    Faust 0.15.3's recovery resumes the consumer's flow early (to read changelogs, or at
    once when nothing needs restoring), then resumes the input partitions, seeks (a round
    trip to the broker) and resumes the flow again, which clears the agents' queues. Events
    fetched in that window reached the queue and were cleared, while the fetcher counted
    them as read and its gap bookkeeping let the commit pass them: a worker that took over
    a stopped worker's partitions lost a few events per partition (the rebalance test in
    tests/integration/test_resilience.py, in some runs; faust-streaming issue 596 is about
    the same window). Recovery sends `on_rebalance_complete` just before it resumes the
    partitions and seeks, so stopping the flow there makes the fetcher wait for the seek:
    what it delivers next starts at the committed offsets."""

    async def hold_flow_until_seek(sender, **kwargs) -> None:  # noqa: ANN001 - faust's signal signature
        app.consumer.stop_flow()
        app.flow_control.suspend()

    app.on_rebalance_complete.connect(hold_flow_until_seek)  # a strong reference


def create_app(settings: Settings) -> Streams:
    _limit_fetch_wait(max(1, int(settings.fetch_max_wait * 1000)))
    store = "memory://" if settings.store == "memory" else "rocksdb://"
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        broker_credentials=_credentials(settings),
        store=store,
        datadir=str(settings.var_path / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",  # exactly_once has open bugs; state updates are idempotent
        producer_acks=-1,  # wait for the broker's acknowledgement
        producer_max_batch_size=512 * 1024,  # a batch writes ~1 state record per user: send them in bulk
        producer_linger=0.005,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,  # a crashed worker's partitions move on after 10 s
        broker_heartbeat_interval=3.0,
        stream_buffer_maxsize=max(4096, settings.max_batch * 2),
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.web_port,
        web_tables_enabled=False,  # never serve table contents
        web_router_enabled=False,
        web_graph_enabled=False,
        topic_allow_declare=True,
        logging_config=None,
    )
    events = app.topic(settings.events_topic, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    recs = app.topic(settings.recommendations_topic, key_serializer="raw", value_serializer="raw",
                     partitions=settings.partitions)
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw", partitions=settings.partitions)
    state = app.Table(
        "user-state",
        key_type=bytes,  # bytes key and value: the table stores them raw
        value_type=bytes,
        partitions=settings.partitions,
        use_partitioner=True,  # writes inside take() go to the key's partition
    )
    _seek_before_fetching(app)
    # table writes queue in faust's producer buffer; its default cap (100 messages) makes every
    # batch wait for the changelog a hundred records at a time
    app.producer.buffer.max_messages = max(1000, settings.max_batch * 4)
    return Streams(app, events, recs, dlq, state)
