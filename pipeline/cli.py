"""recur: the one command-line entry point.

    recur kafka start | stop | status      local single-node Kafka (KRaft)
    recur topics create                    events, recommendations, events-dlq
    recur worker [--processes N]           the streaming worker (Faust); N workers in one group
    recur produce --synthetic N            publish synthetic events
    recur produce --file PATH --format jsonl|session-tsv
    recur consume --max N --timeout S      print recommendations as JSON lines
    recur forget USER_ID...                erase users (state, snapshot rows, last recommendations)
    recur train --data PATH --format session-tsv|jsonl|parquet [--out var/models] [--publish]
    recur split --data F --format diginetica --out DIR   last 7 days as the test (train.tsv, test.tsv)
    recur retrain [--every 1h]             challenger from the snapshots, published only if not worse
    recur tune --data F --format session-tsv --trials N --time-budget 30m --out tune.json
    recur evaluate --model DIR --data PATH --format session-tsv --k 20 --json
    recur evaluate --baseline pop|sr|sknn --train PATH --data PATH --format session-tsv --json
    recur model ls | publish VERSION       the model registry
    recur snapshots ls | compact           the worker's Parquet snapshots
    recur demo                             broker, topics, model, worker, events, recommendations
    recur demo --loop                      cold start -> snapshots -> retrain -> live swap -> hit rate
    recur bench step --json                the model step alone, batch 1..4096, vs the machine's GEMM rate
    recur bench e2e --json [--workers 1,2] aiokafka passthrough vs the worker through the broker, latency
    recur bench recovery --users N --json  a fresh worker restoring N users' states from the changelog
    recur config                           print the effective settings

Every setting is also a RECUR_* environment variable (see `recur config` and README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.errors import ConfigError, RecurError
from pipeline.cli_args import COMPUTED_DEFAULTS, build_parser, setting_flag  # noqa: F401 - re-exported
from pipeline.config import Settings, load_settings

if TYPE_CHECKING:
    from models.artifacts import Artifact

log = logging.getLogger("recur")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return load_settings(os.environ, overrides)


# -- commands -----------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).public(), indent=2))
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.local:
        print(f"RECUR_BOOTSTRAP is set: using the broker at {settings.bootstrap}; nothing to {args.action}")
        return 0
    from pipeline.kafka_local import LocalKafka

    broker = LocalKafka(settings)
    if args.action == "start":
        print(broker.start())
    elif args.action == "stop":
        print(broker.stop())
    else:
        line = broker.status()
        print(line)
        return 0 if line.startswith("kafka running") else 3
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from pipeline.clients import create_topics

    settings = _settings(args)
    created = create_topics(settings)
    names = (settings.events_topic, settings.recommendations_topic, settings.dlq_topic, settings.forget_topic,
             settings.forget_reports_topic)
    for name in names:
        state = "created" if name in created else "exists"
        print(f"{name}: {state} ({settings.partitions} partitions)" if state == "created" else f"{name}: {state}")
    return 0


def set_openmp_wait_policy(settings: Settings) -> None:
    """OMP_WAIT_POLICY for `recur worker` (`main` calls this first), before torch and faiss load
    their OpenMP runtimes (they read it once, then). By default OpenMP's threads spin for a while
    after each parallel region: with RECUR_TORCH_THREADS=2 on a 2-core machine they took the CPU
    from the event loop and the broker (1,000,000 items, ann: p99 at half load 262-377 ms
    spinning, 154-158 ms passive). A value already in the environment wins."""
    if settings.omp_wait_policy and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", settings.omp_wait_policy.upper())


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.broker_check import check_broker
    from pipeline.worker import run_worker

    settings = _settings(args)
    if args.processes < 1:
        raise ConfigError("worker: --processes must be at least 1")
    if settings.security_protocol != "PLAINTEXT":  # credentials and ACLs: one clear line, not faust's retries
        check_broker(settings, read_topic=settings.events_topic)
    if args.processes > 1:
        from pipeline.worker_group import run_group

        return run_group(settings, args.processes)
    run_worker(settings)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.clients import file_events, produce_events, shift_to_now

    settings = _settings(args)
    if args.synthetic:
        from models.synthetic import SyntheticConfig, generate

        events = generate(SyntheticConfig(n_events=args.synthetic, n_users=args.users, n_items=args.items, seed=args.seed))
        events = shift_to_now(events)
    else:
        if not args.format:
            raise SystemExit("recur produce: --file needs --format jsonl|session-tsv")
        events = file_events(args.file, args.format)
        if args.now:
            events = shift_to_now(events)
    if args.limit:
        events = events[: args.limit]
    with tqdm(total=len(events), unit="ev", desc="produce", disable=True if args.quiet else None, file=sys.stderr) as bar:
        n = produce_events(settings, events, progress=bar.update)
    print(f"produced {n} events to {settings.events_topic}")
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    from pipeline.clients import as_json_line, consume

    settings = _settings(args)
    topic = args.topic or settings.recommendations_topic
    n = 0
    for _key, value, _headers in consume(settings, topic, args.max, args.timeout, not args.latest):
        print(as_json_line(value), flush=True)
        n += 1
    print(f"consumed {n} records from {topic}", file=sys.stderr)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from pipeline.clients import request_forget

    settings = _settings(args)
    result = request_forget(settings, args.users, args.timeout, wait=not args.no_wait)
    print(json.dumps(result, indent=2))
    if args.no_wait:
        return 0
    if not result["complete"]:
        print(f"recur: forget: not every part confirmed within {args.timeout:g}s (is a worker running?); "
              "the requests stay on the forget topic and are carried out when one runs", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.offline import train_command

    return train_command(args, _settings(args))


def cmd_split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.data import split_last_days, write_session_tsv
    from pipeline.offline import read_sessions

    sessions = read_sessions(args.data, args.format, args.session_gap)
    train, test = split_last_days(sessions, args.test_days, args.min_item_support, args.min_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_test = write_session_tsv(train, out / "train.tsv"), write_session_tsv(test, out / "test.tsv")
    print(json.dumps({"train": str(out / "train.tsv"), "test": str(out / "test.tsv"), "train_sessions": len(train),
                      "train_events": n_train, "train_items": len({i for s in train for i in s.items}),
                      "test_sessions": len(test), "test_events": n_test, "test_predictions": n_test - len(test),
                      "read_sessions": len(sessions)}))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from models.lstm import resolve_device
    from models.retrain import parse_duration
    from pipeline import retrain
    from pipeline.offline import model_and_train_config, read_sessions

    settings = _settings(args)
    gate = retrain.gate_config(settings)
    every = parse_duration(settings.retrain_every) if settings.retrain_every else 0.0
    device = resolve_device(args.device)
    model_config, train_config = model_and_train_config(args, device)
    source, fmt = (args.data, args.format) if args.data else (settings.snapshot_root, "parquet")
    job = retrain.RetrainJob(settings, gate, model_config, train_config,
                             read=lambda: read_sessions(source, fmt, args.session_gap, gate.window_s), source=source)
    if every:
        from prometheus_client import CollectorRegistry, start_http_server

        from pipeline.metrics import RetrainMetrics

        registry = CollectorRegistry()
        if settings.retrain_metrics_port:
            start_http_server(settings.retrain_metrics_port, addr=settings.metrics_host, registry=registry)
            log.info("retrain: /metrics on %s:%d", settings.metrics_host, settings.retrain_metrics_port)
        return retrain.serve(job, every, RetrainMetrics(registry))
    report = retrain.run_once(job)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 1 if report["decision"] == "failed" else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.lstm import resolve_device
    from models.retrain import parse_duration
    from pipeline.offline import model_and_train_config, read_sessions
    from pipeline.tune import run_tune

    device = resolve_device(args.device)
    model_config, train_config = model_and_train_config(args, device)
    sessions = read_sessions(args.data, args.format, args.session_gap)
    print(f"[tune] {len(sessions)} sessions from {args.data}; validation: the newest "
          f"{train_config.valid_fraction:.0%}; up to {args.trials} trials in {args.time_budget}", file=sys.stderr)
    result = run_tune(sessions, model_config, train_config, args.trials, parse_duration(args.time_budget),
                      Path(args.out), metric=args.metric, seed=train_config.seed, source=str(args.data))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    print(f"[tune] best settings written to {args.out}: recur train --config {args.out} ...", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.offline import evaluate_command

    return evaluate_command(args, _settings(args))


def cmd_model(args: argparse.Namespace) -> int:
    from models.artifacts import current_version, publish_version

    settings = _settings(args)
    registry = settings.models_path
    if args.action == "publish":
        publish_version(registry, args.version)
        print(f"{registry}: CURRENT -> {args.version}")
        return 0
    current = current_version(registry)
    versions = sorted(p.name for p in registry.glob("v*") if (p / "meta.json").exists()) if registry.exists() else []
    if not versions:
        print(f"{registry}: no models yet; run `recur train`")
    for v in versions:
        meta = json.loads((registry / v / "meta.json").read_text())
        val = meta.get("validation", {})
        mark = "*" if v == current else " "
        print(f"{mark} {v}  items={meta.get('n_items')}  recall@20={val.get('recall@20', float('nan')):.4f}"
              f"  mrr@20={val.get('mrr@20', float('nan')):.4f}")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pipeline.snapshot_tools import compact, list_files

    settings = _settings(args)
    root = args.dir or settings.snapshot_root
    if args.action == "compact":
        if settings.snapshot_retention > 0:
            import time

            from pipeline.snapshot_privacy import expire

            gone = expire(root, settings.snapshot_retention, int(time.time() * 1000))
            print(f"retention {settings.snapshot_retention:g} days: deleted {gone.files_removed} files; "
                  f"oldest hour kept {gone.oldest_kept or 'none'}")
        merged = compact(root)
        for target, n in merged:
            print(f"{target}: merged {n} files")
        print(f"compacted {len(merged)} groups under {root}")
        return 0
    listing = list_files(root)
    files = listing.files

    def when(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")

    for f in files:
        print(f"{f.path}  rows={f.rows} users={f.users} events={f.events} bytes={f.size}  {when(f.first_ms)} .. {when(f.last_ms)}")
    if files:
        copies = sum(f.events for f in files) - listing.distinct_events
        print(f"{len(files)} files, {sum(f.rows for f in files)} rows, {listing.distinct_events} events"
              f"{f' (+{copies} duplicate copies: recur snapshots compact removes them)' if copies else ''}, "
              f"{sum(f.size for f in files)} bytes, {when(min(f.first_ms for f in files))} .. "
              f"{when(max(f.last_ms for f in files))} (UTC)")
    else:
        print(f"no snapshot files under {root}")
    if listing.temporary_files:
        print(f"{listing.temporary_files} temporary files (a write in progress, or left by a crash)")
    return 0


def bench_model(args: argparse.Namespace, settings: Settings, say: Callable[[str], None]) -> tuple[Artifact, str]:
    """The model `recur bench step` runs: --model DIR, 'random' (untrained), or the cached learned one."""
    from pathlib import Path

    import torch

    from models.artifacts import Artifact, load_artifact
    from models.lstm import ModelConfig, RecurrentRecommender
    from models.vocab import Vocabulary
    from pipeline.bench.learned import learned_model

    if args.model == "random":
        torch.manual_seed(0)
        model = RecurrentRecommender(ModelConfig(n_items=args.items, embedding_dim=args.embedding_dim,
                                                 hidden_dim=args.hidden_dim, num_layers=args.layers))
        return Artifact(model, Vocabulary([str(n) for n in range(args.items)]), {"version": "random"}, Path()), "random"
    if args.model:
        artifact = load_artifact(args.model)
        return artifact, str(artifact.path)
    artifact = learned_model(args.items, args.embedding_dim, args.hidden_dim, args.layers, settings.cache_path, say)
    return artifact, f"learned:synthetic:{args.items}"


def cmd_bench(args: argparse.Namespace) -> int:
    from models.artifacts import load_artifact
    from pipeline.bench.step import run_step_bench

    if args.users is None:
        args.users = 100_000 if args.what == "e2e" else 1_000_000
    if args.latency_rate is not None and not args.latency_rate > 0:
        raise ConfigError("bench: --latency-rate must be > 0 events/s")
    settings = _settings(args)
    say = lambda line: print(f"[bench] {line}", file=sys.stderr)  # noqa: E731
    if args.what == "recovery":
        from pipeline.bench.recovery import run_recovery_bench

        result = run_recovery_bench(settings, args.users, say)
    elif args.what == "step":
        model, source = bench_model(args, settings, say)
        scorer = dataclasses.replace(settings.scorer_config(), threads=0)  # all cores, as torch has here
        result = run_step_bench(settings.device, model, scorer, args.users, args.k,
                                [int(b) for b in args.batches.split(",")], args.seconds, source)
    else:
        from pipeline.bench.e2e import run_e2e_bench

        given = load_artifact(args.model) if args.model and args.model != "random" else None
        settings.var_path.mkdir(parents=True, exist_ok=True)
        plot = args.plot or str(settings.var_path / "bench-e2e.png")  # never into the working tree
        result = run_e2e_bench(settings, args.events, args.users, args.items, args.embedding_dim, args.hidden_dim,
                               args.latency_seconds, plot, say, artifact=given, swap=args.swap,
                               workers=[int(w) for w in args.workers.split(",")], latency_rate=args.latency_rate)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo, run_loop_demo

    if args.loop:
        return run_loop_demo(_settings(args), args.events if args.events != 3000 else 10000)
    return run_demo(_settings(args), args.events)


COMMANDS = {
    "config": cmd_config,
    "kafka": cmd_kafka,
    "topics": cmd_topics,
    "worker": cmd_worker,
    "produce": cmd_produce,
    "consume": cmd_consume,
    "forget": cmd_forget,
    "train": cmd_train,
    "split": cmd_split,
    "retrain": cmd_retrain,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
    "model": cmd_model,
    "snapshots": cmd_snapshots,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["worker"]:  # before the parser: it imports torch
        try:
            set_openmp_wait_policy(load_settings(os.environ))
        except RecurError:
            pass  # reported below, with the flags
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = _settings(args).log_level
    except RecurError as e:
        print(f"recur: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # client chatter at INFO, and faiss's loader trying the builds it does not ship ("Could not load
    # library with AVX512 support ... ModuleNotFoundError", eight lines before "Successfully
    # loaded faiss"); their warnings still show
    for noisy in ("kafka", "aiokafka", "faiss.loader"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return COMMANDS[args.command](args)
    except RecurError as e:
        print(f"recur: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
