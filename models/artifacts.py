"""Model artifacts and the model registry.

An artifact is a folder:
    config.json   ModelConfig as a dict
    weights.pt    the state_dict (never a pickled model), loaded with weights_only=True
    items.json    the item vocabulary, index order
    meta.json     version, creation time, data range, validation metrics, weights sha256

A registry is a folder of artifacts plus `CURRENT`, a file naming the live version.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import ArtifactError
from models.lstm import ModelConfig, RecurrentRecommender, build_model
from models.vocab import Vocabulary

FORMAT_VERSION = 1
FILES = ("config.json", "weights.pt", "items.json", "meta.json")
POINTER = "CURRENT"


@dataclass
class Artifact:
    model: RecurrentRecommender
    vocab: Vocabulary
    meta: dict
    path: Path

    @property
    def version(self) -> str:
        return self.meta["version"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_artifact(
    registry: str | Path, model: RecurrentRecommender, vocab: Vocabulary, meta: dict, publish: bool = False
) -> Path:
    """Write a new version folder under `registry`; with `publish` make it CURRENT."""
    if model.config.n_items != len(vocab):
        raise ArtifactError("save: model n_items does not match the vocabulary size")
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    staging = registry / f".staging-{stamp}-{os.getpid()}"
    staging.mkdir()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, staging / "weights.pt")
    digest = _sha256(staging / "weights.pt")
    version, n = f"v{stamp}-{digest[:8]}", 1
    while (registry / version).exists():  # the same weights saved again within the same second: a version of its own
        n += 1
        version = f"v{stamp}-{digest[:8]}-{n}"
    (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    (staging / "items.json").write_text(json.dumps(vocab.items))
    full_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_items": len(vocab),
        "weights_sha256": digest,
    }
    (staging / "meta.json").write_text(json.dumps(full_meta, indent=2))
    final = registry / version
    os.replace(staging, final)
    if publish:
        publish_version(registry, version)
    return final


def publish_version(registry: str | Path, version: str) -> None:
    """Point the registry's CURRENT at `version` (atomic rename)."""
    registry = Path(registry)
    if not (registry / version / "meta.json").exists():
        raise ArtifactError(f"publish: no artifact {version!r} in {registry}")
    _write_atomic(registry / POINTER, version + "\n")


def current_version(registry: str | Path) -> str | None:
    pointer = Path(registry) / POINTER
    if not pointer.exists():
        return None
    return pointer.read_text().strip() or None


def resolve(path: str | Path) -> Path:
    """An artifact folder, or a registry whose CURRENT names one -> the artifact folder."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    version = current_version(path)
    if version is None:
        raise ArtifactError(f"load: {path} is neither a model artifact nor a registry with a CURRENT version")
    return path / version


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> Artifact:
    """Load and check an artifact (or a registry's CURRENT one)."""
    folder = resolve(path)
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise ArtifactError(f"load: {folder} lacks {', '.join(missing)}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        raw_config = json.loads((folder / "config.json").read_text())
        items = json.loads((folder / "items.json").read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"load: {folder} has a file that is not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"load: {folder} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        config = ModelConfig(**raw_config)
    except TypeError as e:
        raise ArtifactError(f"load: {folder}/config.json does not match this recur's ModelConfig ({e})") from None
    if config.n_items != len(items) or meta.get("n_items") != len(items):
        raise ArtifactError(f"load: {folder}: config n_items={config.n_items} but items.json has {len(items)}")
    if meta.get("weights_sha256") != _sha256(folder / "weights.pt"):
        raise ArtifactError(f"load: {folder}/weights.pt does not match the checksum in meta.json")
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (0.6 s of
        model = build_model(config)  # CPU at 1,000,000 items, during a live swap)
    try:
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state, assign=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError with long messages
        raise ArtifactError(f"load: {folder}/weights.pt does not fit config.json ({str(e)[:200]})") from None
    model.to(device).eval()
    return Artifact(model, Vocabulary(items), meta, folder)
