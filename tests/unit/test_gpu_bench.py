"""deploy/gpu-bench.sh, the one command for the GPU measurements, runs its path on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_measurement_script_runs_on_the_cpu_and_prints_one_json_object_a_line():
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "deploy" / "gpu-bench.sh")], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert "torch" in lines[0]
    runs = lines[1:]
    assert [r["items"] for r in runs] == [5000, 50000, 50000]
    assert all(r["scorer"] == "exact" and r["overlap_at_k"] == 1.0 for r in runs)
    assert all(res["events_per_s"] > 0 for r in runs for res in r["results"])
    assert runs[1]["score_memory_mb"] == 16  # the block budget flag reaches the scorer
