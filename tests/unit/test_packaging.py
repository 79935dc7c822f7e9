"""The built wheel carries what an installed recur needs at run time besides its modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_the_bf16_kernel_source(tmp_path: Path) -> None:
    """`models/bf16.py` compiles `models/native/bf16_topk.c` on first use, so a wheel without it
    falls back to the slower exact scorer; setuptools warns (and may later stop including it)
    when that folder is not a listed package."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("recur-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("models/native/bf16_topk.c") == (ROOT / "models" / "native" / "bf16_topk.c").read_bytes()
        names = set(zf.namelist())
    assert {"models/bf16.py", "pipeline/cli.py", "pipeline/bench/e2e.py"} <= names
