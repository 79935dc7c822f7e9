"""kafka-python clients for the CLI: topic creation, producing files or synthetic
events, consuming recommendations."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from models.data import read_sessions
from models.errors import BrokerError
from models.events import Event
from pipeline import security
from pipeline.config import Settings
from pipeline.records import encode_event, encode_forget

log = logging.getLogger(__name__)


_CHECKED: set[tuple[str, str, str, str]] = set()  # broker, protocol and credentials the check passed with


def _common(settings: Settings) -> dict:
    checked = (settings.bootstrap_servers, settings.security_protocol, settings.sasl_username, settings.sasl_password)
    if settings.security_protocol != "PLAINTEXT" and checked not in _CHECKED:
        # kafka-python answers a wrong password with 30 s of retries and "no broker"; this says why, at once
        from pipeline.broker_check import check_broker

        check_broker(settings)
        _CHECKED.add(checked)  # once per process: a command makes several clients
    return {"bootstrap_servers": settings.bootstrap_servers, **security.kafka_python(settings)}


def _no_broker(settings: Settings) -> BrokerError:
    """Why a kafka-python client could not start: the broker check's line (say, a PLAINTEXT
    client at a SASL port), else "no broker"."""
    from pipeline.broker_check import check_broker

    try:
        check_broker(settings, timeout=5.0)
    except BrokerError as e:
        return e
    return BrokerError(f"kafka: no broker answers at {settings.bootstrap_servers}; run `recur kafka start`")


def admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**_common(settings), request_timeout_ms=15000)
    except KafkaError:
        raise _no_broker(settings) from None


def create_topics(settings: Settings) -> list[str]:
    """Create the events, recommendations, dead-letter, forget and forget-reports topics (the
    forget topic with the events' partitions: a request must reach the owner of the user's
    partition); -> names newly created."""
    client = admin(settings)
    created = []
    try:
        existing = set(client.list_topics())
        for name in (settings.events_topic, settings.recommendations_topic, settings.dlq_topic,
                     settings.forget_topic, settings.forget_reports_topic):
            if name in existing:
                continue
            try:
                client.create_topics([NewTopic(name, settings.partitions, 1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        client.close()
    return created


def delete_topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with `prefix` (a benchmark's own); -> names deleted."""
    client = admin(settings)
    try:
        names = sorted(t for t in client.list_topics() if t.startswith(prefix))
        if names:
            client.delete_topics(names)
        return names
    finally:
        client.close()


def producer(settings: Settings) -> KafkaProducer:
    try:
        return KafkaProducer(**_common(settings), acks="all", linger_ms=5, enable_idempotence=True,
                             batch_size=256 * 1024)
    except KafkaError:
        raise _no_broker(settings) from None


def produce_events(
    settings: Settings, events: Iterable[Event], progress: Callable[[int], None] | None = None
) -> int:
    """Publish events keyed by user id; waits for every acknowledgement. -> count."""
    prod = producer(settings)
    n = 0
    try:
        for n, event in enumerate(events, start=1):
            key, value = encode_event(event)
            prod.send(settings.events_topic, key=key, value=value)
            if progress and n % 1000 == 0:
                progress(1000)
        prod.flush()
        if progress:
            progress(n % 1000)
    except KafkaError as e:
        raise BrokerError(f"produce: the broker refused records ({type(e).__name__})") from None
    finally:
        prod.close()
    return n


