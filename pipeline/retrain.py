"""`recur retrain`: the loop that closes itself. One run reads the snapshots of a window, trains
a challenger on all but the newest part, scores the live model and the challenger on that
held-out part and publishes the challenger only when the gate (`models/retrain.py`) says so.
`--every 1h` repeats it as a service with /metrics, until SIGTERM.

Each run writes a report: `retrain-report.json` in the challenger's artifact folder (when one
was trained) and `retrain/<time>-<decision>.json` plus `retrain/last.json` in the registry.
`retrain.lock` in the registry keeps two services from publishing at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.artifacts import current_version, load_artifact, publish_version, save_artifact
from models.errors import RecurError, RetrainError
from models.retrain import GateConfig, decide, held_out_metrics, popularity_metrics, split_window
from models.train import TrainConfig, train
from pipeline.config import Settings
from pipeline.metrics import RetrainMetrics

log = logging.getLogger(__name__)

LOCK_FILE = "retrain.lock"
REPORTS_DIR = "retrain"


class Stopped(RecurError):
    """SIGTERM arrived during a run."""


@dataclass
class RetrainJob:
    settings: Settings
    gate: GateConfig
    model_config: dict
    train_config: TrainConfig
    read: Callable[[], list]  # -> the sessions of the source, start-time order
    source: str  # for the report


class RegistryLock:
    """`retrain.lock` in the registry, created exclusively; it names its holder (host, pid, start).
    A lock left by a dead process on this host is taken over; one held elsewhere is respected."""

    def __init__(self, registry: Path) -> None:
        self.path = registry / LOCK_FILE
        self.held = False

    def __enter__(self) -> RegistryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise RetrainError(f"retrain: another run holds {self.path} ({self._describe()}); "
                                       "remove the file if no retrain is running") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(holder, f)
            self.held = True
            return self
        raise RetrainError(f"retrain: could not take {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _describe(self) -> str:
        h = self._holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["since"])) if "since" in h else "?"
        return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {since} UTC"

    def _stale(self) -> bool:
        h = self._holder()
        if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
            return False
        try:
            os.kill(h["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def run_once(job: RetrainJob, stop: threading.Event | None = None,
             metrics: RetrainMetrics | None = None) -> dict:
    """One retraining run -> its report. Never raises for a run that fails: the report says why
    (`decision` "failed") and the live model stays."""
    stop = stop or threading.Event()
    registry = job.settings.models_path
    started = time.time()
    report: dict = {"started_at": _utc(started), "source": job.source, "metric": job.gate.metric,
                    "margin": job.gate.margin, "window_seconds": job.gate.window_s,
                    "holdout": job.gate.holdout.describe(), "registry": str(registry)}
    artifact_path: Path | None = None
    try:
        with RegistryLock(registry):
            artifact_path = _judge(job, stop, report)
            report["pruned"] = prune_rejected(registry, job.settings.retrain_keep_rejected)
    except Stopped:
        report.update(decision="failed", reason="stopped by SIGTERM during the run")
    except (RecurError, OSError) as e:  # no data, too little, a training error, disk full, a held lock
        report.update(decision="failed", reason=str(e))
    except Exception as e:  # a bug in training still must not take the service down or publish
        log.exception("retrain: run failed")
        report.update(decision="failed", reason=f"{type(e).__name__}: {e}")
    finished = time.time()
    report.update(finished_at=_utc(finished), seconds=round(finished - started, 1))
    _write_reports(registry, artifact_path, report)
    if metrics is not None:
        _record(metrics, report, finished)
    log.log(logging.WARNING if report["decision"] == "failed" else logging.INFO, "retrain: %s: %s (%.0f s)",
            report["decision"], report["reason"], report["seconds"])
    return report


def _judge(job: RetrainJob, stop: threading.Event, report: dict) -> Path:
    registry = job.settings.models_path
    gate = job.gate
    sessions = job.read()
    split = split_window(sessions, gate)
    report["data"] = {
        "start": _utc(split.data_start), "end": _utc(split.data_end), "test_start": _utc(split.test_start),
        "train_sessions": len(split.train), "test_sessions": len(split.test),
        "test_events": sum(len(s) - 1 for s in split.test), "sessions_outside_window": split.dropped_old,
    }
    live_version = current_version(registry)
    device = torch.device(job.train_config.device)

    def on_progress(p: dict) -> None:
        if stop.is_set():
            raise Stopped("retrain: stopped")
        if p.get("done"):
            log.info("retrain: %s epoch %s: loss %.3f %s", p["phase"], p["epoch"], p["loss"],
                     f"{gate.metric} {p[gate.metric]:.4f}" if gate.metric in p else "")

    log.info("retrain: training a challenger on %d sessions (%s .. %s); %d held out",
             len(split.train), report["data"]["start"], report["data"]["test_start"], len(split.test))
    result = train(split.train, job.model_config, job.train_config, on_progress=on_progress)
    challenger = held_out_metrics(result.model, result.vocab, split.test, device=device)
    popularity = popularity_metrics(split.train, result.vocab, split.test)
    live = None
    if live_version is not None:
        live_artifact = load_artifact(registry / live_version, device)
        live = held_out_metrics(live_artifact.model, live_artifact.vocab, split.test, device=device)
    decision = decide(live, challenger, popularity, gate)
    report["live"] = {"version": live_version, "metrics": _rounded(live)} if live else None
    report["popularity"] = {"metrics": _rounded(popularity)}
    publish, reason = decision.publish, decision.reason
    if publish and current_version(registry) != live_version:
        publish, reason = False, (f"the live model changed during the run ({live_version} -> "
                                  f"{current_version(registry)}); not published")
    meta = {**result.metadata(job.train_config), "source": job.source,
            "retrain": {"decision": "published" if publish else "rejected", "reason": reason,
                        "held_out": _rounded(challenger), "live_version": live_version}}
    path = save_artifact(registry, result.model.cpu(), result.vocab, meta)
    report["challenger"] = {"version": path.name, "metrics": _rounded(challenger),
                            "training_seconds": round(result.seconds, 1), "items": len(result.vocab)}
    if publish:
        from pipeline.offline import store_ann_index  # a large catalogue: the index goes with the artifact

        store_ann_index(path, result.model, job.settings)
        publish_version(registry, path.name)
    report.update(decision="published" if publish else "rejected", reason=reason,
                  published_version=path.name if publish else None)
    return path


def prune_rejected(registry: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` rejected challengers (never the live version, never one
    that was published): a run every hour would otherwise keep a model a run. -> versions deleted."""
    live = current_version(registry)
    rejected = []
    for folder in registry.glob("v*"):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if folder.name != live and (meta.get("retrain") or {}).get("decision") == "rejected":
            rejected.append(folder)
    rejected.sort(key=lambda f: f.name)  # versions begin with their UTC creation time
    gone = rejected[: max(0, len(rejected) - keep)]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return [f.name for f in gone]


