"""`recur worker --processes N`: N workers in one consumer group under one parent (issue 17)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import torch

from models.artifacts import load_artifact, save_artifact
from pipeline import worker_process
from pipeline.clients import produce_events

from .conftest import Watcher, metric, scrape
from .test_resilience import _events

READY = worker_process.READY.decode()


def _start_group(stack, n: int, log_path, **extra_env: str):
    metrics, web = worker_process.free_ports(n), worker_process.free_ports(n)
    env = {**stack.env, "RECUR_METRICS_PORT": str(metrics), "RECUR_WEB_PORT": str(web),
           "RECUR_VAR_DIR": str(stack.workdir / "var-group"), **extra_env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--processes", str(n)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while log_path.read_text().count(READY) < n:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.3)
    pids = [int(p) for p in re.search(r"workers \(pids ([\d ]+)\)", log_path.read_text()).group(1).split()]
    return proc, pids, metrics


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _consumed(port: int) -> float:
    from types import SimpleNamespace

    return metric(scrape(SimpleNamespace(metrics_port=port)), "recur_events_consumed_total")


def _model_version_live_in(port: int, version: str) -> float:
    from types import SimpleNamespace

    return metric(scrape(SimpleNamespace(metrics_port=port)), "recur_model_info", f'version="{version}"')


def test_two_processes_share_the_partitions_both_work_and_stop_cleanly_on_sigterm(stack):
    events = _events(3000, 200, seed=61)
    log_path = stack.workdir / "group.log"
    registry = stack.workdir / "registry"
    shutil.copytree(stack.settings.models_path, registry)  # the session's model, in a registry of this test's
    proc, pids, metrics = _start_group(stack, 2, log_path, RECUR_MODELS_DIR=str(registry),
                                       RECUR_MODEL_POLL_INTERVAL="0.5")
    try:
        recs = Watcher(stack.settings, stack.settings.recommendations_topic)
        produce_events(stack.settings, events)
        ids = recs.wait_for_events({e.event_id for e in events}, timeout=90)
        per_event = Counter(v["event_id"] for v in recs.values())
        recs.close()
        per_child = [_consumed(metrics + n) for n in range(2)]
        # a version published to the one registry goes live in every process
        live = load_artifact(registry)
        with torch.no_grad():
            live.model.item_bias.add_(0.01)  # other weights: another version
        new = save_artifact(registry, live.model, live.vocab, {"source": "test"}, publish=True).name
        deadline = time.monotonic() + 60
        while not all(_model_version_live_in(metrics + n, new) == 1 for n in range(2)):
            assert time.monotonic() < deadline, f"version {new} not live in both processes within 60 s"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # to the parent only: it forwards it
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ids >= {e.event_id for e in events}
    assert set(per_event.values()) == {1}  # exactly one recommendation per event
    assert all(n > 0 for n in per_child) and sum(per_child) >= len(events)  # both did work, between them all
    assert code == 0 and not any(_alive(p) for p in pids)  # every child stopped with 0, none left
    assert all((stack.workdir / "var-group" / "workers" / str(n) / "faust").is_dir() for n in range(2))  # own tables
    print(f"worker group: events consumed per process {per_child}; {new} live in both after its publish")


def test_a_child_that_dies_stops_the_group_with_exit_1_and_is_not_restarted(stack):
    log_path = stack.workdir / "group.log"
    proc, pids, _ = _start_group(stack, 2, log_path)
    os.kill(pids[0], signal.SIGKILL)
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert code == 1 and f"worker 0 (pid {pids[0]}) exited with code -9" in text
    assert text.count(READY) == 2 and not _alive(pids[1])  # nothing restarted; the other one was stopped
