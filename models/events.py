"""The records recur reads and writes: the event (shared by the wire format, the file readers
and the snapshots), its event types, and the recommendation.

Pure validation of an already-decoded JSON object; decoding bytes, size limits and Kafka keys
are the pipeline's job (`pipeline/records.py`). Imports nothing heavier than the standard
library, so the wire format, the CLI's clients and the readers do not pull in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from models.errors import BadRecord

CLICK, PURCHASE = 0, 1
EVENT_TYPES = ("click", "purchase")  # index = event type id
_TYPE_IDS = {name: n for n, name in enumerate(EVENT_TYPES)}

MIN_TIMESTAMP_MS = 946_684_800_000  # 2000-01-01: anything earlier is absurd
MAX_FUTURE_MS = 24 * 3600 * 1000  # more than a day ahead of the clock is absurd
MAX_ID_LENGTH = 256  # user, item, event and session ids


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    event_type: int  # index into EVENT_TYPES
    timestamp_ms: int
    event_id: str | None = None
    session_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": EVENT_TYPES[self.event_type],
            "timestamp": self.timestamp_ms,
        }
        if self.event_id is not None:
            out["event_id"] = self.event_id
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out


@dataclass
class Recommendation:
    user_id: str
    event_id: str
    item_ids: list[str]  # best first
    scores: list[float]  # the model's score of each (0.0 for a re-sent list; counts for trending)
    strategy: str  # "lstm", "trending" or "repeat" (a re-sent list for an already applied event)
    model_version: str
    event_timestamp: int  # ms

    @property
    def items(self) -> list[tuple[str, float]]:
        return list(zip(self.item_ids, self.scores))


def _id(obj: dict, field: str, required: bool) -> str | None:
    value = obj.get(field)
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH:  # the common case, first
        return value
    if value is None:
        if required:
            raise BadRecord("missing_field", f"field '{field}' is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRecord("wrong_type", f"field '{field}' must be a string")
    value = str(value)
    if not value or len(value) > MAX_ID_LENGTH:
        raise BadRecord("bad_value", f"field '{field}' must have 1..{MAX_ID_LENGTH} characters")
    return value


def parse_timestamp(value: Any, now_ms: int) -> int:
    """Epoch milliseconds (int or float) or an ISO-8601 string -> epoch ms."""
    if type(value) is int:  # the common case, first (bool is a subclass of int, not int itself)
        ms = value
    elif isinstance(value, bool):
        raise BadRecord("bad_timestamp", "timestamp must be epoch milliseconds or ISO-8601")
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise BadRecord("bad_timestamp", "timestamp is not a finite number")
        ms = int(value)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadRecord("bad_timestamp", "timestamp string is not ISO-8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms = int(dt.timestamp() * 1000)
    else:
        raise BadRecord("bad_timestamp", "timestamp must be epoch milliseconds or ISO-8601")
    if ms < MIN_TIMESTAMP_MS or ms > now_ms + MAX_FUTURE_MS:
        raise BadRecord("absurd_timestamp", "timestamp is before 2000 or more than a day ahead")
    return ms


def parse_event(obj: Any, now_ms: int) -> Event:
    """Validate a decoded JSON value as an event; raises BadRecord with the reason."""
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", "event must be a JSON object")
    user_id = _id(obj, "user_id", True)
    item_id = _id(obj, "item_id", True)
    if "event_type" not in obj:
        raise BadRecord("missing_field", "field 'event_type' is missing")
    etype = obj["event_type"]
    type_id = _TYPE_IDS.get(etype) if type(etype) is str else None
    if type_id is None:
        if not isinstance(etype, str):
            raise BadRecord("wrong_type", "field 'event_type' must be a string")
        raise BadRecord("unknown_event_type", f"event_type must be one of {', '.join(EVENT_TYPES)}")
    if "timestamp" not in obj:
        raise BadRecord("missing_field", "field 'timestamp' is missing")
    return Event(
        user_id=user_id,  # type: ignore[arg-type]
        item_id=item_id,  # type: ignore[arg-type]
        event_type=type_id,
        timestamp_ms=parse_timestamp(obj["timestamp"], now_ms),
        event_id=_id(obj, "event_id", False),
        session_id=_id(obj, "session_id", False),
    )
