"""`recur worker` as a child process: how the demo, the benchmarks and the tests run a worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import Settings

READY = b"Worker]: Ready"  # faust's line once the worker consumes


class WorkerProcess(subprocess.Popen):
    """A running `recur worker`, with where its output goes."""

    log_path: Path
    metrics_port: int


def start(settings: Settings, log_path: str | Path, env: dict[str, str] | None = None,
          cwd: str | Path | None = None) -> WorkerProcess:
    """Start a worker with exactly `settings` (passed as RECUR_* variables; `env` on top), its
    output to `log_path`."""
    full_env = {**os.environ, **settings.to_env(), **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = WorkerProcess([sys.executable, "-m", "pipeline.cli", "worker"], env=full_env, stdout=log_file,
                             stderr=subprocess.STDOUT, cwd=cwd)
    proc.log_path = Path(log_path)
    proc.metrics_port = settings.metrics_port
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a worker's web and metrics ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_text(port: int) -> str:
    """A child worker's /metrics page (it serves it on 127.0.0.1); raises OSError when unreadable."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def free_ports(n: int) -> int:
    """A base port such that base .. base + n - 1 on 127.0.0.1 are free now (a worker group's)."""
    while True:
        base = free_port()
        if base + n < 65000 and all(_free(port) for port in range(base, base + n)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_ready(proc: WorkerProcess, timeout: float = 90.0) -> None:
    """Wait until the worker says it is ready; raise with the log's end if it exits or takes too long."""
    log_path = proc.log_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if READY in log_path.read_bytes():
            return
        time.sleep(0.3)
    raise RuntimeError(f"worker not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """SIGTERM (the worker flushes and commits), wait; kill it after `timeout`. -> exit code, None if killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None
