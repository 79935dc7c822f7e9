"""`recur bench e2e` with tiny sizes against the real broker: the three phases run, the
numbers agree with each other, and the run removes what it made."""

import tempfile
import time
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient

from models.scorers import choose
from pipeline.bench.e2e import run_e2e_bench
from pipeline.config import load_settings

pytestmark = pytest.mark.integration


def test_bench_e2e_smoke_run_reports_consistent_numbers_and_removes_its_topics(bootstrap, tmp_path):
    settings = load_settings({"RECUR_BOOTSTRAP": bootstrap, "RECUR_DEVICE": "cpu", "RECUR_VAR_DIR": str(tmp_path),
                              "RECUR_SNAPSHOT_INTERVAL": "5"})
    said: list[str] = []
    plot = tmp_path / "bench.png"
    ours = ("recur-bench-", "recur-floor-")  # the run's folder, and the empty agent's (it leaked one a run)
    before = {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(ours)}
    result = run_e2e_bench(settings, n_events=3000, n_users=300, n_items=500, embedding_dim=16, hidden_dim=32,
                           latency_seconds=3.0, plot=str(plot), say=said.append, workers=[1, 2])
    passthrough, worker = result["passthrough_events_per_s"], result["worker_events_per_s"]
    assert passthrough > 0 and worker > 0 and result["faust_empty_agent_events_per_s"] > 0
    # the empty agent ran before and after the worker, each over every preloaded event; the ratio's
    # denominator is their mean
    before_run, after_run = result["faust_empty_agent_runs"]
    assert before_run > 0 and after_run > 0
    assert result["faust_empty_agent_events_per_s"] == pytest.approx((before_run + after_run) / 2, abs=0.1)
    # the JSON rounds each number from the unrounded rates: compare within that rounding
    assert result["ratio"] == pytest.approx(worker / passthrough, abs=0.001)
    assert result["workers_first_to_last"]["1"] == worker and result["workers_first_to_last"]["2"] > 0
    assert result["workers"]["1"] > 0 and result["workers"]["2"] > 0  # steady rates: two processes, every list sent
    assert result["scaling"] == pytest.approx(result["workers"]["2"] / result["workers"]["1"], abs=0.002)
    assert result["worker_to_empty_agent"] == pytest.approx(worker / result["faust_empty_agent_events_per_s"], abs=0.002)
    # the worker's own word for its scorer: auto's choice on this machine for 500 items on a CPU
    assert result["worker_scorer"] == choose(settings.scorer_config(), torch.device("cpu"), 500)
    assert result["offered_events_per_s"] == pytest.approx(worker / 2, abs=0.1)
    latency = result["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] < 30_000
    assert result["latency_samples"] >= int(result["offered_events_per_s"] * 3.0 * 0.9)  # every paced event answered
    assert plot.stat().st_size > 1000
    assert any(line.startswith("deleted ") for line in said)
    assert result["settle_seconds"] is not None and result["settle_seconds"] < 30  # snapshots caught up first
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 15
        while (left := [t for t in admin.list_topics() if t.startswith(f"{result['config']['run']}")]) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        admin.close()
    assert left == []
    assert {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(ours)} == before


def test_bench_recovery_smoke_run_restores_every_user_and_reports_its_rate(bootstrap, tmp_path):
    from pipeline.bench.recovery import run_recovery_bench

    settings = load_settings({"RECUR_BOOTSTRAP": bootstrap, "RECUR_DEVICE": "cpu", "RECUR_VAR_DIR": str(tmp_path),
                              "RECUR_USERS_COUNT_INTERVAL": "0.5"})
    said: list[str] = []
    result = run_recovery_bench(settings, 3000, said.append)
    assert result["users"] == 3000 and result["restore_seconds"] > 0
    assert result["users_per_s"] == pytest.approx(3000 / result["restore_seconds"], rel=0.02)  # seconds are rounded
    assert result["users_restored"] == 3000  # the restored worker counts every user
    assert result["changelog_bytes"] >= 3000 * 500 and result["store_bytes"] > 0  # ~850-byte states
    assert 0 < result["restore_seconds"] < result["ready_seconds"]
    assert any(line.startswith("deleted ") for line in said)


def test_bench_paced_load_sends_every_event_once_at_its_rate_in_the_key_partition(stack):
    import asyncio
    import json

    from kafka import TopicPartition
    from kafka.admin import NewTopic

    from pipeline.bench.loads import _paced
    from pipeline.clients import admin, reader
    from pipeline.producing import partitions_for

    s = stack.settings
    warmup = f"{s.events_topic}-warmup"
    client = admin(s)
    try:
        client.create_topics([NewTopic(warmup, 1, 1)])
    finally:
        client.close()
    ticks: list[float] = []
    sent = asyncio.run(_paced(s, s.events_topic, warmup, 400.0, 2.0, 50, ["a", "b", "c"], ticks.append))
    assert 0.9 * 800 <= sent <= 800  # 400 events/s for 2 s, less what fell due after the last round
    assert ticks == sorted(ticks) and ticks[-1] < 2.0 and len(ticks) >= 50  # rounds of ~5 ms
    consumer = reader(s)
    try:
        partitions = sorted(consumer.partitions_for_topic(s.events_topic))
        consumer.assign([TopicPartition(s.events_topic, p) for p in partitions])
        consumer.seek_to_beginning()
        records, deadline = [], time.monotonic() + 30
        while len(records) < sent and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
    finally:
        consumer.close()
    assert len(records) == sent
    events = [json.loads(r.value) for r in records]
    assert sorted(int(e["event_id"][3:]) for e in events) == list(range(sent))  # each once
    assert all(r.key == e["user_id"].encode() for r, e in zip(records, events))
    # in the partition the default partitioner picks for the key, as the worker's table expects
    assert [r.partition for r in records] == partitions_for([r.key for r in records], partitions)
    by_id = {e["event_id"]: e for e in events}
    assert by_id["lat51"]["user_id"] == "u1" and by_id["lat51"]["item_id"] == "a"  # user n % 50, item n % 3
