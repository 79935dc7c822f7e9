"""The `recur` command's arguments: every subcommand and flag (the commands: `pipeline/cli.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import ENV_PREFIX, SCORERS, Settings

_DEFAULTS = Settings()
COMPUTED_DEFAULTS = {"bootstrap": "the local broker", "models_dir": "<var_dir>/models",
                     "snapshot_dir": "<var_dir>/snapshots", "retrain_every": "one run"}  # settings whose "" means these


def setting_flag(p: argparse.ArgumentParser, flag: str, text: str, **kwargs: Any) -> None:
    """A flag that overrides a setting (`--max-wait` -> `max_wait`); its help shows the setting's
    default, taken from `Settings`, so that the two cannot drift apart."""
    name = flag[2:].replace("-", "_")
    name = kwargs.get("dest", name)
    default = str(COMPUTED_DEFAULTS.get(name) or getattr(_DEFAULTS, name)).replace("%", "%%")
    p.add_argument(flag, help=f"{text} (default {default}; env {ENV_PREFIX}{name.upper()})", **kwargs)


def _broker_flags(p: argparse.ArgumentParser) -> None:
    setting_flag(p, "--bootstrap", "existing broker host:port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recur", description="Streaming LSTM recommender on Kafka.")
    setting_flag(parser, "--log-level", "log level", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the effective settings")

    p = sub.add_parser("kafka", help="the local single-node Kafka")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--sasl", dest="kafka_sasl", action="store_const", const=True, default=None,
                   help="start: require SASL/PLAIN on the client port; the user is RECUR_SASL_USERNAME with "
                        "RECUR_SASL_PASSWORD, more in RECUR_KAFKA_SASL_USERS=name:password,... "
                        "(default False; env RECUR_KAFKA_SASL)")

    p = sub.add_parser("topics", help="create the topics")
    p.add_argument("action", choices=["create"])
    setting_flag(p, "--partitions", "partitions per topic", type=int)
    _broker_flags(p)

    p = sub.add_parser("worker", help="run the streaming worker")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="N workers in one consumer group under this process, each with its own table folder, "
                        "web port (web port + n) and metrics port (metrics port + n) (default 1)")
    _broker_flags(p)
    setting_flag(p, "--store", "table store", choices=["rocksdb", "memory"])
    setting_flag(p, "--device", "auto, cpu or cuda")
    setting_flag(p, "--max-batch", "events per batch at most", type=int)
    setting_flag(p, "--max-wait", "seconds to wait for more events once one is there", type=float)
    setting_flag(p, "--metrics-port", "prometheus port, 0 = off", type=int)
    setting_flag(p, "--web-port", "faust web port on 127.0.0.1", type=int)
    setting_flag(p, "--models-dir", "model registry")
    setting_flag(p, "--k", "items per recommendation", type=int)

    p = sub.add_parser("produce", help="publish events")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic events")
    src.add_argument("--file", metavar="PATH", help="a jsonl or session-tsv file")
    p.add_argument("--format", choices=["jsonl", "session-tsv"], help="format of --file")
    p.add_argument("--users", type=int, default=500, help="synthetic users (default 500)")
    p.add_argument("--items", type=int, default=1000, help="synthetic catalog size (default 1000)")
    p.add_argument("--seed", type=int, default=7, help="synthetic seed (default 7)")
    p.add_argument("--limit", type=int, help="publish at most this many events")
    p.add_argument("--now", action="store_true", help="shift file timestamps so the last event is now")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _broker_flags(p)

    p = sub.add_parser("consume", help="print recommendations as JSON lines")
    p.add_argument("--max", type=int, default=0, help="stop after N records (default: no limit)")
    p.add_argument("--timeout", type=float, default=10.0, help="stop after S seconds without a record (default 10)")
    p.add_argument("--topic", help="topic (default: the recommendations topic)")
    p.add_argument("--latest", action="store_true", help="only records that arrive from now on")
    _broker_flags(p)

    p = sub.add_parser("forget", help="erase users: their state, their snapshot rows, their last recommendations")
    p.add_argument("users", nargs="+", metavar="USER_ID", help="user ids to forget")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the worker's reports (default 120)")
    p.add_argument("--no-wait", action="store_true", help="send the requests and return")
    _broker_flags(p)

    from pipeline.offline import FORMATS, add_evaluate_args, add_model_args, add_train_args

    p = sub.add_parser("train", help="train a model and store it in the registry")
    add_train_args(p)

    p = sub.add_parser("split", help="split a data set by time into train.tsv and test.tsv (session-tsv): the "
                                     "last days as the test, the way the GRU4Rec papers do")
    p.add_argument("--data", required=True, help="the data set")
    p.add_argument("--format", choices=FORMATS, required=True, help="format of --data")
    p.add_argument("--out", required=True, help="folder for train.tsv and test.tsv")
    p.add_argument("--test-days", type=float, default=7.0, help="sessions ending in the last N days are the test (default 7)")
    p.add_argument("--min-item-support", type=int, default=5, help="drop items seen fewer times first (default 5)")
    p.add_argument("--min-length", type=int, default=2, help="drop shorter sessions (default 2)")
    p.add_argument("--session-gap", type=float, default=1800.0, help="jsonl, parquet: seconds that cut a session")

    p = sub.add_parser("retrain", help="train a challenger on the snapshots and publish it only if it is at least "
                                       "as good as the live model on the newest, held-out events")
    p.add_argument("--data", help="sessions to use instead of the snapshots (default: the snapshot folder)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="format of --data (default parquet)")
    setting_flag(p, "--every", "run every this long as a service (e.g. 30m, 1h), until SIGTERM",
                 dest="retrain_every", metavar="DURATION")
    setting_flag(p, "--window", "use sessions that ended within this span before the newest event",
                 dest="retrain_window", metavar="DURATION")
    setting_flag(p, "--holdout", "the newest part held out as the test: a share (5%%) or a span (1h)",
                 dest="retrain_holdout", metavar="SHARE|DURATION")
    setting_flag(p, "--metric", "the metric the gate compares", dest="retrain_metric",
                 choices=["mrr@20", "recall@20", "ndcg@20"])
    setting_flag(p, "--margin", "publish when challenger >= live - margin", dest="retrain_margin", type=float)
    setting_flag(p, "--min-sessions", "fewer training sessions fail the run", dest="retrain_min_sessions", type=int)
    setting_flag(p, "--min-test-events", "fewer held-out next events fail the run", dest="retrain_min_test_events",
                 type=int)
    setting_flag(p, "--keep-rejected", "rejected challengers kept in the registry; older ones are deleted",
                 dest="retrain_keep_rejected", type=int)
    setting_flag(p, "--metrics-port", "with --every: prometheus port, 0 = off", dest="retrain_metrics_port", type=int)
    setting_flag(p, "--models-dir", "model registry")
    setting_flag(p, "--snapshot-dir", "snapshot folder or URI")
    p.add_argument("--json", action="store_true", help="print the run's report as one JSON object")
    add_model_args(p)
    p.add_argument("--no-refit", action="store_true", help="skip the final refit on the training part")

    p = sub.add_parser("tune", help="search the model's settings with Optuna on a validation split; write the "
                                    "best as a --config file")
    p.add_argument("--data", required=True, help="training data (a file, or a snapshot folder with --format parquet)")
    p.add_argument("--format", choices=FORMATS, required=True, help="format of --data")
    p.add_argument("--trials", type=int, default=20, help="trials at most (default 20)")
    p.add_argument("--time-budget", default="30m", help="stop starting trials after this long (default 30m)")
    p.add_argument("--out", default="tune.json", help="the best settings, for `recur train --config` (default tune.json)")
    p.add_argument("--metric", choices=["mrr@20", "recall@20", "ndcg@20"], default="mrr@20",
                   help="validation metric to maximise (default mrr@20)")
    add_model_args(p)
    p.set_defaults(no_refit=True)

    p = sub.add_parser("evaluate", help="next-event evaluation of a model or a baseline")
    add_evaluate_args(p)

    p = sub.add_parser("model", help="the model registry")
    p.add_argument("action", choices=["ls", "publish"])
    p.add_argument("version", nargs="?", help="version to publish")
    setting_flag(p, "--models-dir", "model registry")

    p = sub.add_parser("snapshots", help="the Parquet snapshots the worker writes")
    p.add_argument("action", choices=["ls", "compact"])
    p.add_argument("--dir", help="snapshot folder or URI (default var/snapshots)")
    setting_flag(p, "--snapshot-retention", "compact: delete files of event hours older than this many days, 0 = keep",
                 type=float)

    p = sub.add_parser("bench", help="benchmarks: the model step alone, end to end through the broker, "
                                     "or a worker restoring state")
    p.add_argument("what", choices=["step", "e2e", "recovery"])
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    setting_flag(p, "--device", "auto, cpu or cuda")
    p.add_argument("--items", type=int, default=20000, help="catalog size (default 20000)")
    p.add_argument("--model", help="step, e2e: a model artifact or registry to use (its catalogue sets --items); "
                                   "step's default: a model trained once on synthetic data over --items items, "
                                   "cached under the cache dir; 'random': untrained weights (exact speed only)")
    setting_flag(p, "--scorer", "top-k scorer", choices=list(SCORERS))
    setting_flag(p, "--ann-probe", "ann: IVF lists searched per query, 0 = lists / 64, at least 48", type=int)
    setting_flag(p, "--ann-candidates", "ann: candidates re-scored exactly per query", type=int)
    setting_flag(p, "--score-memory-mb", "exact scoring on a GPU: MiB for one block of scores, 0 = auto", type=int)
    setting_flag(p, "--gpu-tf32", "exact scoring on a GPU: TF32 candidates, re-scored in float32",
                 type=lambda v: v.lower() in ("1", "true", "yes", "on"))
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=1, help="step: recurrent layers (default 1)")
    p.add_argument("--users", type=int, default=None,
                   help="users in state (step: 1000000, e2e: 100000, recovery: 1000000)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batches", default="1,64,1024,4096", help="step: batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="step: seconds per batch size")
    p.add_argument("--events", type=int, default=200000, help="e2e: pre-loaded events (default 200000)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="e2e: seconds of paced load")
    p.add_argument("--latency-rate", type=float, default=None,
                   help="e2e: events/s of the paced load (default: half the single worker's measured rate)")
    p.add_argument("--workers", default="1", help="e2e: worker process counts to measure, e.g. 1,2 (each count "
                                                  "a consumer group of its own; adds 'workers' (steady: the lists from 10%% to 90%%), 'workers_first_to_last' and 'scaling')")
    p.add_argument("--swap", action="store_true", help="e2e: publish the model again halfway through the paced "
                                                       "load and report the latency around the swap")
    p.add_argument("--plot", help="e2e: PNG of throughput and latency (default <RECUR_VAR_DIR>/bench-e2e.png)")
    setting_flag(p, "--max-batch", "e2e: worker batch cap", type=int)
    _broker_flags(p)

    p = sub.add_parser("demo", help="run the whole path end to end on synthetic events")
    p.add_argument("--events", type=int, default=3000, help="synthetic events to stream (default 3000; 10000 with --loop)")
    p.add_argument("--loop", action="store_true", help="the closed loop: cold start, snapshots, retrain, swap, hit rate")
    _broker_flags(p)
    return parser


