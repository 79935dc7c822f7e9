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


class BrokerError(RecurError):
    """The local Kafka broker cannot be set up, started or reached."""


class BadRecord(RecurError):
    """One input record cannot be processed; it belongs in the dead-letter topic.

    `reason` is a short machine-friendly code (used as a metric label), `detail`
    a short human explanation without payload or user id.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
