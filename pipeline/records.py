"""Wire schemas: Kafka record bytes <-> events and recommendations, dead-letter headers."""

from __future__ import annotations

import orjson

from models.errors import BadRecord
from models.events import Event, Recommendation, parse_event


def decode_event(key: bytes | None, value: bytes | None, max_bytes: int, now_ms: int) -> Event:
    """Validate one input record; raises BadRecord(reason, detail) for the dead-letter topic."""
    if not value:  # a null value (a tombstone) or zero bytes
        raise BadRecord("empty_value", "record has no value")
    if len(value) > max_bytes:
        raise BadRecord("too_large", f"value is {len(value)} bytes, limit {max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:  # also invalid UTF-8
        raise BadRecord("invalid_json", "value is not valid UTF-8 JSON") from None
    event = parse_event(obj, now_ms)
    if key is None:
        raise BadRecord("missing_key", "record has no key; the key must be the user id")
    if key != event.user_id.encode():
        raise BadRecord("key_mismatch", "record key is not the event's user id")
    return event


def encode_event(event: Event) -> tuple[bytes, bytes]:
    """-> (key, value) for the events topic."""
    return event.user_id.encode(), orjson.dumps(event.to_wire())


def encode_recommendation(rec: Recommendation, emitted_at_ms: int) -> tuple[bytes, bytes]:
    """-> (key, value) for the recommendations topic."""
    value = {
        "user_id": rec.user_id,
        "event_id": rec.event_id,
        "items": [{"item_id": i, "score": s} for i, s in zip(rec.item_ids, rec.scores)],
        "strategy": rec.strategy,
        "model_version": rec.model_version,
        "event_timestamp": rec.event_timestamp,
        "emitted_at": emitted_at_ms,
    }
    return rec.user_id.encode(), orjson.dumps(value)


def dlq_headers(topic: str, partition: int, offset: int, error: BadRecord) -> list[tuple[str, bytes]]:
    """Headers that say where a dead letter came from and why (no payload, no user id)."""
    return [
        ("recur.original.topic", topic.encode()),
        ("recur.original.partition", str(partition).encode()),
        ("recur.original.offset", str(offset).encode()),
        ("recur.error.class", type(error).__name__.encode()),
        ("recur.error.reason", error.reason.encode()),
        ("recur.error.detail", error.detail.encode()),
    ]


def encode_forget(user_id: str, request_id: str, requested_ms: int) -> tuple[bytes, bytes]:
    """-> (key, value) of an erasure request for the forget topic: keyed by the user id, like
    the events, so that it reaches the worker that holds the user's state."""
    return user_id.encode(), orjson.dumps({"request_id": request_id, "requested_ms": requested_ms})


def decode_forget(key: bytes | None, value: bytes | None, partition: int, offset: int) -> tuple[bytes, str]:
    """-> (user key, request id) of an erasure request; any value is accepted (a shop's own
    systems may send none), the request id then being "<partition>-<offset>"."""
    if not key:
        raise BadRecord("forget_without_user", "erasure request has no key; the key must be the user id")
    request_id = f"{partition}-{offset}"
    if value:
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("request_id"), str) and obj["request_id"]:
            request_id = obj["request_id"][:100]
    return key, request_id


def encode_forget_report(request_id: str, part: str, **facts: int | float | bool) -> tuple[bytes, bytes]:
    """-> (key, value) for the forget-reports topic: what one part of the worker (`state` or
    `snapshots`) did for a request. Keyed by the request id; no user id."""
    return request_id.encode(), orjson.dumps({"request_id": request_id, "part": part, **facts})
