"""An exact scorer with its product in bfloat16: `models/native/bf16_topk.c`, built on first use.

The float32 product of every query with every item is most of what the exact scorer costs, and
the scorer is most of what a worker on one core spends on an event beyond faust's delivery
(docs/performance.md). The kernel takes the product in bfloat16 with float32 sums (AVX-512 BF16,
twice float32's rate), keeps per query the items above a running threshold (no block of scores is
written out or read back), scores those again in float32 and proves, from bfloat16's rounding,
that no item it left out belongs in the k best; a row whose proof fails is scored by
`ExactScorer`. So the result is the float32 top-k (`tests/unit/test_bf16.py` holds it to
`ExactScorer`'s).

It needs Linux on x86-64 with AVX-512 BF16 (`/proc/cpuinfo`: AMD Zen 4 and later, Intel Cooper
Lake and later) and a C compiler on PATH (cc, gcc or clang). It is compiled once per source and CPU
into `native_dir` (a temporary file moved into place, so processes starting together do not race).
Where anything is missing, `load` says why and `auto` keeps `ExactScorer`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from models.lstm import RecurrentRecommender
    from models.scorers import ExactScorer, Exclude

SOURCE = Path(__file__).with_name("native") / "bf16_topk.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-shared", "-fPIC")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
LANES = 32  # the kernel's vectors are padded with zeros to a multiple of this width
KEPT = 48  # items kept per query (M in the kernel): k plus the row's exclusions at most this
ROWS = 64  # queries per call
U = 2.0**-9  # bfloat16's unit roundoff (round to nearest even)

_loaded: dict[str, ctypes.CDLL | str] = {}
_lock = threading.Lock()


def cpu_missing(cpuinfo: str) -> list[str]:
    """The CPU flags the kernel needs that the first processor of `cpuinfo` lacks."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return [f for f in CPU_FLAGS if f not in flags]


