"""The retraining gate, pure: which sessions train the challenger, which are held out, how the
live model and the challenger are scored on the same held-out events, and the decision.

The service around it (reading snapshots, the registry lock, publishing, metrics) is
`pipeline/retrain.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.baselines import popular
from models.data import Session, index_sessions
from models.errors import ConfigError, DataError
from models.evaluate import evaluate_model, evaluate_scorer
from models.lstm import RecurrentRecommender
from models.vocab import Vocabulary

METRICS = ("mrr@20", "recall@20", "ndcg@20")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '7d', '2w' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"retrain: {text!r} is not a duration such as 90s, 30m, 1h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@dataclass(frozen=True)
class Holdout:
    """The newest part of the window, held out as the test: a share of sessions ('5%') or a
    time span ('1h': sessions that start within the last hour of the data)."""

    fraction: float = 0.0
    seconds: float = 0.0

    @staticmethod
    def parse(text: str) -> Holdout:
        text = str(text).strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 < share < 1:
                raise ConfigError(f"retrain: holdout {text!r} must be a share between 0% and 100%, or a duration")
            return Holdout(fraction=share)
        return Holdout(seconds=parse_duration(text))

    def describe(self) -> str:
        return f"{self.fraction:.0%} newest sessions" if self.fraction else f"sessions of the last {self.seconds:g} s"


@dataclass(frozen=True)
class GateConfig:
    window_s: float = 7 * 86400  # sessions that ended within this span before the newest event
    holdout: Holdout = Holdout(fraction=0.05)  # the newest part, the test both models are scored on
    metric: str = "mrr@20"  # the metric the decision compares
    margin: float = 0.005  # publish when challenger >= live - margin
    min_train_sessions: int = 50  # fewer sessions of two or more events: the run fails, nothing published
    min_test_events: int = 100  # fewer held-out next events to predict: the run fails

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"retrain: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.margin < 0:
            raise ConfigError("retrain: margin must be >= 0")


@dataclass
class Split:
    train: list[Session]
    test: list[Session]
    data_start: float  # Unix seconds: first event of the window
    data_end: float  # newest event
    test_start: float  # first event of the held-out part
    dropped_old: int  # sessions outside the window


def split_window(sessions: Sequence[Session], cfg: GateConfig) -> Split:
    """Sessions (start-time order) -> the window's training part and its newest, held-out part.
    Raises DataError when either is too small to judge a model by."""
    if not sessions:
        raise DataError("retrain: no sessions in the data (has the worker written snapshots yet?)")
    end = max(s.times[-1] for s in sessions)
    kept = [s for s in sessions if s.times[-1] >= end - cfg.window_s]
    if cfg.holdout.fraction:
        n_test = max(1, int(len(kept) * cfg.holdout.fraction))
        train, test = kept[:-n_test], kept[-n_test:]
    else:
        cut = end - cfg.holdout.seconds
        train = [s for s in kept if s.times[0] < cut]
        test = [s for s in kept if s.times[0] >= cut]
    n_train = sum(1 for s in train if len(s) >= 2)
    n_test = sum(len(s) - 1 for s in test)
    if n_train < cfg.min_train_sessions:
        raise DataError(f"retrain: too little data: {n_train} training sessions of two or more events in the "
                        f"window (need {cfg.min_train_sessions})")
    if n_test < cfg.min_test_events:
        raise DataError(f"retrain: too little held-out data: {n_test} next events in the {cfg.holdout.describe()} "
                        f"(need {cfg.min_test_events})")
    return Split(train, test, min(s.times[0] for s in kept), end, test[0].times[0], len(sessions) - len(kept))


def held_out_metrics(model: RecurrentRecommender, vocab: Vocabulary, test: Sequence[Session], k: int = 20,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Recall/MRR/NDCG@k of `model` over every next event of `test`, the same events for any model:
    events on items the model does not know are skipped as inputs (as the worker does) and
    count as misses as targets, so a model is not flattered by what it cannot see."""
    total = sum(len(s) - 1 for s in test)
    result = evaluate_model(model, index_sessions(test, vocab), k=k, device=device)
    return _over_all(result, total, k)


def popularity_metrics(train: Sequence[Session], vocab: Vocabulary, test: Sequence[Session],
                       k: int = 20) -> dict[str, float]:
    """The most-popular baseline of the training part, on the same held-out events."""
    total = sum(len(s) - 1 for s in test)
    scorer = popular(index_sessions(train, vocab), len(vocab))
    return _over_all(evaluate_scorer(scorer, index_sessions(test, vocab), k=k), total, k)


def _over_all(result: dict[str, float], total: int, k: int) -> dict[str, float]:
    n = result["n"]
    scale = n / total if total else 0.0
    out = {f"{name}@{k}": result[f"{name}@{k}"] * scale for name in ("recall", "mrr", "ndcg")}
    return {**out, "predicted": n, "events": total}


@dataclass
class Decision:
    publish: bool
    reason: str


def decide(live: dict[str, float] | None, challenger: dict[str, float], popularity: dict[str, float],
           cfg: GateConfig) -> Decision:
    """Publish the challenger when it beats the popularity baseline and is at least as good as the
    live model within the margin, on the held-out events."""
    name = cfg.metric
    c = challenger[name]
    if c <= popularity[name]:
        return Decision(False, f"challenger {name} {c:.4f} is not above the most-popular baseline's "
                               f"{popularity[name]:.4f}")
    if live is None:
        return Decision(True, f"no live model; challenger {name} {c:.4f} beats the most-popular baseline's "
                              f"{popularity[name]:.4f}")
    floor = live[name] - cfg.margin
    if c >= floor:
        return Decision(True, f"challenger {name} {c:.4f} >= live {live[name]:.4f} - margin {cfg.margin:g}")
    return Decision(False, f"challenger {name} {c:.4f} < live {live[name]:.4f} - margin {cfg.margin:g}")
