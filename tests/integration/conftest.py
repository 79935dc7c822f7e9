"""Integration fixtures: a real Kafka broker for the session, fresh topics and app ids
per test, a small trained model, and the worker as a subprocess.

With RECUR_BOOTSTRAP set, that broker is used and nothing is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from models.artifacts import save_artifact
from models.data import sessionize
from models.events import Event
from models.synthetic import SyntheticConfig, generate
from models.train import TrainConfig, train
from pipeline import worker_process
from pipeline.clients import consume, create_topics
from pipeline.config import Settings, load_settings

pytestmark = pytest.mark.integration
TEST_KAFKA_PORT = 19192  # apart from the development broker's 19092


@pytest.fixture(scope="session")
def local_broker(tmp_path_factory):
    """The broker recur started for this session, or None when RECUR_BOOTSTRAP names one."""
    if os.environ.get("RECUR_BOOTSTRAP"):
        yield None
        return
    from pipeline.kafka_local import LocalKafka

    settings = load_settings({k: v for k, v in os.environ.items() if k == "RECUR_CACHE_DIR"},
                             {"var_dir": str(tmp_path_factory.mktemp("broker")), "kafka_port": TEST_KAFKA_PORT})
    broker = LocalKafka(settings)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def bootstrap(local_broker) -> str:
    """A broker for the whole session: RECUR_BOOTSTRAP, or a local one started here."""
    return os.environ["RECUR_BOOTSTRAP"] if local_broker is None else local_broker.bootstrap


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory) -> Path:
    """A registry with a small model trained on the synthetic catalog (1000 items)."""
    registry = tmp_path_factory.mktemp("models")
    sessions = sorted(sessionize(generate(SyntheticConfig(n_events=15000, seed=3))), key=lambda s: s.times[0])
    result = train(sessions, dict(embedding_dim=32, hidden_dim=48), TrainConfig(epochs=3, refit=False, seed=1))
    save_artifact(registry, result.model, result.vocab, {"source": "tests"}, publish=True)
    return registry


@pytest.fixture(scope="session")
def foreign_registry(tmp_path_factory) -> Path:
    """A registry whose model was trained on another shop: none of the synthetic items."""
    registry = tmp_path_factory.mktemp("foreign-models")
    events = [Event(e.user_id, e.item_id.replace("item-", "shop-"), e.event_type, e.timestamp_ms)
              for e in generate(SyntheticConfig(n_events=3000, seed=4))]
    result = train(sessionize(events), dict(embedding_dim=8, hidden_dim=8), TrainConfig(epochs=1, refit=False, seed=1))
    save_artifact(registry, result.model, result.vocab, {"source": "another shop"}, publish=True)
    return registry


@dataclass
class Stack:
    """One test's topics, app id and folders on the shared broker."""

    settings: Settings
    env: dict[str, str]
    workdir: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, name: str = "w", timeout: float = 90.0, **extra_env: str) -> subprocess.Popen:
        """Start `recur worker` as a subprocess; wait until faust says it is ready."""
        env = {**self.env, "RECUR_WEB_PORT": str(worker_process.free_port()), "RECUR_METRICS_PORT": str(worker_process.free_port()),
               "RECUR_VAR_DIR": str(self.workdir / f"var-{name}"), **extra_env}
        settings = load_settings({k: v for k, v in env.items() if k.startswith("RECUR_")})
        proc = worker_process.start(settings, self.workdir / f"worker-{name}-{len(self.workers)}.log",
                                    env={"PYTHONUNBUFFERED": "1"}, cwd=self.workdir)
        self.workers.append(proc)
        try:
            worker_process.wait_ready(proc, timeout)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        return proc

    def stop_worker(self, proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
        return worker_process.stop(proc, timeout)

    def recommendations(self, expected: int, timeout: float = 60.0) -> list[tuple[bytes, dict]]:
        """Read the recommendations topic from the start until `expected` records or a quiet `timeout`."""
        out = []
        for key, value, _ in consume(self.settings, self.settings.recommendations_topic, expected, timeout):
            if value is not None:  # tombstones: forgotten users
                out.append((key, json.loads(value)))
        return out

    def dead_letters(self, expected: int, timeout: float = 30.0) -> list[tuple[bytes, bytes, dict]]:
        out = []
        for key, value, headers in consume(self.settings, self.settings.dlq_topic, expected, timeout):
            out.append((key, value, {k: v.decode() for k, v in headers}))
        return out


@pytest.fixture
def stack(bootstrap, model_registry, tmp_path) -> Stack:
    run = uuid.uuid4().hex[:8]
    values = {
        "RECUR_BOOTSTRAP": bootstrap,
        "RECUR_APP_ID": f"recur-test-{run}",
        "RECUR_EVENTS_TOPIC": f"events-{run}",
        "RECUR_RECOMMENDATIONS_TOPIC": f"recs-{run}",
        "RECUR_DLQ_TOPIC": f"dlq-{run}",
        "RECUR_FORGET_TOPIC": f"forget-{run}",
        "RECUR_FORGET_REPORTS_TOPIC": f"forget-reports-{run}",
        "RECUR_MODELS_DIR": str(model_registry),
        "RECUR_DEVICE": "cpu",
        "RECUR_LOG_LEVEL": "info",
    }
    settings = load_settings(values)
    create_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECUR_")}
    env.update(values)
    env["PYTHONUNBUFFERED"] = "1"
    s = Stack(settings, env, tmp_path)
    yield s
    for proc in s.workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def scrape(worker) -> str:
    """The worker's /metrics text."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, labels: str | None = None) -> float:
    """The sum of a metric's samples (those with `labels`, e.g. 'version="v1"', when given)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels is None or labels in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_metric(worker, name: str, done, labels: str | None = None, timeout: float = 60.0) -> float:
    """Scrape until `done(value)`; -> the value (the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric(scrape(worker), name, labels)
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def send_raw(settings: Settings, records) -> list[tuple[int, int]]:
    """Publish raw (key, value) records; -> (partition, offset) of each, as the broker stored it."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        futures = [producer.send(settings.events_topic, key=k, value=v) for k, v in records]
        producer.flush()
        return [(f.get(30).partition, f.get(30).offset) for f in futures]
    finally:
        producer.close()


class Watcher:
    """Follows a topic from its start, for tests that act mid-stream."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                      enable_auto_commit=False)
        parts = [TopicPartition(topic, p) for p in range(settings.partitions)]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.records: list = []
        self._values: list[dict] = []
        self.event_ids: set[str] = set()  # for recommendation topics

    def poll(self) -> int:
        for batch in self.consumer.poll(timeout_ms=500).values():
            self.records.extend(batch)
            for r in batch:
                if r.value is None:  # a forgotten user's tombstone
                    continue
                value = json.loads(r.value)
                self._values.append(value)
                if isinstance(value, dict) and "event_id" in value:
                    self.event_ids.add(value["event_id"])
        return len(self.records)

    def wait_for_events(self, ids: set[str], timeout: float = 120.0) -> set[str]:
        """Poll until every id in `ids` has a recommendation, or `timeout`."""
        deadline = time.monotonic() + timeout
        while not ids <= self.event_ids and time.monotonic() < deadline:
            self.poll()
        return self.event_ids

    def wait_for(self, n: int, timeout: float = 90.0, quiet: float = 0.0) -> int:
        """Poll until at least `n` records (then `quiet` more seconds), or `timeout`."""
        deadline = time.monotonic() + timeout
        while self.poll() < n and time.monotonic() < deadline:
            pass
        end = time.monotonic() + quiet
        while time.monotonic() < end:
            self.poll()
        return len(self.records)

    def values(self) -> list[dict]:
        return list(self._values)

    def close(self) -> None:
        self.consumer.close()


def latest_states(settings: Settings, timeout: float = 10.0) -> dict[str, bytes]:
    """The last value per key of the state table's changelog topic."""
    topic = f"{settings.app_id}-user-state-changelog"
    states = {}
    for key, value, _ in consume(settings, topic, 0, timeout):
        states[key.decode()] = value
    return states


def offline_states(artifact, events) -> dict:
    """Replay each user's events once, in order, through the same step, with the worker's
    float16 storage between events. -> user -> float16 state vector."""
    import numpy as np
    import torch

    from models.lstm import init_state, step

    out = {}
    for e in events:
        state = out.get(e.user_id)
        vec = torch.from_numpy(state).float().unsqueeze(0) if state is not None else init_state(artifact.model.config, 1)
        idx = artifact.vocab.get(e.item_id)
        if idx >= 0:
            vec = step(artifact.model, vec, torch.tensor([idx]), torch.tensor([e.event_type])).state
        out[e.user_id] = vec[0].to(torch.float16).numpy().astype(np.float16)
    return out


def expected_lists(artifact, events, k: int = 20, rewarm_at: dict | None = None) -> dict[str, list[str]]:
    """Replay each user's events through the same step, as the worker does with purchases allowed
    in lists (RECUR_EXCLUDE_PURCHASED=false): float16 state between events; with `rewarm_at`
    {user: index of the user's first event under this model}, the state before it is rebuilt as a
    swap does (the earlier events in one float32 pass, then float16). Events on items the model
    does not know are left out. -> event id -> expected top-k item ids."""
    import torch

    from models.lstm import init_state, step

    per_user: dict[str, list] = {}
    for e in events:
        per_user.setdefault(e.user_id, []).append(e)
    out = {}
    for user, evs in per_user.items():
        first = (rewarm_at or {}).get(user, 0)
        state = init_state(artifact.model.config, 1)
        for n, e in enumerate(evs):
            idx = artifact.vocab.get(e.item_id)
            if idx < 0:
                continue
            result = step(artifact.model, state, torch.tensor([idx]), torch.tensor([e.event_type]))
            state, scores = result.state, result.scores
            if n + 1 >= first:
                state = state.half().float()  # stored as float16 between batches
            if n >= first:
                out[e.event_id] = [artifact.vocab.items[j] for j in torch.topk(scores[0], k).indices.tolist()]
    return out
