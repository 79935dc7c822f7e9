"""`recur worker --processes N`: N workers on one machine, in one consumer group, under one parent.

Each child is a plain `recur worker` with its own table folder (<var_dir>/workers/<n>), web port
(web_port + n) and metrics port (metrics_port + n); the model registry and the snapshot folder are
the parent's, shared. Kafka's consumer group spreads the partitions over the children (more
partitions than children, or some idle). The parent forwards SIGTERM and SIGINT to every child and
exits 0 only when all of them stopped with 0. It restarts nothing: when a child exits on its own,
the parent says which and with what code, stops the others and exits 1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from pipeline.config import Settings

log = logging.getLogger(__name__)


def child_env(settings: Settings, n: int) -> dict[str, str]:
    """The settings of child `n`, as RECUR_* variables."""
    return {
        **settings.to_env(),
        "RECUR_VAR_DIR": str(settings.var_path / "workers" / str(n)),
        "RECUR_MODELS_DIR": str(settings.models_path),
        "RECUR_SNAPSHOT_DIR": settings.snapshot_root,
        "RECUR_WEB_PORT": str(settings.web_port + n),
        "RECUR_METRICS_PORT": str(settings.metrics_port + n if settings.metrics_port else 0),
    }


def run_group(settings: Settings, processes: int) -> int:
    children = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"],
                                 env={**os.environ, **child_env(settings, n)}) for n in range(processes)]
    ports = ", ".join(str(settings.metrics_port + n) for n in range(processes)) if settings.metrics_port else "off"
    log.info("worker group: %d workers (pids %s), metrics on %s:%s", processes,
             " ".join(str(c.pid) for c in children), settings.metrics_host, ports)
    stopping = False
    failed: list[str] = []

    def stop_all(signum: int = signal.SIGTERM, frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    while any(child.poll() is None for child in children):
        for n, child in enumerate(children):
            code = child.poll()
            if code is not None and not stopping:
                failed.append(f"worker {n} (pid {child.pid}) exited with code {code}")
                log.error("worker group: %s on its own; stopping the others (nothing is restarted)", failed[-1])
                stop_all()
        time.sleep(0.2)
    codes = [child.returncode for child in children]
    if failed or any(codes):
        log.error("worker group: stopped; exit codes %s", codes)
        return 1
    log.info("worker group: all %d workers stopped cleanly", processes)
    return 0
