"""The Faust app: topics, the per-user state table and worker settings.

    recur worker            # run it (see pipeline/cli.py)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import faust

from pipeline import bulk_restore, security
from pipeline.config import Settings
from pipeline.faust_internals import (
    hold_flow_until_seek,
    limit_fetch_wait,
    restore_before_recovery,
    seek_uncommitted_to_beginning,
    set_producer_buffer,
)


@dataclass
class Streams:
    app: faust.App
    events: faust.TopicT
    recommendations: faust.TopicT
    dlq: faust.TopicT
    state: faust.types.TableT
    forget: faust.TopicT  # erasure requests, keyed and partitioned as the events
    restore_threshold: bulk_restore.Threshold  # lowered after a stalled recovery (pipeline/recovery_watch.py)


def changelog_config(settings: Settings) -> dict[str, str]:
    """The state changelog topic's configuration, set when the worker creates the topic."""
    return {"cleanup.policy": "compact", "segment.ms": str(settings.changelog_segment_ms),
            "segment.bytes": str(settings.changelog_segment_bytes)}


def create_app(settings: Settings) -> Streams:
    limit_fetch_wait(max(1, int(settings.fetch_max_wait * 1000)))
    seek_uncommitted_to_beginning()
    store = "memory://" if settings.store == "memory" else "rocksdb://"
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        broker_credentials=security.faust_credentials(settings),
        store=store,
        datadir=str(settings.var_path / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",  # exactly_once has open bugs; state updates are idempotent
        broker_commit_interval=settings.commit_interval,
        # standby tables: off by default. With faust 0.15.3 a worker that took over a killed worker's
        # partitions as promoted standbys never fetched their events again; that was the seek that
        # did not rewind partitions without a committed offset (faust_internals.seek_uncommitted_to_beginning)
        table_standby_replicas=settings.standby_replicas,
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
    forget = app.topic(settings.forget_topic, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    state = app.Table(
        "user-state",
        key_type=bytes,  # bytes key and value: the table stores them raw
        value_type=bytes,
        partitions=settings.partitions,
        use_partitioner=True,  # writes inside take() go to the key's partition
        # compacted, and its segments roll: Kafka compacts only closed segments, and with its
        # default 1 GiB segments a changelog of ~900-byte states never rolled, so a restore read
        # every state ever written (2 records per user after 2 events each; more with every event)
        extra_topic_configs=changelog_config(settings),
    )
    threshold = bulk_restore.Threshold(settings.bulk_restore_min_records)
    if settings.bulk_restore and settings.store == "rocksdb":  # faust's recovery reads only what is left
        restore_before_recovery(app, functools.partial(bulk_restore.restore, settings, threshold, state))
    hold_flow_until_seek(app)
    set_producer_buffer(app, max(1000, settings.max_batch * 4))
    return Streams(app, events, recs, dlq, state, forget, threshold)
