"""The one typed configuration of recur.

Read once at the entry point (`pipeline/cli.py`) from `RECUR_*` environment
variables and command-line flags (flags win), then passed down. Nothing else
reads the environment. `recur config` prints the effective values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import ConfigError

if TYPE_CHECKING:
    from models.scorers import ScorerConfig

ENV_PREFIX = "RECUR_"
SCORERS = ("auto", "exact", "bf16", "ann")  # models.scorers.SCORERS, named here without importing torch


@dataclass
class Settings:
    # -- broker ---------------------------------------------------------
    bootstrap: str = ""  # existing broker "host:port"; empty = the local broker recur manages
    kafka_port: int = 19092  # local broker's client port (controller uses port + 1)
    kafka_heap: str = "512m"  # local broker's JVM heap
    # the local broker's other JVM options; the default compiles with C1 only: on a 2-core machine
    # C2's compilations took up to a core for seconds at a time (docs/performance.md)
    kafka_jvm_opts: str = "-XX:TieredStopAtLevel=1"
    var_dir: str = "var"  # local data: broker logs, faust tables, model registry
    cache_dir: str = "~/.cache/recur"  # downloaded broker jars (outside git)
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_username: str = ""  # with SASL_*; pass through the environment, never in code
    sasl_password: str = ""  # with SASL_*; pass through the environment, never in code
    ssl_cafile: str = ""  # CA bundle for SSL / SASL_SSL
    kafka_sasl: bool = False  # the local broker requires SASL/PLAIN (users: sasl_username + kafka_sasl_users)
    kafka_sasl_users: str = ""  # the local SASL broker's other users, "name:password,..."; env only
    # -- topics -----------------------------------------------------------
    events_topic: str = "events"  # input events, keyed by user id
    recommendations_topic: str = "recommendations"  # output, keyed by user id
    dlq_topic: str = "events-dlq"  # records that could not be processed
    forget_topic: str = "forget"  # erasure requests, keyed by user id (`recur forget`)
    forget_reports_topic: str = "forget-reports"  # what the worker did for each erasure request
    partitions: int = 4  # partitions of the three topics
    # -- worker -----------------------------------------------------------
    app_id: str = "recur"  # faust app id = consumer group and table prefix
    store: str = "rocksdb"  # table store: rocksdb (durable) or memory
    models_dir: str = ""  # model registry; empty = <var_dir>/models
    device: str = "auto"  # auto, cpu or cuda[:N]
    model_poll_interval: float = 2.0  # seconds between checks of the registry's CURRENT
    k: int = 20  # items per recommendation
    recent_n: int = 50  # recent items kept per user
    exclude_purchased: bool = True  # never recommend items the user bought
    exclude_current: bool = False  # never recommend the item just viewed
    trending_window: int = 10000  # events counted for cold-start trending items
    changelog_segment_ms: int = 600000  # the state changelog's segments roll at least this often, so compaction runs
    changelog_segment_bytes: int = 67108864  # ... or at this size (Kafka's default, 1 GiB, never rolled at our rates)
    standby_replicas: int = 0  # faust standby copies of each table partition on other workers (faster take-over)
    bulk_restore: bool = True  # restore the state changelog in bulk, before faust's per-record recovery
    bulk_restore_min_records: int = 5000  # ... when a partition has at least this many records to read
    recovery_stall_seconds: float = 30.0  # restart a restore that read no changelog record for this long; 0 = never
    commit_interval: float = 2.8  # seconds between commits of processed input offsets (faust's default)
    max_batch: int = 1024  # events per batched step at most
    max_wait: float = 0.015  # seconds to wait for more events once one is there (a backlog is taken at once)
    backlog_wait: float = 0.06  # in a backlog (>= max_batch records waiting): seconds a batch may wait to fill
    fetch_max_wait: float = 0.02  # seconds the broker may hold a fetch that has no new data for
    torch_threads: int = 1  # the model's CPU threads in the worker; 0 = torch's default (all cores)
    omp_wait_policy: str = "passive"  # the worker's OpenMP threads sleep between parallel regions; "" = OpenMP's default
    scorer: str = "auto"  # top-k: exact, bf16 (exact results, bfloat16 product), ann (approximate, faiss), or auto (ann on a CPU from ann_min_items, else bf16 where the CPU has it)
    ann_min_items: int = 200000  # auto: catalogues from this size use ann on a CPU (docs/performance.md)
    ann_probe: int = 0  # ann: IVF lists searched per query; 0 = lists / 64, at least 48 (more = closer to exact, slower)
    ann_candidates: int = 40  # ann: candidates re-scored exactly per query
    score_memory_mb: int = 0  # exact scoring on a GPU: MiB for one block of scores; 0 = 1/16 of the GPU, at most 4096
    gpu_tf32: bool = False  # exact scoring on a GPU: TF32 product for candidates, re-scored in float32
    max_record_bytes: int = 16384  # larger input records go to the dead-letter topic
    snapshot_dir: str = ""  # Parquet snapshots: a folder or pyarrow.fs URI; empty = <var_dir>/snapshots
    snapshot_interval: float = 60.0  # seconds between snapshots; 0 = no snapshots
    snapshot_user_key: str = ""  # secret: snapshots store HMAC-SHA256(key, user id) instead of the id; env only
    snapshot_retention: float = 0.0  # days of snapshots kept (by event hour); 0 = kept forever
    # where the Parquet files are built: "process" (a child process of the worker's, so that building
    # them does not take the worker's GIL) or "thread" (in the worker's own process)
    snapshot_writer: str = "process"
    retrain_every: str = ""  # recur retrain: run every this long (e.g. 1h) as a service; empty = one run
    retrain_window: str = "7d"  # recur retrain: sessions that ended within this span before the newest event
    retrain_holdout: str = "5%"  # recur retrain: newest part held out as the test, a share ("5%") or a span ("1h")
    retrain_metric: str = "mrr@20"  # recur retrain: the metric the gate compares (mrr@20, recall@20, ndcg@20)
    retrain_margin: float = 0.005  # recur retrain: publish when challenger >= live - margin on that metric
    retrain_min_sessions: int = 50  # recur retrain: fewer training sessions fail the run (nothing published)
    retrain_min_test_events: int = 100  # recur retrain: fewer held-out next events fail the run
    retrain_keep_rejected: int = 3  # recur retrain: rejected challengers kept for inspection; older ones deleted
    retrain_metrics_port: int = 9475  # recur retrain --every: prometheus /metrics (on metrics_host); 0 = off
    users_count_interval: float = 60.0  # seconds between exact counts of the users in state (recur_users_in_state)
    metrics_port: int = 9464  # prometheus /metrics; 0 = off
    metrics_host: str = "127.0.0.1"  # interface for /metrics; 0.0.0.0 only inside a private network
    web_port: int = 6066  # faust's web server, bound to 127.0.0.1
    log_level: str = "info"  # debug, info, warning or error

    def scorer_config(self) -> ScorerConfig:
        from models.scorers import ScorerConfig  # torch: not for the clients, which import this module

        return ScorerConfig(kind=self.scorer, ann_min_items=self.ann_min_items, ann_probe=self.ann_probe,
                            ann_candidates=self.ann_candidates, score_memory_mb=self.score_memory_mb, gpu_tf32=self.gpu_tf32,
                            threads=self.torch_threads, native_dir=str(Path(self.cache_dir).expanduser() / "native"))

    @property
    def local(self) -> bool:
        """True when recur manages its own broker."""
        return not self.bootstrap

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir).expanduser()

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else self.var_path / "models"

    @property
    def snapshot_root(self) -> str:
        return self.snapshot_dir or str(self.var_path / "snapshots")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    def to_env(self) -> dict[str, str]:
        """Every setting as a RECUR_* variable: how a child process (a worker started by the
        demo or a benchmark) gets exactly these settings. Inverse of `load_settings`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def public(self) -> dict[str, Any]:
        """Values safe to print: secrets masked."""
        out = dataclasses.asdict(self)
        for secret in ("sasl_password", "snapshot_user_key", "kafka_sasl_users"):
            if out[secret]:
                out[secret] = "***"
        return out


