"""The local broker: formatting and starting with any cluster id."""

from __future__ import annotations

import os

import pytest

import pipeline.kafka_local as kafka_local
from models.errors import BrokerError
from pipeline import worker_process
from pipeline.config import load_settings


def test_a_cluster_id_that_begins_with_a_dash_formats_and_starts(local_broker, tmp_path, monkeypatch):
    if local_broker is None:
        pytest.skip("RECUR_BOOTSTRAP names an external broker; this test starts a local one")
    cid = "-" + kafka_local.new_cluster_id()[1:]  # 1 in 64 random ids; the storage tool read it as an option
    monkeypatch.setattr(kafka_local, "new_cluster_id", lambda: cid)
    port = worker_process.free_ports(2)  # the client port and the controller's, port + 1
    settings = load_settings({k: v for k, v in os.environ.items() if k == "RECUR_CACHE_DIR"},
                             {"var_dir": str(tmp_path), "kafka_port": port, "kafka_heap": "256m"})
    broker = kafka_local.LocalKafka(settings)
    try:
        assert broker.start().startswith(f"kafka started at 127.0.0.1:{port}")
        assert f"cluster.id={cid}\n" in (broker.data / "meta.properties").read_text()
        assert broker.answers()
    finally:
        broker.stop()


def test_a_failed_format_names_the_cause_in_whole_lines(local_broker, tmp_path):
    if local_broker is None:
        pytest.skip("RECUR_BOOTSTRAP names an external broker")
    settings = load_settings({k: v for k, v in os.environ.items() if k == "RECUR_CACHE_DIR"}, {"var_dir": str(tmp_path)})
    broker = kafka_local.LocalKafka(settings)
    broker.home.mkdir(parents=True)
    (broker.home / "log4j.properties").write_text("")
    with pytest.raises(BrokerError) as err:
        broker._format(tmp_path / "missing.properties")
    assert str(err.value) == ('kafka: formatting the log dir failed: Exception in thread "main" '
                              f"java.nio.file.NoSuchFileException: {tmp_path / 'missing.properties'}")
