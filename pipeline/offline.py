"""`recur train` and `recur evaluate`: flags, progress and output around the core."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from models import data
from models.artifacts import load_artifact, publish_version, save_artifact
from models.baselines import BASELINES, build_baseline
from models.data import DEFAULT_SESSION_GAP_S, index_sessions
from models.errors import ConfigError
from models.evaluate import evaluate_model, evaluate_scorer
from models.lstm import RecurrentRecommender, resolve_device
from models.scorers import INDEX_FILE, SCORERS, AnnScorer, build_scorer, choose
from models.train import TrainConfig, train
from models.vocab import Vocabulary
from pipeline import snapshot_files
from pipeline.config import Settings

FORMATS = (*data.FORMATS, "parquet")  # parquet: the worker's snapshots


def read_sessions(path: str, fmt: str, session_gap_s: float = DEFAULT_SESSION_GAP_S,
                  window_s: float | None = None) -> list[data.Session]:
    """A file (session-tsv, jsonl) or a snapshot folder (parquet) -> sessions by start time; with
    `window_s`, a snapshot folder's files of older event hours are not read."""
    if fmt == "parquet":
        return snapshot_files.read_sessions(path, session_gap_s, window_s)
    return data.read_sessions(path, fmt, session_gap_s)


# the model and training flags `recur train`, `recur retrain` and `recur tune` share; their defaults
# (None on the command line) come from a --config file when given, else from here. These were chosen
# by `recur tune` on yoochoose-100k's training part (docs/performance.md, "Tuning"): an LSTM with
# attention over its last 5 outputs, scoring by scaled cosine, dropout 0.36, a high learning rate;
# three such models trained from different seeds, their scores summed (Recall@20 0.641 -> 0.653)
MODEL_DEFAULTS = dict(embedding_dim=96, hidden_dim=192, layers=1, cell="lstm", attention_window=5, dropout=0.36,
                      score_scale=10.0, members=3)
TRAIN_DEFAULTS = dict(epochs=TrainConfig.epochs, batch_size=128, lr=0.0083, loss="auto",
                      max_minutes=TrainConfig.max_minutes, valid_fraction=TrainConfig.valid_fraction,
                      uniform_negatives=TrainConfig.uniform_negatives, seed=TrainConfig.seed,
                      weight_decay=TrainConfig.weight_decay)