def _compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _build(native_dir: Path, cc: str, cpuinfo: str) -> Path:
    """Compile the kernel into `native_dir` unless this source was built there for this CPU."""
    model = next((line for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + model.encode() + cc.encode())
    target = native_dir / f"bf16_topk-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    native_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=native_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(native_dir: Path) -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be used here (one answer per process and folder)."""
    key = str(native_dir)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(native_dir)
        return _loaded[key]


def _load(native_dir: Path) -> ctypes.CDLL | str:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"not Linux on x86-64 ({platform.system()} {platform.machine()})"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return f"/proc/cpuinfo unreadable ({e})"
    missing = cpu_missing(cpuinfo)
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    cc = _compiler()
    if cc is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(native_dir, cc, cpuinfo)))
    except (OSError, subprocess.SubprocessError) as e:
        return f"not built: {e}"
    lib.workspace_bytes.restype = ctypes.c_size_t
    return lib


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class Bf16Scorer:
    """`ExactScorer`'s results, the product in bfloat16; what the kernel cannot take (a GPU, k
    plus a row's exclusions above 48, rows whose proof fails) goes to `exact`. One call at a time
    (a lock): the worker scores from one thread."""

    name = "bf16"

    def __init__(self, lib: ctypes.CDLL, exact: ExactScorer, model: RecurrentRecommender | None = None) -> None:
        """With `model`, its items are laid out here (the loading thread), not at the first call."""
        self.lib, self.exact = lib, exact
        self.rows = 0  # rows scored
        self.rescored = 0  # ... of which scored by `exact` (proof failed, too many exclusions)
        self._lock = threading.Lock()
        self._prepared: tuple | None = None
        self._workspace = np.empty(lib.workspace_bytes() // 4 + 16, dtype=np.float32)
        if model is not None:
            with torch.inference_mode():
                self._prepare(model)

    def _prepare(self, model: RecurrentRecommender) -> tuple:
        """The items as the kernel reads them, for this model's current weights."""
        S = model.scoring_matrix()
        if self._prepared is not None and self._prepared[0] is S:
            return self._prepared
        Sf = S.detach().float().contiguous()  # [item vector | bias], (V, width + 1)
        (V, width), chunks = (Sf.size(0), Sf.size(1) - 1), -(-Sf.size(0) // 64)
        w = -(-width // LANES) * LANES
        W = torch.zeros(chunks * 64, w)
        W[:V, :width] = Sf[:, :width]
        bias = torch.full((chunks * 64,), float("-inf"))  # padding items never pass
        bias[:V] = Sf[:, width]
        # [chunk][4 groups of 16 items][w / 2 pairs of dims][16 items][2]: a pair of dims of 16
        # items in each 64-byte row (the kernel's product_64)
        E = W.to(torch.bfloat16).view(chunks, 4, 16, w // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
        if w != width:  # the float32 rows padded as well, the bias last
            padded = torch.zeros(V, w + 1)
            padded[:, :width], padded[:, w] = Sf[:, :width], Sf[:, width]
            Sf = padded
        emax = float(W.norm(dim=1).max())
        bmax = float(bias[:V].abs().max())
        self._prepared = (S, E.view(torch.int16).numpy(), bias.numpy(), chunks, Sf.numpy(), w, emax, bmax)
        return self._prepared

    def __call__(self, model: RecurrentRecommender, queries: torch.Tensor, k: int,
                 exclude: Exclude | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        widest = max((len(x) for x in exclude), default=0) if exclude is not None else 0
        if queries.device.type != "cpu" or k > KEPT or queries.size(0) == 0:
            return self.exact(model, queries, k, exclude)
        with self._lock:
            return self._score(model, queries, k, min(KEPT, k + widest), exclude)

    def _score(self, model: RecurrentRecommender, queries: torch.Tensor, k: int, kk: int,
               exclude: Exclude | None) -> tuple[torch.Tensor, torch.Tensor]:
        _, E, bias, chunks, S, w, emax, bmax = self._prepare(model)
        B = queries.size(0)
        padded = -(-B // 4) * 4  # the kernel's product takes queries four at a time
        qf = np.zeros((padded, w), dtype=np.float32)
        qf[:B, : queries.size(1)] = queries.detach().float().numpy()
        qb = torch.from_numpy(qf).to(torch.bfloat16).view(torch.int16).numpy()
        top_v = np.empty((padded, kk), dtype=np.float32)
        top_i = np.empty((padded, kk), dtype=np.int32)
        tau = np.empty(padded, dtype=np.float32)
        kth = np.empty(padded, dtype=np.float32)
        workspace = self._workspace[(-self._workspace.ctypes.data // 4) % 16:]  # 64-byte aligned
        for s in range(0, padded, ROWS):
            n = min(ROWS, padded - s)
            self.lib.score_topk(_ptr(qb[s:]), _ptr(E), _ptr(bias), n, chunks, w, _ptr(qf[s:]), _ptr(S), kk,
                                _ptr(top_v[s:]), _ptr(top_i[s:]), _ptr(tau[s:]), _ptr(kth[s:]), _ptr(workspace))
        # |q.e - bf16(q).bf16(e)| <= (2u + u^2) |q| |e|; 1e-5 relative and 1e-6 of the largest bias
        # cover the float32 sums on both sides
        bound = (2 * U + U**2 + 1e-5) * np.linalg.norm(qf[:B], axis=1) * emax + 1e-6 * bmax
        ok = kth[:B] > tau[:B] + bound
        keep = np.ones((B, kk), dtype=bool)
        if exclude is not None and kk > k:
            # the rows' exclusions side by side (-1 pads; no item is -1), compared with every kept
            # item at once: one numpy call for the batch where np.isin per row took ~20 us a row
            excluded = np.full((B, kk - k), -1, dtype=np.int32)
            for r, row in enumerate(exclude):
                if len(row) > kk - k:
                    ok[r] = False  # more than the kernel kept past k: ExactScorer below
                elif len(row):
                    excluded[r, : len(row)] = row
            keep = ~(top_i[:B, :, None] == excluded[:, None, :]).any(axis=2)
        elif exclude is not None:
            ok &= np.array([not len(row) for row in exclude], dtype=bool)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the k best not excluded, best first
        values = torch.from_numpy(np.take_along_axis(top_v[:B], order, axis=1))
        items = torch.from_numpy(np.take_along_axis(top_i[:B], order, axis=1).astype(np.int64))
        self.rows += B
        if not ok.all():
            bad = np.flatnonzero(~ok)
            self.rescored += len(bad)
            sub = [exclude[int(r)] for r in bad] if exclude is not None else None
            values[bad], items[bad] = self.exact(model, queries[torch.from_numpy(bad)], k, sub)
        return values, items
