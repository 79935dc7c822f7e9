"""`recur tune`: search the model's settings with Optuna (TPE sampler, median pruning of trials that
fall behind after an epoch) on a validation split of the training data; write the best settings
as a --config file for `recur train`, `recur retrain` and `recur tune` itself.

Each trial is `models.train.train` without the refit: it trains on all but the newest
`--valid-fraction` of the sessions and reports the validation metric after every epoch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from models.data import Session
from models.errors import ConfigError
from models.train import TrainConfig, train

log = logging.getLogger(__name__)


def suggest(trial) -> dict:  # noqa: ANN001 - an optuna Trial
    """The search space: the keys of a --config file (pipeline/offline.py TUNABLE)."""
    return {
        "cell": trial.suggest_categorical("cell", ["lstm", "gru"]),
        "layers": trial.suggest_int("layers", 1, 2),
        "embedding_dim": trial.suggest_categorical("embedding_dim", [32, 64, 96, 128]),
        "hidden_dim": trial.suggest_categorical("hidden_dim", [64, 128, 192, 256]),
        "attention_window": trial.suggest_categorical("attention_window", [0, 5, 10]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "score_scale": trial.suggest_categorical("score_scale", [0.0, 6.0, 10.0, 14.0, 20.0]),
        "lr": trial.suggest_float("lr", 1e-3, 2e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
    }


def model_fields(params: dict, base: dict) -> dict:
    """A trial's params over the base ModelConfig fields."""
    out = dict(base)
    for key, field in (("embedding_dim", "embedding_dim"), ("hidden_dim", "hidden_dim"), ("layers", "num_layers"),
                       ("cell", "cell"), ("attention_window", "attention_window"), ("dropout", "dropout"),
                       ("score_scale", "score_scale")):
        if key in params:
            out[field] = params[key]
    return out


def run_tune(sessions: Sequence[Session], base_model: dict, base_train: TrainConfig, trials: int,
             budget_s: float, out: Path, metric: str = "mrr@20", seed: int = 42, source: str = "") -> dict:
    """Search for `trials` trials or `budget_s` seconds, whichever ends first; write `out`; -> the result."""
    import optuna

    if trials < 1 or budget_s <= 0:
        raise ConfigError("tune: --trials must be >= 1 and --time-budget > 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    history: list[dict] = []

    def objective(trial) -> float:  # noqa: ANN001 - an optuna Trial
        params = suggest(trial)
        left_min = max(0.5, (budget_s - (time.monotonic() - started)) / 60)
        cfg = replace(base_train, lr=params["lr"], batch_size=params["batch_size"], refit=False,
                      metric=metric, max_minutes=min(base_train.max_minutes, left_min))

        def on_progress(p: dict) -> None:
            if not p.get("done") or metric not in p:
                return
            trial.report(p[metric], p["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {p[metric]:.4f} after epoch {p['epoch']}")

        t0 = time.monotonic()
        try:
            # single models: the search compares settings; `recur train --config` then trains the
            # configured ensemble of them (MODEL_DEFAULTS' members)
            result = train(sessions, {**model_fields(params, base_model), "members": 1}, cfg, on_progress=on_progress)
        except optuna.TrialPruned as e:
            _say(f"trial {trial.number + 1}/{trials}: pruned ({e}) in {time.monotonic() - t0:.0f} s {params}")
            history.append({"trial": trial.number + 1, "state": "pruned", "params": params})
            raise
        value = float(result.best.get(metric, 0.0))
        best = max([value] + [h["value"] for h in history if h["state"] == "complete"])
        _say(f"trial {trial.number + 1}/{trials}: {metric} {value:.4f} (best {best:.4f}) at epoch "
             f"{result.best.get('epoch')} in {time.monotonic() - t0:.0f} s {params}")
        history.append({"trial": trial.number + 1, "state": "complete", "value": round(value, 4),
                        "recall@20": round(float(result.best.get("recall@20", 0.0)), 4),
                        "epoch": result.best.get("epoch"), "seconds": round(time.monotonic() - t0, 1),
                        "params": params})
        return value

    study.optimize(objective, n_trials=trials, timeout=budget_s, catch=())
    complete = [h for h in history if h["state"] == "complete"]
    if not complete:
        raise ConfigError("tune: no trial completed within the budget; give it more --time-budget")
    best = max(complete, key=lambda h: h["value"])
    result = {"params": best["params"], "metric": metric, "value": best["value"], "recall@20": best["recall@20"],
              "best_trial": best["trial"], "trials": len(history), "complete": len(complete),
              "pruned": len(history) - len(complete), "seconds": round(time.monotonic() - started, 1),
              "data": source, "valid_fraction": base_train.valid_fraction, "history": history}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def _say(line: str) -> None:
    print(f"[tune] {line}", file=sys.stderr, flush=True)
