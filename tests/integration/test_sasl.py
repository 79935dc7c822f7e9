"""Issue 18: an authenticated broker. The local broker started with SASL/PLAIN (its own, on its
own port, for this module), the worker (with its snapshot consumer), the CLI producer and
consumer against it; a wrong password and a denied topic each give one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline import worker_process
from pipeline.config import load_settings
from pipeline.snapshot_files import read_events

SASL_PORT = 19292  # apart from the test broker's 19192
USER, PASSWORD = "recur", "test-only-password"  # a throwaway broker's users, not secrets
LIMITED, LIMITED_PASSWORD = "limited", "another-test-password"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    if os.environ.get("RECUR_BOOTSTRAP"):
        pytest.skip("RECUR_BOOTSTRAP names an external broker; these tests start a local SASL one")
    from pipeline.kafka_local import LocalKafka

    env = {"RECUR_CACHE_DIR": os.environ["RECUR_CACHE_DIR"]} if "RECUR_CACHE_DIR" in os.environ else {}
    settings = load_settings(env, {"var_dir": str(tmp_path_factory.mktemp("sasl-broker")), "kafka_port": SASL_PORT,
                                   "kafka_heap": "256m", "kafka_sasl": True, "sasl_username": USER,
                                   "sasl_password": PASSWORD, "kafka_sasl_users": f"{LIMITED}:{LIMITED_PASSWORD}"})
    broker = LocalKafka(settings)
    broker.start()
    yield broker
    broker.stop()


def _env(tmp_path, run: str, user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECUR_")}
    env.update({
        "RECUR_BOOTSTRAP": f"127.0.0.1:{SASL_PORT}", "RECUR_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "RECUR_SASL_MECHANISM": "PLAIN", "RECUR_SASL_USERNAME": user, "RECUR_SASL_PASSWORD": password,
        "RECUR_APP_ID": f"recur-sasl-{run}", "RECUR_EVENTS_TOPIC": f"events-{run}",
        "RECUR_RECOMMENDATIONS_TOPIC": f"recs-{run}", "RECUR_DLQ_TOPIC": f"dlq-{run}",
        "RECUR_FORGET_TOPIC": f"forget-{run}", "RECUR_FORGET_REPORTS_TOPIC": f"forget-reports-{run}",
        "RECUR_VAR_DIR": str(tmp_path / "var"), "RECUR_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
        "RECUR_SNAPSHOT_INTERVAL": "1", "RECUR_DEVICE": "cpu",
        "RECUR_WEB_PORT": str(worker_process.free_port()), "RECUR_METRICS_PORT": str(worker_process.free_port()),
    })
    return env


def _recur(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_clear_line(proc: subprocess.CompletedProcess, cause: str) -> str:
    """The command failed with exit code 2 and a last line that names `cause`, no stack trace."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("recur: kafka: ") and cause in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return last


def test_worker_cli_and_snapshots_work_with_credentials_and_a_wrong_password_is_one_clear_line(sasl_broker, model_registry, tmp_path):
    env = _env(tmp_path, "ok")
    env["RECUR_MODELS_DIR"] = str(model_registry)
    assert _recur(env, "topics", "create").returncode == 0
    settings = load_settings({k: v for k, v in env.items() if k.startswith("RECUR_")})
    worker = worker_process.start(settings, tmp_path / "worker.log", env={"PYTHONUNBUFFERED": "1"})
    try:
        worker_process.wait_ready(worker, 90)
        produced = _recur(env, "produce", "--synthetic", "300", "--users", "30", "--quiet")
        assert produced.returncode == 0, produced.stderr[-2000:]
        n = int(produced.stdout.split()[1])  # "produced N events to ..."
        consumed = _recur(env, "consume", "--max", str(n), "--timeout", "30")
        assert consumed.returncode == 0 and len(consumed.stdout.splitlines()) == n  # one list per event
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the snapshot consumer reads through the same credentials
            if (tmp_path / "snapshots").exists() and any((tmp_path / "snapshots").rglob("*.parquet")) \
                    and len(read_events(tmp_path / "snapshots")) >= n:
                break
            time.sleep(0.3)
        assert len(read_events(tmp_path / "snapshots")) == n
    finally:
        assert worker_process.stop(worker) == 0
    wrong = _env(tmp_path, "ok", password="wrong-password")
    lines = []
    for args in (("produce", "--synthetic", "10", "--quiet"), ("consume", "--max", "1", "--timeout", "5"), ("worker",)):
        started = time.monotonic()
        proc = _recur(wrong, *args, timeout=60)
        lines.append(_one_clear_line(proc, f"refused the credentials of user '{USER}'"))
        assert time.monotonic() - started < 20  # at once, not after a client's retries
    print("wrong password:", *lines, sep="\n  ")


def test_a_worker_denied_read_on_the_events_topic_exits_once_with_a_clear_line(sasl_broker, tmp_path):
    from kafka import KafkaAdminClient
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ResourcePattern, ResourceType

    env = _env(tmp_path, "acl", user=LIMITED, password=LIMITED_PASSWORD)
    assert _recur(env, "topics", "create").returncode == 0
    admin = KafkaAdminClient(bootstrap_servers=sasl_broker.bootstrap, **sasl_broker.admin_credentials())
    try:
        done = admin.create_acls([ACL(principal=f"User:{LIMITED}", host="*", operation=ACLOperation.READ,
                                      permission_type=ACLPermissionType.DENY,
                                      resource_pattern=ResourcePattern(ResourceType.TOPIC, env["RECUR_EVENTS_TOPIC"]))])
        assert not done["failed"]
    finally:
        admin.close()
    started = time.monotonic()
    proc = _recur(env, "worker", timeout=60)  # returns: the worker does not retry or restart itself
    line = _one_clear_line(proc, f"user '{LIMITED}' may not read topic '{env['RECUR_EVENTS_TOPIC']}'")
    assert time.monotonic() - started < 30 and proc.stderr.count("may not read topic") == 1
    print("denied:", line)
