import socket

import pytest

from models.errors import BrokerError
from pipeline.config import load_settings
from pipeline.kafka_local import LocalKafka, error_lines, new_cluster_id
from pipeline.worker_process import free_ports

STORAGE_TOOL_USAGE_ERROR = """log4j:WARN No appenders could be found for logger (kafka.utils.Log4jControllerRegistration$).
log4j:WARN Please initialize the log4j system properly.
usage: kafka-storage format [-h] --config CONFIG --cluster-id CLUSTER_ID
                     [--add-scram ADD_SCRAM] [--ignore-formatted]
                     [--release-version RELEASE_VERSION]
kafka-storage: error: argument --cluster-id/-t: expected one argument
"""

STACK_TRACE = """log4j:WARN Please initialize the log4j system properly.
Exception in thread "main" java.nio.file.NoSuchFileException: /tmp/nonexist.properties
\tat java.base/sun.nio.fs.UnixException.translateToIOException(UnixException.java:92)
\tat java.base/sun.nio.fs.UnixException.rethrowAsIOException(UnixException.java:106)
\t... 12 more
"""


def test_error_lines_are_whole_lines_without_usage_or_stack_frames():
    # the old message was the last 300 characters of stderr, cut mid-word
    assert error_lines(STORAGE_TOOL_USAGE_ERROR) == "kafka-storage: error: argument --cluster-id/-t: expected one argument"
    assert error_lines(STACK_TRACE) == 'Exception in thread "main" java.nio.file.NoSuchFileException: /tmp/nonexist.properties'
    assert error_lines("one\ntwo\nthree\nfour\n") == "two | three | four"
    assert error_lines("") == "no output"


def test_cluster_ids_are_kafka_sized_and_url_safe():
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 22 and "=" not in i and "/" not in i and "+" not in i for i in ids)
    assert any(i.startswith("-") for i in ids)  # 1 in 64: why the storage tool gets --cluster-id=<id>


def test_a_taken_controller_port_is_named_before_the_broker_is_started(tmp_path):
    # the broker binds port + 1 for its controller; taken, it used to exit with only "code 1; see server.log"
    port = free_ports(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + 1))
        holder.listen()
        broker = LocalKafka(load_settings({}, {"var_dir": str(tmp_path), "kafka_port": port}))
        with pytest.raises(BrokerError) as err:
            broker.start()
    assert str(err.value).startswith(f"kafka: port {port + 1} (the controller's, RECUR_KAFKA_PORT + 1) is taken")
    assert broker.pid() is None and not (broker.home / "kafka.out").exists()  # nothing was started


def test_the_broker_jvm_gets_the_configured_options_and_compiles_with_c1_only_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    default = LocalKafka(load_settings({}, {"var_dir": str(tmp_path)}))._java("kafka.Kafka", "server.properties")
    assert "-XX:TieredStopAtLevel=1" in default
    assert default[-2:] == ["kafka.Kafka", "server.properties"]  # the options come before the main class
    own = LocalKafka(load_settings({"RECUR_KAFKA_JVM_OPTS": "-XX:+UseSerialGC  -Xss512k"}, {"var_dir": str(tmp_path)}))
    cmd = own._java("kafka.Kafka", "server.properties")
    assert "-XX:TieredStopAtLevel=1" not in cmd
    assert cmd.index("-Xss512k") == cmd.index("-XX:+UseSerialGC") + 1 < cmd.index("kafka.Kafka")
    empty = LocalKafka(load_settings({"RECUR_KAFKA_JVM_OPTS": ""}, {"var_dir": str(tmp_path)}))._java("kafka.Kafka")
    assert "" not in empty and not any(arg.startswith("-XX:Tiered") for arg in empty)
