"""docker-compose.yml is for users with Docker; here it is checked by parsing."""

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _recur_ok(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"`recur {' '.join(argv)}` is not a valid recur command (exit {e.code})")


def test_every_mounted_file_and_build_file_exists():
    mounts = 0
    for name, svc in COMPOSE["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                mounts += 1
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
    assert mounts >= 3


def test_every_command_is_a_real_recur_command():
    commands = [svc["command"] for svc in COMPOSE["services"].values()
                if svc.get("image", "").startswith("recur") and "command" in svc]
    text = (ROOT / "docker-compose.yml").read_text()
    commands += [line.split(" recur ", 1)[1].split() for line in text.splitlines()
                 if re.match(r"#\s+docker compose run --rm recur ", line)]
    assert len(commands) >= 4
    for argv in commands:
        _recur_ok(argv)


def test_prometheus_scrapes_the_worker_metrics_port():
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    found = [(name, sd["port"]) for job in prom["scrape_configs"] for sd in job["dns_sd_configs"] for name in sd["names"]]
    worker_env = COMPOSE["services"]["worker"]["environment"]
    assert ("worker", int(worker_env["RECUR_METRICS_PORT"])) in found  # every replica, by the service's DNS name
    dash = json.loads((ROOT / "deploy/grafana/dashboards/recur.json").read_text())
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])
    retrain = COMPOSE["services"]["retrain"]  # the retraining service, on the worker's registry and snapshots
    assert retrain["command"][:2] == ["retrain", "--every"]
    assert ("retrain", int(retrain["environment"]["RECUR_RETRAIN_METRICS_PORT"])) in found
    assert "recur-data:/data" in retrain["volumes"]
    for name in ("RECUR_MODELS_DIR", "RECUR_SNAPSHOT_DIR"):
        assert retrain["environment"][name] == worker_env[name]


def test_readme_and_makefile_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for line in re.findall(r"^\s*recur (.+)$", readme, flags=re.M):
        argv = line.split("#")[0].split()
        if argv and not any(a.startswith("<") or a == "..." or a.endswith("|") for a in argv):
            _recur_ok(argv)
    assert "make demo" in readme and "make test" in readme


def test_scaled_worker_replicas_share_the_registry_and_snapshots_but_never_a_table_folder():
    worker = COMPOSE["services"]["worker"]
    env, volumes = worker["environment"], worker["volumes"]
    assert "container_name" not in worker and "ports" not in worker  # both would stop --scale
    named = {v.split(":")[1]: v.split(":")[0] for v in volumes if ":" in v}  # target -> named volume
    anonymous = [v for v in volumes if ":" not in v]  # one new volume per container

    def on(path: str) -> str | None:
        mounts = [t for t in list(named) + anonymous if path == t or path.startswith(t.rstrip("/") + "/")]
        return max(mounts, key=len) if mounts else None

    tables = on(env["RECUR_VAR_DIR"])  # faust's RocksDB folder is <var_dir>/faust
    assert tables in anonymous, "every replica must have its own table folder"
    for shared in (env["RECUR_MODELS_DIR"], env["RECUR_SNAPSHOT_DIR"]):
        assert on(shared) in named and named[on(shared)] == "recur-data"
    cli = COMPOSE["services"]["recur"]  # where `recur train --publish` puts models: the same folder
    cli_var = cli.get("environment", {}).get("RECUR_VAR_DIR", "/data")  # the image's default
    assert f"{cli_var}/models" == env["RECUR_MODELS_DIR"] and f"{cli_var}/snapshots" == env["RECUR_SNAPSHOT_DIR"]


def test_the_local_prometheus_config_scrapes_each_worker_process_and_the_retrain_service():
    from pipeline.config import Settings
    from pipeline.worker_group import child_env

    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-local.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    settings = Settings()
    ports = [int(child_env(settings, n)["RECUR_METRICS_PORT"]) for n in range(4)]  # recur worker --processes 4
    assert targets["recur-worker"] == [f"127.0.0.1:{p}" for p in ports]
    assert targets["recur-retrain"] == [f"127.0.0.1:{settings.retrain_metrics_port}"]
    assert settings.retrain_metrics_port not in range(settings.metrics_port, settings.metrics_port + 10)
