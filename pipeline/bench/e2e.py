"""`recur bench e2e`: the worker end to end through the broker, against the floors in `loads.py`.

    recur bench e2e --json [--events 200000] [--users 100000] [--plot bench-e2e.png]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.artifacts import Artifact, publish_version, save_artifact
from models.lstm import ModelConfig, RecurrentRecommender
from models.scorers import INDEX_FILE
from models.vocab import Vocabulary
from pipeline import worker_process
from pipeline.bench.loads import _faust_floor, _paced, _passthrough, _preload
from pipeline.config import Settings


def _emission_span(settings, topic: str, n_records: int, stall_s: float, worker, log_name: str) -> float:  # noqa: ANN001
    """Seconds from the first to the last `emitted_at` once `topic` holds `n_records`.

    Watches the end offsets instead of reading every record while the worker runs: a reader
    decoding 200,000 records beside the worker took half a core from it on a 2-core machine
    (the passthrough loop in (a) has no such neighbour). Then it reads only the first and the
    last record of each partition (each partition's records are in the order they were sent)."""
    import json

    from kafka import TopicPartition

    from pipeline.clients import reader

    consumer = reader(settings)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        done, last_change = 0, time.monotonic()
        while True:
            ends = consumer.end_offsets(parts)
            total = sum(ends.values())
            if total >= n_records:
                break
            if total > done:
                done, last_change = total, time.monotonic()
            if worker.poll() is not None:
                raise RuntimeError(f"bench: the worker exited (code {worker.returncode}) after {total} of "
                                   f"{n_records} recommendations; see {log_name}")
            if time.monotonic() - last_change > stall_s:
                raise RuntimeError(f"bench: the worker sent {total} of {n_records} recommendations and then "
                                   f"nothing for {stall_s:.0f}s; see {log_name}")
            time.sleep(0.2)

        def emitted_at(tp, offset: int) -> int:  # noqa: ANN001
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=1000, max_records=1).values():
                    return json.loads(records[0].value)["emitted_at"]
            raise RuntimeError(f"bench: could not read offset {offset} of {topic}")

        first = min(emitted_at(tp, 0) for tp in parts if ends[tp])
        last = max(emitted_at(tp, ends[tp] - 1) for tp in parts if ends[tp])
        return max(last - first, 1) / 1000
    finally:
        consumer.close()


