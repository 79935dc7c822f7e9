#!/usr/bin/env bash
# The GPU measurements in one command (docs/performance.md, "On a GPU"): prints one JSON object a line.
#
#   bash deploy/gpu-bench.sh                  on a CUDA machine, from the repository root
#   DEVICE=cpu QUICK=1 bash deploy/gpu-bench.sh   the same path on a CPU, small (tests/unit/test_gpu_bench.py)
#
# Needs python3 with torch, numpy and tqdm only: `recur bench step` imports no broker client, so this
# runs from a plain checkout (PYTHONPATH=.) on a machine where recur is not installed. The model is
# untrained ('--model random'): exact scoring's speed does not depend on the weights' values.
# The worker end to end on the GPU (`recur bench e2e --device cuda`) also needs Java, the Kafka jars
# and faust; it runs last, only where they are present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
step() { PYTHONPATH=. "$PY" -m pipeline.cli bench step --device "$DEVICE" --json --model random --scorer exact "$@"; }

"$PY" - <<PYEOF
import json, platform, torch
dev = "$DEVICE"
print(json.dumps({"device": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "cuda": torch.version.cuda}))
PYEOF
if [ "${QUICK:-0}" = 1 ]; then
    step --items 5000 --batches 1,64,256 --seconds 0.2 --users 10000
    step --items 50000 --batches 64,256 --seconds 0.2 --users 10000 --score-memory-mb 16
    step --items 50000 --batches 64 --seconds 0.2 --users 10000 --gpu-tf32 true
    exit 0
fi
step --items 50000 --batches 1,64,1024,4096 --seconds 3                      # target: >= 1,000,000 events/s at 4,096
step --items 1000000 --batches 64,1024,4096 --seconds 3                      # target: >= 100,000 events/s, exact
step --items 1000000 --batches 1024,4096 --seconds 3 --score-memory-mb 1024  # 1 GiB blocks (a 16 GB card's default)
step --items 1000000 --batches 1024,4096 --seconds 3 --gpu-tf32 true         # TF32 candidates, float32 ranking
step --items 1000000 --batches 4096,16384 --seconds 3 --score-memory-mb 256  # a small block budget: memory stays bounded
if command -v java >/dev/null && "$PY" -c "import faust" 2>/dev/null; then
    PYTHONPATH=. "$PY" -m pipeline.cli bench e2e --device "$DEVICE" --json --plot ''
else
    echo '{"e2e": "not run: this machine lacks java or faust (the broker and the worker need them)"}'
fi
