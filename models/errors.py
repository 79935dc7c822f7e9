"""The one error hierarchy of recur. Each message names the step and what was wrong,
never a raw payload or a user id."""

from __future__ import annotations


class RecurError(Exception):
    """Base class of every error recur raises on purpose."""


class ConfigError(RecurError):
    """A setting, flag or environment variable has an invalid value."""


class ModelError(RecurError):
    """A model config or tensor does not fit what the model expects."""


class ArtifactError(RecurError):
    """A model artifact folder is missing, incomplete or inconsistent."""


class DataError(RecurError):
    """An input file for training or evaluation cannot be read."""


class RetrainError(RecurError):
    """A retraining run could not judge or publish a challenger; the live model stays."""


class BrokerError(RecurError):
    """The local Kafka broker cannot be set up, started or reached."""


# every reason a record can be dead-lettered for (the `recur.error.reason` header and the
# `reason` label of recur_dead_letters_total); the README's list is tested against this one
DEAD_LETTER_REASONS = {
    "forget_without_user": "an erasure request on the forget topic has no key (the key must be the user id)",
    "empty_value": "the record has no value, or an empty one",
    "too_large": "the value is larger than RECUR_MAX_RECORD_BYTES",
    "invalid_json": "the value is not valid UTF-8 JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_field": "user_id, item_id, event_type or timestamp is missing",
    "wrong_type": "an id or event_type is not a string (ids may be integers)",
    "bad_value": "an id is empty or longer than 256 characters",
    "unknown_event_type": "event_type is neither click nor purchase",
    "bad_timestamp": "timestamp is neither epoch milliseconds nor ISO-8601",
    "absurd_timestamp": "timestamp is before 2000 or more than a day ahead of the worker's clock",
    "missing_key": "the record has no key",
    "key_mismatch": "the key is not the event's user_id",
}


class BadRecord(RecurError):
    """One input record cannot be processed; it belongs in the dead-letter topic.

    `reason` is one of DEAD_LETTER_REASONS (used as a metric label), `detail` a short human
    explanation without payload or user id.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DEAD_LETTER_REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