def produce_raw(settings: Settings, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Publish raw (key, value) records as they are (tests, replays). -> count."""
    prod = producer(settings)
    n = 0
    try:
        for key, value in records:
            prod.send(settings.events_topic, key=key, value=value)
            n += 1
        prod.flush()
    finally:
        prod.close()
    return n


def file_events(path: str, fmt: str) -> list[Event]:
    """Events of a session-tsv or jsonl file, in time order (session ids become user ids for session-tsv)."""
    events = []
    for s in read_sessions(path, fmt):
        for item, etype, t in zip(s.items, s.types, s.times):
            user = s.key.split("#")[0] if fmt == "jsonl" else s.key
            events.append(Event(user, item, etype, int(t * 1000), session_id=None if fmt == "jsonl" else s.key))
    events.sort(key=lambda e: e.timestamp_ms)
    return events


def reader(settings: Settings, group_id: str | None = None) -> KafkaConsumer:
    """A consumer that never commits: assign and seek it, or read `group_id`'s commits with it."""
    try:
        return KafkaConsumer(**_common(settings), group_id=group_id, enable_auto_commit=False)
    except KafkaError:
        raise _no_broker(settings) from None


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """partition -> current end offset of `topic`."""
    consumer = reader(settings)
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


def consume(
    settings: Settings,
    topic: str,
    max_records: int,
    timeout_s: float,
    from_beginning: bool = True,
    start_offsets: dict[int, int] | None = None,
) -> Iterator[tuple[bytes | None, bytes, list]]:
    """Yield (key, value, headers) from `topic` until `max_records` or `timeout_s` without
    a record; from `start_offsets` (partition -> offset) when given."""
    try:
        consumer = KafkaConsumer(
            **_common(settings),
            group_id=None,
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False,
            consumer_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaError:
        raise _no_broker(settings) from None
    if start_offsets is not None:
        parts = [TopicPartition(topic, p) for p in sorted(start_offsets)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start_offsets[tp.partition])
    else:
        consumer.subscribe([topic])
    n = 0
    try:
        for record in consumer:
            yield record.key, record.value, record.headers
            n += 1
            if max_records and n >= max_records:
                return
    finally:
        consumer.close()


def shift_to_now(events: list[Event]) -> list[Event]:
    """Move timestamps so the last event is now (keeps gaps; makes latency metrics meaningful)."""
    if not events:
        return events
    delta = int(time.time() * 1000) - max(e.timestamp_ms for e in events)
    return [Event(e.user_id, e.item_id, e.event_type, e.timestamp_ms + delta, e.event_id, e.session_id) for e in events]


def as_json_line(value: bytes | None) -> str:
    if value is None:  # a tombstone: the user was forgotten (`recur forget`)
        return json.dumps({"tombstone": True})
    try:
        return json.dumps(json.loads(value))
    except ValueError:
        return json.dumps({"undecodable_bytes": len(value)})


def request_forget(settings: Settings, users: list[str], timeout_s: float, wait: bool = True) -> dict:
    """Send one erasure request per user to the forget topic, then (with `wait`) read the
    worker's reports until every request has its state part done, and its snapshots part when
    snapshots are on, or `timeout_s`. -> {"requests": [{"request_id", "state", "snapshots"}], "complete"}."""
    import json
    import uuid

    parts = ("state", "snapshots") if settings.snapshot_interval > 0 else ("state",)
    create_topics(settings)  # the reports topic must exist for its end offsets
    start = end_offsets(settings, settings.forget_reports_topic) if wait else {}
    ids = [uuid.uuid4().hex for _ in users]
    prod = producer(settings)
    try:
        now_ms = int(time.time() * 1000)
        for user, request_id in zip(users, ids, strict=True):
            key, value = encode_forget(user, request_id, now_ms)
            prod.send(settings.forget_topic, key=key, value=value)
        prod.flush()
    except KafkaError as e:
        raise BrokerError(f"forget: the broker refused the requests ({type(e).__name__})") from None
    finally:
        prod.close()
    reports: dict[str, dict] = {request_id: {"request_id": request_id} for request_id in ids}
    if wait:
        deadline = time.monotonic() + timeout_s
        missing = {(request_id, part) for request_id in ids for part in parts}
        for _, value, _ in consume(settings, settings.forget_reports_topic, 0, timeout_s, start_offsets=start):
            report = json.loads(value) if value else {}
            request_id, part = report.pop("request_id", None), report.pop("part", None)
            if (request_id, part) in missing:
                reports[request_id][part] = report
                missing.discard((request_id, part))
            if not missing or time.monotonic() > deadline:
                break
    out = [reports[request_id] for request_id in ids]
    complete = all(part in r for r in out for part in parts) if wait else False
    return {"requests": out, "complete": complete, "waited_for": list(parts) if wait else []}