def _convert(name: str, kind: type, raw: Any) -> Any:
    if isinstance(raw, kind):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"config: {name} must be a {kind.__name__}, got {text!r}") from None


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def load_settings(env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then RECUR_* variables, then `overrides` (None values are ignored)."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = _convert(key, kind, env[key])
        if overrides and overrides.get(f.name) is not None:
            values[f.name] = _convert(f"--{f.name.replace('_', '-')}", kind, overrides[f.name])
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if s.store not in ("rocksdb", "memory"):
        raise ConfigError(f"config: store must be rocksdb or memory, got {s.store!r}")
    if s.partitions < 1 or s.k < 1 or s.max_batch < 1 or s.recent_n < 1:
        raise ConfigError("config: partitions, k, max_batch and recent_n must be >= 1")
    if s.changelog_segment_ms < 1000 or s.changelog_segment_bytes < 1048576:
        raise ConfigError("config: changelog_segment_ms must be >= 1000 and changelog_segment_bytes >= 1048576")
    if s.standby_replicas < 0:
        raise ConfigError("config: standby_replicas must be >= 0")
    if s.recovery_stall_seconds < 0:
        raise ConfigError("config: recovery_stall_seconds must be >= 0 (0 = never restart a stalled restore)")
    if s.bulk_restore_min_records < 1:
        raise ConfigError("config: bulk_restore_min_records must be >= 1")
    if s.commit_interval <= 0:
        raise ConfigError("config: commit_interval must be > 0 seconds")
    if s.users_count_interval <= 0:
        raise ConfigError("config: users_count_interval must be > 0 seconds")
    if s.snapshot_interval < 0:
        raise ConfigError("config: snapshot_interval must be >= 0 seconds (0 = off)")
    if s.snapshot_retention < 0:
        raise ConfigError("config: snapshot_retention must be >= 0 days (0 = kept forever)")
    if s.snapshot_writer not in ("process", "thread"):
        raise ConfigError("config: snapshot_writer must be process or thread")
    if s.max_wait <= 0 or s.fetch_max_wait <= 0 or s.backlog_wait < 0:
        raise ConfigError("config: max_wait and fetch_max_wait must be > 0 seconds, backlog_wait >= 0")
    if s.scorer not in SCORERS:
        raise ConfigError(f"config: scorer must be one of {', '.join(SCORERS)}, got {s.scorer!r}")
    if s.ann_min_items < 1 or s.ann_probe < 0 or s.ann_candidates < 1 or s.score_memory_mb < 0:
        raise ConfigError("config: ann_min_items and ann_candidates must be >= 1, ann_probe and score_memory_mb >= 0")
    if s.omp_wait_policy not in ("", "passive", "active"):
        raise ConfigError(f"config: omp_wait_policy must be passive, active or empty, got {s.omp_wait_policy!r}")
    if s.torch_threads < 0:
        raise ConfigError("config: torch_threads must be >= 0 (0 = torch's default)")
    if s.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(f"config: unknown security_protocol {s.security_protocol!r}")
    if s.kafka_sasl and not (s.sasl_username and s.sasl_password):
        raise ConfigError("config: kafka_sasl needs RECUR_SASL_USERNAME and RECUR_SASL_PASSWORD (the local broker's user)")
    for entry in filter(None, s.kafka_sasl_users.split(",")):
        if ":" not in entry or not entry.split(":", 1)[0] or not entry.split(":", 1)[1]:
            raise ConfigError("config: kafka_sasl_users must be name:password pairs separated by commas")
    if s.retrain_margin < 0 or s.retrain_min_sessions < 1 or s.retrain_min_test_events < 1 or s.retrain_keep_rejected < 0:
        raise ConfigError("config: retrain_margin and retrain_keep_rejected must be >= 0, retrain_min_sessions and "
                          "retrain_min_test_events >= 1")
    if s.retrain_metric not in ("mrr@20", "recall@20", "ndcg@20"):
        raise ConfigError(f"config: retrain_metric must be mrr@20, recall@20 or ndcg@20, got {s.retrain_metric!r}")
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config: log_level must be debug, info, warning or error, got {s.log_level!r}")
