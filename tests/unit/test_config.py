import pytest

from models.errors import ConfigError
from pipeline.config import load_settings


def test_defaults_env_and_flags():
    s = load_settings({})
    assert s.local and s.bootstrap_servers == "127.0.0.1:19092" and s.partitions == 4 and s.k == 20
    s = load_settings({"RECUR_BOOTSTRAP": "kafka:9092", "RECUR_K": "5", "RECUR_EXCLUDE_PURCHASED": "false"}, {"k": 7})
    assert not s.local and s.bootstrap_servers == "kafka:9092"
    assert s.k == 7 and s.exclude_purchased is False
    assert str(s.models_path) == "var/models"


def test_invalid_values_are_named():
    with pytest.raises(ConfigError, match="RECUR_K"):
        load_settings({"RECUR_K": "many"})
    with pytest.raises(ConfigError, match="store"):
        load_settings({"RECUR_STORE": "redis"})


def test_secrets_are_masked_and_passed_to_clients():
    s = load_settings({"RECUR_SECURITY_PROTOCOL": "SASL_SSL", "RECUR_SASL_USERNAME": "u", "RECUR_SASL_PASSWORD": "p"})
    assert s.public()["sasl_password"] == "***"
    from pipeline import security

    opts = security.kafka_python(s)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_plain_password"] == "p"
    opts = security.aiokafka(s)
    assert opts["sasl_plain_username"] == "u" and opts["ssl_context"] is not None
    creds = security.faust_credentials(s)
    assert (creds.username, creds.password, creds.ssl_context is not None) == ("u", "p", True)
    assert security.faust_credentials(load_settings({})) is None and "ssl_context" not in security.aiokafka(load_settings({}))


def test_settings_hand_over_to_a_child_process_unchanged():
    s = load_settings({"RECUR_K": "7", "RECUR_EXCLUDE_CURRENT": "true", "RECUR_MAX_WAIT": "0.2"})
    assert load_settings(s.to_env()) == s


def test_the_scorer_setting_names_every_scorer_models_has():
    from models.scorers import SCORERS
    from pipeline.config import SCORERS as SETTING

    assert SETTING == SCORERS  # kept apart so that the clients' config needs no torch
