"""One clear line when the broker will not have us: a check every command that talks to Kafka
runs first, instead of a client library's retries, stack traces or 30-second bootstrap timeouts.

- no broker at the address -> "no broker answers at ..."
- wrong SASL user or password -> "the broker at ... refused the credentials of user ..."
- a client speaking the wrong protocol (PLAINTEXT to a SASL port) -> "closed the connection ..."
- (the worker) no READ on the events topic -> "user ... may not read topic ..."
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import errors as ak_errors

from models.errors import BrokerError
from pipeline import security
from pipeline.config import Settings


def _who(settings: Settings) -> str:
    if settings.security_protocol.startswith("SASL"):
        return f"user {settings.sasl_username!r}"
    return "this client"


TOPIC_AUTHORIZATION_FAILED = 29  # Kafka's error code


def _denied(settings: Settings, topic: str) -> BrokerError:
    return BrokerError(f"kafka: {_who(settings)} may not read topic {topic!r} (the broker's ACLs deny it); "
                       "grant it READ on the topic, or run the worker as a user that has it")


async def _connect(settings: Settings, timeout: float, topic: str | None = None) -> bool:
    """-> whether `topic` exists (False without one)."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    options: dict[str, Any] = security.aiokafka(settings)
    servers = options.pop("bootstrap_servers")
    host, _, port = servers.split(",")[0].strip().rpartition(":")
    where = f"{host}:{port}"
    try:
        conn = await asyncio.wait_for(create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **options),
                                      timeout)
    except ak_errors.SaslAuthenticationFailed as e:
        raise BrokerError(f"kafka: the broker at {where} refused the credentials of {_who(settings)} "
                          f"({settings.sasl_mechanism}: {str(e).split(': ', 1)[-1]}); check RECUR_SASL_USERNAME "
                          "and RECUR_SASL_PASSWORD") from None
    except (OSError, TimeoutError, ak_errors.KafkaConnectionError):
        raise BrokerError(f"kafka: no broker answers at {where}; run `recur kafka start`, or set RECUR_BOOTSTRAP") from None
    except ak_errors.KafkaError as e:
        raise BrokerError(f"kafka: connecting to {where} failed: {type(e).__name__}: {e}") from None
    try:
        response = await asyncio.wait_for(conn.send(MetadataRequest([topic] if topic else [])), timeout)
    except (OSError, TimeoutError, ak_errors.KafkaError):
        raise BrokerError(f"kafka: the broker at {where} closed the connection when {_who(settings)} spoke "
                          f"{settings.security_protocol} to it; does it expect SASL or SSL? "
                          "(RECUR_SECURITY_PROTOCOL)") from None
    finally:
        conn.close()
    errors = {t[1]: t[0] for t in response.topics}
    if topic and errors.get(topic) == TOPIC_AUTHORIZATION_FAILED:
        raise _denied(settings, topic)
    return bool(topic) and errors.get(topic) == 0


async def _read(settings: Settings, topic: str, timeout: float) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(enable_auto_commit=False, request_timeout_ms=int(timeout * 1000),
                                **security.aiokafka(settings))
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])  # a fetch from one partition tells
        await consumer.seek_to_end()
        deadline = asyncio.get_running_loop().time() + min(timeout, 3.0)
        while asyncio.get_running_loop().time() < deadline:  # a denied fetch is reported on a later call
            if await consumer.getmany(timeout_ms=200):
                break
    except ak_errors.TopicAuthorizationFailedError:
        raise _denied(settings, topic) from None
    finally:
        try:
            await consumer.stop()
        except (asyncio.CancelledError, Exception):  # aiokafka 0.14 without a group: a cancelled task re-raised
            pass


def check_broker(settings: Settings, read_topic: str | None = None, timeout: float = 10.0) -> None:
    """Raise BrokerError with one clear line when the broker cannot be reached with these
    settings' address, protocol and credentials (or, with `read_topic`, that topic not read)."""

    async def run() -> None:
        if await _connect(settings, timeout, read_topic) and read_topic:  # it exists: may we fetch from it?
            await _read(settings, read_topic, timeout)

    quiet = logging.getLogger("aiokafka.conn")  # its "password in the clear" warning: once per client is enough
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        asyncio.run(run())
    finally:
        quiet.setLevel(level)
