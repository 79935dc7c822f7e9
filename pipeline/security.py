"""Kafka client security options from the settings, in each client library's spelling:
kafka-python (the CLI), aiokafka (the snapshot consumer) and faust (the worker)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings

if TYPE_CHECKING:  # faust reads sys.argv when imported (`--loop`): only the worker imports it
    import faust


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=settings.ssl_cafile or None)


def _uses_ssl(settings: Settings) -> bool:
    return settings.security_protocol in ("SSL", "SASL_SSL")


def _sasl(settings: Settings) -> dict[str, Any]:
    if not settings.security_protocol.startswith("SASL"):
        return {}
    return {"sasl_mechanism": settings.sasl_mechanism, "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password}


def kafka_python(settings: Settings) -> dict[str, Any]:
    """For kafka-python's clients."""
    out: dict[str, Any] = {"security_protocol": settings.security_protocol, **_sasl(settings)}
    if settings.ssl_cafile:
        out["ssl_cafile"] = settings.ssl_cafile
    return out


def aiokafka(settings: Settings) -> dict[str, Any]:
    """For aiokafka's clients (bootstrap servers included)."""
    out: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                           "security_protocol": settings.security_protocol, **_sasl(settings)}
    if _uses_ssl(settings):
        out["ssl_context"] = _ssl_context(settings)
    return out


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """For faust's app (`broker_credentials`)."""
    import faust

    if settings.security_protocol == "PLAINTEXT":
        return None
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(_ssl_context(settings))
    return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                 mechanism=settings.sasl_mechanism,
                                 ssl_context=_ssl_context(settings) if _uses_ssl(settings) else None)