TUNABLE = {**MODEL_DEFAULTS, **TRAIN_DEFAULTS}  # the keys a --config file may set


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = TUNABLE
    p.add_argument("--config", metavar="JSON", help="model and training settings from a file (as `recur tune` "
                   "writes it); flags given on the command line win")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--session-gap", type=float, default=DEFAULT_SESSION_GAP_S, help="seconds of inactivity that cut a session (default 1800)")
    p.add_argument("--epochs", type=int, help=f"max epochs (default {d['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"sessions per batch (default {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"Adam weight decay (default {d['weight_decay']})")
    p.add_argument("--loss", choices=["auto", "ce", "sampled"], help="auto = full softmax up to 50k items (default auto)")
    p.add_argument("--max-minutes", type=float, help=f"wall-clock cap (default {d['max_minutes']:g})")
    p.add_argument("--valid-fraction", type=float,
                   help=f"newest share of sessions for early stopping (default {d['valid_fraction']})")
    p.add_argument("--uniform-negatives", type=float,
                   help="sampled loss: share of negatives drawn uniformly over the catalogue, so that rarely seen "
                        f"items are pushed down too (default {d['uniform_negatives']})")
    p.add_argument("--seed", type=int, help=f"(default {d['seed']})")
    p.add_argument("--embedding-dim", type=int, help=f"(default {d['embedding_dim']})")
    p.add_argument("--hidden-dim", type=int, help=f"(default {d['hidden_dim']})")
    p.add_argument("--layers", type=int, help=f"stacked recurrent layers (default {d['layers']})")
    p.add_argument("--cell", choices=["lstm", "gru"], help=f"(default {d['cell']})")
    p.add_argument("--attention-window", type=int, help="attend over the last W outputs, 0 = off "
                   f"(default {d['attention_window']})")
    p.add_argument("--dropout", type=float, help=f"(default {d['dropout']})")
    p.add_argument("--members", type=int, help="models trained from different seeds whose scores are summed; "
                   f"1 = a single model (the step does every member's work) (default {d['members']})")
    p.add_argument("--score-scale", type=float, help="> 0: score = scale * cosine(query, item) + bias, with "
                   f"normalised vectors; 0 = inner products (default {d['score_scale']})")


def read_config_file(path: str) -> dict:
    """A --config file -> its settings; unknown keys are an error, not ignored."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot be read as JSON ({e})") from None
    values = raw.get("params", raw) if isinstance(raw, dict) else None  # `recur tune` writes {"params": ...}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a JSON object of settings")
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(TUNABLE))})")
    return values


def model_and_train_config(args: argparse.Namespace, device: torch.device) -> tuple[dict, TrainConfig]:
    """Flags over --config over the defaults -> (ModelConfig fields without n_items, TrainConfig)."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    v = {k: (getattr(args, k) if getattr(args, k, None) is not None else from_file.get(k, default))
         for k, default in TUNABLE.items()}
    model_config = dict(embedding_dim=v["embedding_dim"], hidden_dim=v["hidden_dim"], num_layers=v["layers"],
                        cell=v["cell"], attention_window=v["attention_window"], dropout=v["dropout"],
                        score_scale=v["score_scale"], members=v["members"])
    cfg = TrainConfig(epochs=v["epochs"], batch_size=v["batch_size"], lr=v["lr"], loss=v["loss"],
                      max_minutes=v["max_minutes"], refit=not args.no_refit, seed=v["seed"], device=str(device),
                      valid_fraction=v["valid_fraction"], uniform_negatives=v["uniform_negatives"],
                      weight_decay=v["weight_decay"])
    return model_config, cfg


def add_train_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="training data: a file, or a snapshot folder with --format parquet")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic events instead")
    p.add_argument("--synthetic-items", type=int, default=1000,
                   help="with --synthetic: catalogue size, all of it in the model (default 1000)")
    p.add_argument("--synthetic-users", type=int, default=500, help="with --synthetic: users (default 500)")
    p.add_argument("--format", choices=FORMATS, help="format of --data")
    p.add_argument("--out", help="model registry to write the new version into (default var/models)")
    p.add_argument("--publish", action="store_true", help="make the new version CURRENT (the worker picks it up)")
    add_model_args(p)
    p.add_argument("--no-refit", action="store_true", help="skip the final refit on all data")
    p.add_argument("--models-dir", help=argparse.SUPPRESS)


def _progress_printer(bar: tqdm):
    def on_progress(p: dict) -> None:
        if p.get("done"):
            metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items() if k not in ("done",)}
            bar.write(json.dumps(metrics), file=sys.stderr)
            return
        if p["batch"] == 1:
            bar.reset(total=p["batches"])
            member = f"member {p['member']}/{p['members']} " if "member" in p else ""
            bar.set_description(f"{member}{p['phase']} epoch {p['epoch']}")
        bar.update(1)
        bar.set_postfix(loss=f"{p['loss']:.3f}")

    return on_progress


def train_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.data and not args.format:
        raise ConfigError("train: --data needs --format session-tsv|jsonl|parquet")
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    catalog: list[str] = []
    if args.synthetic:
        from models.synthetic import SyntheticConfig, synthetic_sessions

        syn = SyntheticConfig(n_events=args.synthetic, n_items=args.synthetic_items,
                              n_users=args.synthetic_users)
        print(f"train: generating {syn.n_events} synthetic events over {syn.n_items} items", file=sys.stderr)
        sessions, catalog = synthetic_sessions(syn)
        source = f"synthetic:{args.synthetic}:items={syn.n_items}"
    else:
        sessions = read_sessions(args.data, args.format, args.session_gap)
        source = str(args.data)
    print(f"train: {len(sessions)} sessions, {sum(len(s) for s in sessions)} events from {source} on {device}",
          file=sys.stderr)
    model_config, cfg = model_and_train_config(args, device)
    with tqdm(unit="batch", file=sys.stderr, leave=False, mininterval=2.0, disable=None) as bar:
        result = train(sessions, model_config, cfg, on_progress=_progress_printer(bar), catalog=catalog)
    meta = {**result.metadata(cfg), "source": source}
    registry = args.out or settings.models_path
    path = save_artifact(registry, result.model.cpu(), result.vocab, meta)
    index_seconds = store_ann_index(path, result.model, settings)
    if args.publish:
        publish_version(registry, path.name)
    best = result.best
    print(json.dumps({
        "artifact": str(path),
        "published": bool(args.publish),
        "training_seconds": round(result.seconds, 1),
        "items": len(result.vocab),
        "ann_index_seconds": index_seconds,
        "validation": {k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()},
    }))
    return 0