def _worker_scorer(port: int) -> str | None:
    """The scorer the worker says it ranks with (`recur_model_info{scorer}`); None if unreadable."""
    import re

    try:
        text = worker_process.metrics_text(port)
    except OSError:  # URLError is one
        return None
    match = re.search(r'^recur_model_info\{[^}]*scorer="([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


STEADY = (0.1, 0.9)  # the share of a run's lists between which its steady rate is taken


def steady_rate(emitted_ms: list[int], lo: float = STEADY[0], hi: float = STEADY[1]) -> float:
    """Events per second between the `lo` and `hi` quantiles of the lists' emission times (ms):
    a run's rate without its start and its end. A worker group's start holds a rebalance: the
    first process to join takes every partition and starts, the next one's join stops both for a
    few seconds (`group.initial.rebalance.delay.ms=0` on the local broker), which the first-to-last
    span counts as throughput."""
    times = sorted(emitted_ms)
    first, last = int(lo * (len(times) - 1)), int(hi * (len(times) - 1))
    return (last - first) / max((times[last] - times[first]) / 1000, 1e-3)


def _emission_times(settings, topic: str, n_records: int) -> list[int]:  # noqa: ANN001
    """Every list's `emitted_at` in `topic` (read after the run: not beside the worker)."""
    import orjson

    from pipeline.clients import consume

    return [orjson.loads(raw)["emitted_at"] for _k, raw, _h in consume(settings, topic, n_records, 30.0)]


def _wait_for_snapshots(settings, n_records: int, timeout_s: float) -> float | None:  # noqa: ANN001
    """Wait until the worker's snapshot consumer has committed `n_records` events of the events
    topic (written them to Parquet): the backlog's last work. -> seconds waited, None on timeout."""
    from kafka import TopicPartition

    from pipeline.clients import reader
    from pipeline.snapshots import snapshot_group

    commits = reader(settings, snapshot_group(settings.app_id))  # never subscribes: reads the group's commits
    started = time.monotonic()
    try:
        parts = [TopicPartition(settings.events_topic, p)
                 for p in sorted(commits.partitions_for_topic(settings.events_topic) or ())]
        while time.monotonic() - started < timeout_s:
            if sum(commits.committed(tp) or 0 for tp in parts) >= n_records:
                return time.monotonic() - started
            time.sleep(1.0)
        return None
    finally:
        commits.close(autocommit=False)


def _group_rate(settings: Settings, processes: int, n_events: int, folder: str,
                say: Callable[[str], None]) -> tuple[float, float]:
    """`recur worker --processes N` in a consumer group of its own over the same preloaded events,
    its lists to a topic of its own; -> events per second (first to last list, steady)."""
    import dataclasses
    import os
    import subprocess
    import sys

    from pipeline.clients import create_topics

    tag = f"{settings.app_id}-w{processes}"
    group = dataclasses.replace(settings, app_id=tag, recommendations_topic=f"{tag}-recs", metrics_port=0,
                                var_dir=os.path.join(folder, tag), web_port=worker_process.free_ports(processes))
    create_topics(group)
    log_path = os.path.join(folder, f"{tag}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--processes", str(processes)],
                                env={**os.environ, **group.to_env()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        span = _emission_span(group, group.recommendations_topic, n_events, 120.0, proc, log_path)
    finally:
        worker_process.stop(proc)
    return n_events / span, steady_rate(_emission_times(group, group.recommendations_topic, n_events))


def run_e2e_bench(settings: Settings, n_events: int, n_users: int, n_items: int, embedding_dim: int,
                  hidden_dim: int, latency_seconds: float, plot: str | None, say: Callable[[str], None],
                  artifact: Artifact | None = None, swap: bool = False, workers: list[int] | None = None,
                  latency_rate: float | None = None) -> dict:
    """`artifact`: the worker's model (its catalogue sets the items); None = untrained weights over
    `n_items`. `swap`: publish the model again halfway through the paced load (the worker loads it
    and builds its scorer in a thread, then swaps) and report the latency around the swap.
    `latency_rate`: events/s of the paced load; None = half the single worker's measured rate
    (a given rate lets two runs, or two builds, compare their latency at the same load)."""
    import asyncio
    import dataclasses
    import json
    import os
    import shutil
    import tempfile

    from kafka.admin import NewTopic

    from pipeline.clients import admin, consume, create_topics, delete_topics_with_prefix, end_offsets
    from pipeline.kafka_local import start_if_needed

    broker, line = start_if_needed(settings)
    say(line)
    run = time.strftime("%Y%m%d%H%M%S")
    settings = dataclasses.replace(settings, app_id=f"bench-{run}", events_topic=f"bench-{run}-events",
                                   recommendations_topic=f"bench-{run}-recs", dlq_topic=f"bench-{run}-dlq")
    worker = None
    try:
        create_topics(settings)
        say(f"preloading {n_events} events for {n_users} users")
        if artifact is None:
            torch.manual_seed(0)
            model = RecurrentRecommender(ModelConfig(n_items=n_items, embedding_dim=embedding_dim,
                                                     hidden_dim=hidden_dim))
            artifact = Artifact(model, Vocabulary([f"i{n}" for n in range(n_items)]), {"source": "bench"}, Path())
        names = artifact.vocab.items
        n_items = len(names)
        embedding_dim, hidden_dim = artifact.model.config.embedding_dim, artifact.model.config.hidden_dim
        _preload(settings, settings.events_topic, n_events, n_users, names)
        say("(a) plain aiokafka consume-and-produce loop")
        passthrough = asyncio.run(_passthrough(settings.bootstrap_servers, settings.events_topic,
                                               f"bench-{run}-passthrough", n_events))
        say(f"    {passthrough:.0f} events/s")
        registry = tempfile.mkdtemp(prefix="recur-bench-")
        say("(a') an empty faust agent: batches and acks, nothing else (faust's own cost)")
        floor_before = _faust_floor(settings, n_events, registry, "floor-before")
        say(f"    {floor_before:.0f} events/s (run again at the end)")
        first_version = _publish(registry, artifact, "bench")
        worker_settings = dataclasses.replace(settings, bootstrap=settings.bootstrap_servers, models_dir=registry,
                                              var_dir=registry, metrics_port=worker_process.free_port(),
                                              log_level="warning")
        say("(b) recur worker on the same topic")
        worker = worker_process.start(worker_settings, os.path.join(registry, "worker.log"))
        span = _emission_span(settings, settings.recommendations_topic, n_events, 120.0, worker, str(worker.log_path))
        worker_eps = n_events / span
        scorer = _worker_scorer(worker_settings.metrics_port)
        say(f"    {worker_eps:.0f} events/s (scorer {scorer})")
        settled = None
        if settings.snapshot_interval > 0:
            # (b2...) and (c) measure without it: first let the worker finish the backlog's last work,
            # its snapshot consumer writing those events to Parquet (up to one snapshot interval)
            say("    waiting for the worker's snapshots of the backlog")
            settled = _wait_for_snapshots(settings, n_events, settings.snapshot_interval + 60)
            say(f"    settled after {settled:.0f}s" if settled is not None else "    snapshots still behind; going on")
        per_count: dict[int, float] = {}  # steady rates (steady_rate), for the scaling
        full_span: dict[int, float] = {}
        if workers:
            per_count[1], full_span[1] = steady_rate(_emission_times(settings, settings.recommendations_topic,
                                                                     n_events)), worker_eps
            say(f"    steady (lists {STEADY[0]:.0%} to {STEADY[1]:.0%}): {per_count[1]:.0f} events/s")
        for count in sorted(set(workers or []) - {1}):
            say(f"(b{count}) recur worker --processes {count}, a consumer group of its own, the same events")
            full_span[count], per_count[count] = _group_rate(worker_settings, count, n_events, registry, say)
            say(f"    {full_span[count]:.0f} events/s; steady: {per_count[count]:.0f}")
        rate = latency_rate if latency_rate else worker_eps / 2
        say(f"(c) latency at {rate:.0f} events/s for {latency_seconds:.0f}s")
        start = end_offsets(settings, settings.recommendations_topic)
        warmup = admin(settings)  # the paced producer's start goes to a topic of its own (loads._paced)
        try:
            warmup.create_topics([NewTopic(f"bench-{run}-warmup", 1, 1)])
        finally:
            warmup.close()
        publisher: threading.Thread | None = None
        published_ms = 0

        def tick(elapsed: float) -> None:
            nonlocal publisher, published_ms
            if swap and publisher is None and elapsed >= latency_seconds / 2:
                published_ms = int(time.time() * 1000)
                publisher = threading.Thread(target=_publish, args=(registry, artifact, "bench swap"))
                publisher.start()

        sent = asyncio.run(_paced(settings, settings.events_topic, f"bench-{run}-warmup", rate, latency_seconds,
                                  n_users, names, tick))
        if publisher is not None:
            publisher.join()
        timeline = []  # (ms since the first event, latency ms)
        swapped_ms = None  # event time of the first recommendation by the republished model
        for _k, raw, _h in consume(settings, settings.recommendations_topic, sent, 30.0, start_offsets=start):
            rec = json.loads(raw)
            timeline.append((rec["event_timestamp"], rec["emitted_at"] - rec["event_timestamp"]))
            if swap and rec["model_version"] not in (first_version, "none"):
                swapped_ms = min(swapped_ms or rec["event_timestamp"], rec["event_timestamp"])
        around = sorted(lat for t, lat in timeline if published_ms - 2000 <= t <= (swapped_ms or published_ms) + 5000)
        first_ms = min((t for t, _ in timeline), default=0)
        timeline = sorted((t - first_ms, lat) for t, lat in timeline)
        latencies = sorted(lat for _, lat in timeline)

        def pct(p: float) -> float:
            return _pct(latencies, p)

        # the empty agent again, the worker stopped: this VM's speed drifts by more than a change
        # moves the ratio within minutes, so the worker's run is bracketed and compared with the mean
        worker_process.stop(worker)
        say("(a'') the empty faust agent again, after the worker")
        floor_after = _faust_floor(settings, n_events, registry, "floor-after")
        floor = (floor_before + floor_after) / 2
        say(f"    {floor_after:.0f} events/s; mean of the two runs {floor:.0f}, worker / mean {worker_eps / floor:.3f}")

        result: dict[str, Any] = {
            "passthrough_events_per_s": round(passthrough, 1),
            "worker_events_per_s": round(worker_eps, 1),
            "ratio": round(worker_eps / passthrough, 3),
            "faust_empty_agent_events_per_s": round(floor, 1),  # the mean of the runs before and after
            "faust_empty_agent_runs": [round(floor_before, 1), round(floor_after, 1)],
            "faust_empty_agent_ratio": round(floor / passthrough, 3),
            "worker_to_empty_agent": round(worker_eps / floor, 3),
            "worker_scorer": scorer,  # what the worker's recur_model_info says ranked the items
            # per process count: events/s between the 10% and 90% of the lists (steady_rate), and
            # first to last list (the start of a group holds a rebalance)
            "workers": None if not workers else {str(c): round(r, 1) for c, r in per_count.items()},
            "workers_first_to_last": None if not workers else {str(c): round(r, 1) for c, r in full_span.items()},
            "scaling": None if len(per_count) < 2 else round(per_count[max(per_count)] / per_count[1], 3),
            "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
            "offered_events_per_s": round(rate, 1),
            "latency_samples": len(latencies),
            "settle_seconds": None if settled is None else round(settled, 1),
            "swap": None if not swap else {
                "swapped": swapped_ms is not None,
                "seconds_from_publish_to_first_list_of_the_new_version":
                    None if swapped_ms is None else round((swapped_ms - published_ms) / 1000, 2),
                "latency_ms_around": {  # events from 2 s before the publish to 5 s after the swap
                    "samples": len(around), "p50": _pct(around, 0.5), "p99": _pct(around, 0.99),
                    "max": float(around[-1]) if around else float("nan")},
                "scorer": settings.scorer},
            "config": {"run": f"bench-{run}", "events": n_events, "users": n_users, "items": n_items,
                       "embedding_dim": embedding_dim, "members": artifact.model.config.members,
                       "hidden_dim": hidden_dim, "device": settings.device, "max_batch": settings.max_batch},
        }
        if plot:
            _plot(result, timeline, plot)
            result["plot"] = plot
        shutil.rmtree(registry, ignore_errors=True)  # model, worker state and snapshots of this run (~70 MB)
        return result
    finally:
        if worker is not None:
            worker_process.stop(worker)
        try:  # the run's topics (events, outputs, faust's changelog) hold ~100 MB a run
            say(f"deleted {len(delete_topics_with_prefix(settings, f'bench-{run}'))} topics of this run")
        except Exception as e:  # the numbers stand; say what was left behind
            say(f"could not delete this run's topics (bench-{run}-*): {type(e).__name__}")
        if broker is not None:
            say(broker.stop())


def _publish(registry: str, artifact: Artifact, source: str) -> str:
    """Publish `artifact`'s model as a new version of `registry`, with its stored ann index if it
    has one (`recur train` stores it for large catalogues). -> the version."""
    import shutil

    path = save_artifact(registry, artifact.model, artifact.vocab, {"source": source})
    for name in (INDEX_FILE, INDEX_FILE + ".json"):
        if artifact.path and (artifact.path / name).exists():
            shutil.copy(artifact.path / name, path / name)
    publish_version(registry, path.name)
    return path.name


def _pct(ordered: list, p: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))]) if ordered else float("nan")


