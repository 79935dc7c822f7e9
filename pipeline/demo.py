"""`recur demo`: the whole path on one machine, start to finish.

Starts the local broker (unless RECUR_BOOTSTRAP is set), creates topics, trains a
small model on synthetic events if the registry has none, starts the worker as a
subprocess, streams synthetic events, prints a sample of the recommendations as
they arrive, then stops the worker and the broker cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from models.artifacts import current_version
from pipeline.clients import consume, create_topics, end_offsets, produce_events, shift_to_now
from pipeline.config import Settings


def _say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def run_demo(settings: Settings, n_events: int) -> int:
    broker = None
    worker = None
    try:
        if settings.local:
            from pipeline.kafka_local import LocalKafka

            broker = LocalKafka(settings)
            started = time.monotonic()
            _say(broker.start() + f" in {time.monotonic() - started:.1f}s")
        created = create_topics(settings)
        _say(f"topics ready ({', '.join(created) or 'already there'})")
        if current_version(settings.models_path) is None:
            _say("no model in the registry: training a small one on 20000 synthetic events")
            subprocess.run([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", "train",
                            "--synthetic", "20000", "--epochs", "4", "--no-refit", "--publish",
                            "--out", str(settings.models_path)], check=True)
        _say(f"model {current_version(settings.models_path)}")
        log_path = settings.var_path / "demo-worker.log"
        env = {**os.environ, "RECUR_BOOTSTRAP": settings.bootstrap_servers}
        with open(log_path, "wb") as log_file:
            worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=env,
                                      stdout=log_file, stderr=subprocess.STDOUT)
        _say(f"worker started (pid {worker.pid}, log {log_path})")
        start = end_offsets(settings, settings.recommendations_topic)
        from models.synthetic import SyntheticConfig, generate

        events = shift_to_now(generate(SyntheticConfig(n_events=n_events, n_users=200, seed=11)))
        n = produce_events(settings, events)
        _say(f"produced {n} synthetic events for 200 users")
        got, strategies, shown = 0, {}, 0
        for _key, value, _h in consume(settings, settings.recommendations_topic, n, 60.0, start_offsets=start):
            rec = json.loads(value)
            got += 1
            strategies[rec["strategy"]] = strategies.get(rec["strategy"], 0) + 1
            if got % max(1, n // 8) == 1 and shown < 8:
                shown += 1
                top = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in rec["items"][:5])
                _say(f"{rec['user_id']} event {rec['event_id']} -> {top}, ... "
                     f"[{len(rec['items'])} items, {rec['strategy']}]")
        _say(f"received {got} recommendations for {n} events; by strategy {strategies}")
        return 0 if got == n else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(60)
                _say(f"worker stopped (exit {code})")
            except subprocess.TimeoutExpired:
                worker.kill()
                _say("worker did not stop within 60s; killed")
        if broker is not None:
            _say(broker.stop())