def store_ann_index(path: Path, model: RecurrentRecommender, settings: Settings) -> float | None:
    """For a catalogue that a CPU worker serves with ann (RECUR_SCORER, RECUR_ANN_MIN_ITEMS), build
    the index of `model` (just saved at `path`) now and store it with the artifact, before it is
    published: the worker then reads it instead of spending ~34 s of its cores on it while it serves.
    -> seconds, None when not needed."""
    config = dataclasses.replace(settings.scorer_config(), threads=0)  # all cores: nothing else runs here
    if choose(config, torch.device("cpu"), model.config.n_items) != "ann":
        return None
    print(f"train: building the ann index for {model.config.n_items} items", file=sys.stderr)
    scorer = AnnScorer(model, config)
    scorer.save(path / INDEX_FILE, json.loads((path / "meta.json").read_text())["weights_sha256"])
    return round(scorer.build_seconds, 1)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="model artifact folder or registry (its CURRENT version)")
    who.add_argument("--baseline", choices=BASELINES, help="evaluate a baseline built from --train")
    p.add_argument("--train", help="training data for --baseline")
    p.add_argument("--data", required=True, help="test data")
    p.add_argument("--format", choices=FORMATS, required=True, help="format of --data (and --train)")
    p.add_argument("--k", type=int, default=20, help="cut-off (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto")
    p.add_argument("--session-gap", type=float, default=DEFAULT_SESSION_GAP_S)
    p.add_argument("--scorer", choices=list(SCORERS), dest="top_scorer",
                   help="rank within the top-k of the worker's scorer (ann: approximate search) instead of "
                        "from every item's score; its settings from RECUR_ANN_* (see recur config)")


def evaluate_command(args: argparse.Namespace, settings: Settings) -> int:
    test = read_sessions(args.data, args.format, args.session_gap)
    top_scorer = None
    if args.model:
        device = resolve_device(args.device)
        artifact = load_artifact(args.model, device)
        vocab = artifact.vocab
        indexed = index_sessions(test, vocab)
        total = sum(len(s.items) - 1 for s in indexed)
        if args.top_scorer:
            top_scorer = build_scorer(artifact.model, dataclasses.replace(settings.scorer_config(), kind=args.top_scorer),
                                  device)
        with tqdm(total=total, unit="pred", file=sys.stderr, leave=False, desc="evaluate", disable=None) as bar:
            result = evaluate_model(artifact.model, indexed, k=args.k, device=device, progress=bar.update,
                                    scorer=top_scorer)
        name = artifact.version if top_scorer is None else f"{artifact.version} ({top_scorer.name} top-{args.k})"
    else:
        if not args.train:
            raise ConfigError("evaluate: --baseline needs --train PATH")
        train_sessions = read_sessions(args.train, args.format, args.session_gap)
        vocab = Vocabulary.from_sessions(train_sessions)
        scorer = build_baseline(args.baseline, index_sessions(train_sessions, vocab), len(vocab))
        indexed = index_sessions(test, vocab)
        total = sum(len(s.items) - 1 for s in indexed)
        with tqdm(total=total, unit="pred", file=sys.stderr, leave=False, desc=args.baseline, disable=None) as bar:
            result = evaluate_scorer(scorer, indexed, k=args.k, progress=bar.update)
        name = args.baseline
    if args.json:
        print(json.dumps({**result, "scorer": top_scorer.name} if args.model and top_scorer else result))
    else:
        k = args.k
        print(f"{name}: Recall@{k} {result[f'recall@{k}']:.4f}  MRR@{k} {result[f'mrr@{k}']:.4f}  "
              f"NDCG@{k} {result[f'ndcg@{k}']:.4f}  over {result['n']} predictions")
    return 0