def _write_reports(registry: Path, artifact: Path | None, report: dict) -> None:
    text = json.dumps(report, indent=2)
    try:
        if artifact is not None:
            (artifact / "retrain-report.json").write_text(text)
        folder = registry / REPORTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stamp = report["finished_at"].replace(":", "").replace("-", "")
        (folder / f"{stamp}-{report['decision']}.json").write_text(text)
        tmp = folder / ".last.json.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / "last.json")
    except OSError as e:  # disk full: the log line still says what happened
        log.error("retrain: could not write the report under %s: %s", registry, e)


def _record(m: RetrainMetrics, report: dict, finished: float) -> None:
    m.runs.labels(report["decision"]).inc()
    m.last_duration.set(report["seconds"])
    m.last_run.set(finished)
    if report["decision"] == "failed":
        return
    m.last_success.set(finished)
    if report["decision"] == "published":
        m.last_published.set(finished)
    for model in ("live", "challenger", "popularity"):
        values = (report.get(model) or {}).get("metrics") or {}
        for name in ("recall@20", "mrr@20", "ndcg@20"):
            if name in values:
                m.last_metric.labels(model, name).set(values[name])


def serve(job: RetrainJob, every_s: float, metrics: RetrainMetrics, runs: int = 0) -> int:
    """Run every `every_s` seconds until SIGTERM/SIGINT (or `runs` runs, when > 0) -> exit code 0."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("retrain: %s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done = 0
    while not stop.is_set():
        run_once(job, stop, metrics)
        done += 1
        if runs and done >= runs:
            break
        log.info("retrain: next run in %g s", every_s)
        stop.wait(every_s)
    log.info("retrain: stopped after %d run(s)", done)
    return 0


def gate_config(settings: Settings) -> GateConfig:
    from models.retrain import Holdout, parse_duration

    return GateConfig(window_s=parse_duration(settings.retrain_window), holdout=Holdout.parse(settings.retrain_holdout),
                      metric=settings.retrain_metric, margin=settings.retrain_margin,
                      min_train_sessions=settings.retrain_min_sessions, min_test_events=settings.retrain_min_test_events)