def _plot(result: dict, timeline: list[tuple[float, float]], path: str) -> None:
    """Throughput bars, the latency distribution, and latency over the paced run (stalls show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    names = ["aiokafka\npassthrough", "empty\nfaust agent", "recur\nworker"]
    values = [result["passthrough_events_per_s"], result["faust_empty_agent_events_per_s"], result["worker_events_per_s"]]
    a.bar(names, values, color=["#888", "#bbb", "#2a7"])
    a.set_ylabel("events / s")
    a.set_title(f"throughput (ratio {result['ratio']:.2f})")
    for x, v in enumerate(values):
        a.text(x, v, f"{v:.0f}", ha="center", va="bottom")
    if timeline:
        xs = sorted(lat for _, lat in timeline)
        b.plot(xs, [i / len(xs) for i in range(1, len(xs) + 1)], color="#27a")
        for p in ("p50", "p95", "p99"):
            b.axvline(result["latency_ms"][p], ls="--", lw=0.8, color="#a33")
            b.text(result["latency_ms"][p], 0.02, p, rotation=90, color="#a33")
        c.plot([t / 1000 for t, _ in timeline], [lat for _, lat in timeline], ".", ms=1, color="#27a")
    b.set_xlabel("event timestamp -> recommendation sent (ms)")
    b.set_ylabel("share of events")
    b.set_title(f"latency at {result['offered_events_per_s']:.0f} events/s")
    c.set_xlabel("event time (s since the first paced event)")
    c.set_ylabel("latency (ms)")
    c.set_title("latency over the paced run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
