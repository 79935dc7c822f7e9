"""`recur bench recovery`: how fast a fresh worker restores users' states from the changelog.

    recur bench recovery --users 1000000 --json

N users' states are written straight to the state changelog of a run of its own (one record each,
the size of a real state: a 2 x 128 float16 vector and 10 recent items, ~850 bytes), then a worker
with an empty table folder starts and faust restores them before it processes anything. Reported:
{"users", "changelog_bytes", "store_bytes", "restore_seconds" (from the first of the bulk restore's
"reading" and faust's "Restoring state" to the last of "written in bulk" and faust's "Done reading",
from the worker's log), "users_per_s", "ready_seconds" (process start to ready), "users_restored"
(the worker's exact count afterwards), "bulk_restore" (RECUR_BULK_RESTORE) and
"records_restored_in_bulk"}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline import worker_process
from pipeline.config import Settings

STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]"


def _state(n: int, vector: np.ndarray) -> bytes:
    from models.online import UserState

    items = [f"item-{(n * 7 + k) % 50000:05d}" for k in range(10)]
    return UserState("bench", n, vector, items, [0] * 10, items[:5], "lstm").encode()


async def _fill(settings: Settings, topic: str, n_users: int, say: Callable[[str], None]) -> int:
    """One state per user on `topic`, keyed (and so partitioned) as the worker keys them. -> bytes sent."""
    from aiokafka import AIOKafkaProducer

    from pipeline import security

    producer = AIOKafkaProducer(acks=1, linger_ms=20, max_batch_size=1 << 20, **security.aiokafka(settings))
    await producer.start()
    vector = np.random.default_rng(0).standard_normal(256).astype(np.float16)
    sent, pending = 0, []
    try:
        for n in range(n_users):
            key, value = f"u{n}".encode(), _state(n, vector)
            sent += len(key) + len(value)
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20000:
                await asyncio.gather(*pending)
                pending.clear()
            if n and n % 200000 == 0:
                say(f"  {n} states written")
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


def _log_time(log: str, text: str) -> float | None:
    match = re.search(STAMP + r"[^\n]*" + re.escape(text), log)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def _users_in_state(port: int, expected: int, timeout: float) -> int:
    """The worker's exact count of users in state, once it reaches `expected` or at `timeout`."""
    deadline, users = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        for line in worker_process.metrics_text(port).splitlines():
            if line.startswith("recur_users_in_state "):
                users = int(float(line.split()[1]))
        if users >= expected:
            break
        time.sleep(0.5)
    return users


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_recovery_bench(settings: Settings, n_users: int, say: Callable[[str], None], timeout_s: float = 1800) -> dict:
    from kafka.admin import NewTopic

    from pipeline.app import changelog_config
    from pipeline.clients import admin, create_topics, delete_topics_with_prefix
    from pipeline.kafka_local import LocalKafka, start_if_needed

    broker, line = start_if_needed(settings)
    say(line)
    run = f"bench-{time.strftime('%Y%m%d%H%M%S')}"
    folder = Path(tempfile.mkdtemp(prefix="recur-bench-recovery-"))
    settings = dataclasses.replace(
        settings, app_id=run, events_topic=f"{run}-events", recommendations_topic=f"{run}-recs",
        dlq_topic=f"{run}-dlq", forget_topic=f"{run}-forget", forget_reports_topic=f"{run}-forget-reports",
        var_dir=str(folder / "var"), models_dir=str(folder / "models"), snapshot_interval=0.0, users_count_interval=1.0,
        metrics_port=worker_process.free_port(), web_port=worker_process.free_port())
    changelog = f"{run}-user-state-changelog"
    worker = None
    try:
        create_topics(settings)
        client = admin(settings)
        try:
            client.create_topics([NewTopic(changelog, settings.partitions, 1, topic_configs=changelog_config(settings))])
        finally:
            client.close()
        say(f"writing {n_users} users' states to {changelog}")
        started = time.monotonic()
        sent = asyncio.run(_fill(settings, changelog, n_users, say))
        say(f"  {sent / 1e6:.0f} MB in {time.monotonic() - started:.0f}s; starting a worker with an empty table folder")
        log_path = folder / "worker.log"
        started = time.monotonic()
        worker = worker_process.start(settings, log_path, env={"PYTHONUNBUFFERED": "1"})
        worker_process.wait_ready(worker, timeout_s)
        ready = time.monotonic() - started
        restored = _users_in_state(settings.metrics_port, n_users, 120.0)
        worker_process.stop(worker)
        worker = None
        log = log_path.read_text()
        begins = [t for t in (_log_time(log, "restore: reading about"), _log_time(log, "Restoring state from changelog topics")) if t]
        ends = [t for t in (_log_time(log, "written in bulk"), _log_time(log, "Done reading from changelog topics")) if t]
        if not begins or not ends:
            raise RuntimeError(f"bench: the worker's log does not show a restore; see {log_path}")
        restore = max(ends) - min(begins)
        bulk = re.search(r"restore: (\d+) changelog records written in bulk", log)
        local = LocalKafka(settings) if settings.local else None
        on_disk = sum(_size(p) for p in (local.data.glob(f"{changelog}-*") if local else []))
        result = {"users": n_users, "changelog_bytes": on_disk or sent, "store_bytes": _size(folder / "var" / "faust"),
                  "restore_seconds": round(restore, 2), "users_per_s": round(n_users / max(restore, 1e-3)),
                  "ready_seconds": round(ready, 2), "state_record_bytes": round(sent / n_users),
                  "users_restored": restored, "bulk_restore": settings.bulk_restore,
                  "records_restored_in_bulk": int(bulk.group(1)) if bulk else 0}
        shutil.rmtree(folder, ignore_errors=True)
        return result
    finally:
        if worker is not None:
            worker_process.stop(worker)
        try:
            say(f"deleted {len(delete_topics_with_prefix(settings, run))} topics of this run")
        except Exception as e:
            say(f"could not delete this run's topics ({run}-*): {type(e).__name__}")
        if broker is not None:
            say(broker.stop())
