import json
import os
import subprocess
import sys

from pipeline.cli import main


def test_config_prints_effective_settings(capsys, monkeypatch):
    monkeypatch.setenv("RECUR_K", "7")
    monkeypatch.setenv("RECUR_SASL_PASSWORD", "hunter2")
    assert main(["config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 7 and out["sasl_password"] == "***"


def test_invalid_setting_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("RECUR_PARTITIONS", "four")
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "recur: config: RECUR_PARTITIONS must be a int, got 'four'"


def test_missing_java_gives_one_line_error_with_a_hint(tmp_path):
    env = {"PATH": str(tmp_path), "RECUR_CACHE_DIR": str(tmp_path / "cache"), "RECUR_VAR_DIR": str(tmp_path / "var"),
           "RECUR_KAFKA_PORT": "19999"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "kafka", "start"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Java" in lines[0] and "RECUR_BOOTSTRAP" in lines[0]


def test_evaluate_baseline_json(tmp_path, capsys):
    train = tmp_path / "tr.tsv"
    test = tmp_path / "te.tsv"
    train.write_text("SessionId\tItemId\tTime\n1\ta\t1\n1\tb\t2\n2\ta\t3\n2\tb\t4\n3\tc\t5\n3\ta\t6\n")
    test.write_text("SessionId\tItemId\tTime\n9\ta\t10\n9\tb\t11\n9\tz\t12\n")
    assert main(["evaluate", "--baseline", "sr", "--train", str(train), "--data", str(test),
                 "--format", "session-tsv", "--k", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"recall@1": 1.0, "mrr@1": 1.0, "ndcg@1": 1.0, "n": 1}


def test_every_flag_that_sets_a_setting_shows_its_default_from_settings():
    import argparse
    import dataclasses

    from pipeline.cli import COMPUTED_DEFAULTS, build_parser
    from pipeline.config import Settings

    defaults = dataclasses.asdict(Settings())
    parser = build_parser()
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    checked = 0
    for p in parsers:
        for action in p._actions:
            if action.dest not in defaults or action.default is not None or action.help == argparse.SUPPRESS:
                continue  # flags with their own default (e.g. evaluate --k) are not settings
            shown = COMPUTED_DEFAULTS.get(action.dest, defaults[action.dest])
            printed = action.help.replace("%%", "%")  # as argparse prints it
            assert f"(default {shown}; env RECUR_{action.dest.upper()})" in printed, (p.prog, action.dest)
            checked += 1
    assert checked >= 14  # worker --max-wait once said 0.05 while the code used 0.03


def test_train_stores_the_ann_index_of_a_large_catalogue_before_publishing_and_the_worker_reads_it(tmp_path, capsys,
                                                                                                   monkeypatch):
    from models.artifacts import current_version, load_artifact
    from models.online import OnlineConfig, OnlineRecommender
    from models.scorers import INDEX_FILE, ScorerConfig

    monkeypatch.setenv("RECUR_ANN_MIN_ITEMS", "500")  # "large" here: 600 items
    assert main(["train", "--synthetic", "3000", "--synthetic-items", "600", "--epochs", "1", "--no-refit",
                 "--out", str(tmp_path), "--publish"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 600 and out["ann_index_seconds"] is not None and out["published"]
    artifact = load_artifact(tmp_path)  # the published version
    assert artifact.path.name == current_version(tmp_path) and (artifact.path / INDEX_FILE).exists()
    scorer = OnlineRecommender(None, OnlineConfig(scorer=ScorerConfig(ann_min_items=500))).prepare(artifact)
    assert scorer.name == "ann" and scorer.loaded  # read, not built
    monkeypatch.setenv("RECUR_ANN_MIN_ITEMS", "100000")
    assert main(["train", "--synthetic", "3000", "--synthetic-items", "600", "--epochs", "1", "--no-refit",
                 "--out", str(tmp_path / "small")]) == 0
    assert json.loads(capsys.readouterr().out)["ann_index_seconds"] is None  # served exactly: no index


def test_each_worker_of_a_group_has_its_own_tables_and_ports_and_shares_registry_and_snapshots(tmp_path):
    from pipeline.config import load_settings
    from pipeline.worker_group import child_env

    settings = load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_METRICS_PORT": "9500", "RECUR_WEB_PORT": "6100"})
    envs = [child_env(settings, n) for n in range(3)]
    assert [e["RECUR_VAR_DIR"] for e in envs] == [str(tmp_path / "workers" / str(n)) for n in range(3)]
    assert [e["RECUR_METRICS_PORT"] for e in envs] == ["9500", "9501", "9502"]
    assert [e["RECUR_WEB_PORT"] for e in envs] == ["6100", "6101", "6102"]
    assert {e["RECUR_MODELS_DIR"] for e in envs} == {str(tmp_path / "models")}
    assert {e["RECUR_SNAPSHOT_DIR"] for e in envs} == {str(tmp_path / "snapshots")}
    off = load_settings({"RECUR_METRICS_PORT": "0"})
    assert child_env(off, 2)["RECUR_METRICS_PORT"] == "0"  # metrics off stays off


def test_worker_processes_below_one_is_refused_with_one_line(capsys):
    assert main(["worker", "--processes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "recur: worker: --processes must be at least 1"


def test_the_demo_loop_command_imports_without_faust_reading_its_loop_flag():
    """faust parses sys.argv when it is imported and refuses a bare `--loop`: `recur demo --loop`
    must get to its demo without importing faust (the worker it starts is a process of its own)."""
    import subprocess
    import sys

    code = "import sys; sys.argv = ['recur', 'demo', '--loop']; import pipeline.demo; print('faust' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip() == "False"


def test_the_worker_sets_openmp_threads_to_wait_passively_before_torch_loads_unless_told_otherwise():
    code = ("import os, sys\n"
            "from pipeline import cli\n"
            "seen = []\n"
            "loaded = sys.modules.get\n"
            "cli.set_openmp_wait_policy = lambda s, f=cli.set_openmp_wait_policy: (f(s), seen.append(loaded('torch')))\n"
            "cli.COMMANDS['worker'] = lambda args: 0  # no worker: what `recur worker` sets before it runs\n"
            "cli.main(['worker'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), seen == [None])\n")

    def run(**env: str) -> str:
        base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY" and not k.startswith("RECUR_")}
        return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                              check=True).stdout.split()

    assert run() == ["PASSIVE", "True"]  # set before torch (and its OpenMP runtime) is imported
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "True"]  # the operator's own value wins
    assert run(RECUR_OMP_WAIT_POLICY="") == ["None", "True"]  # off: OpenMP's default


def test_bench_latency_rate_must_be_positive_with_one_line(capsys):
    assert main(["bench", "e2e", "--latency-rate", "0"]) == 2
    assert capsys.readouterr().err.strip() == "recur: bench: --latency-rate must be > 0 events/s"
