"""`recur tune` (Optuna over the model's settings) and `recur train --config` reading its output."""

from __future__ import annotations

import json

import pytest

from models.data import write_session_tsv
from models.errors import ConfigError
from pipeline.cli import main

from .test_retrain import _shop_sessions


def test_tune_writes_the_best_trial_and_train_uses_it(tmp_path, capsys):
    data = tmp_path / "shop.tsv"
    write_session_tsv(_shop_sessions(), data)
    out = tmp_path / "tune.json"
    assert main(["tune", "--data", str(data), "--format", "session-tsv", "--trials", "4", "--time-budget", "5m",
                 "--epochs", "2", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["trials"] == 4 and result["complete"] + result["pruned"] == 4
    complete = [h for h in result["history"] if h["state"] == "complete"]
    best = max(complete, key=lambda h: h["value"])
    assert result["params"] == best["params"] and result["value"] == best["value"] > 0
    err = capsys.readouterr().err
    assert err.count("[tune] trial ") == 4  # progress: one line per trial

    registry = tmp_path / "registry"
    assert main(["train", "--data", str(data), "--format", "session-tsv", "--config", str(out), "--epochs", "1",
                 "--no-refit", "--out", str(registry), "--device", "cpu"]) == 0
    artifact = next(registry.glob("v*"))
    config = json.loads((artifact / "config.json").read_text())
    params = result["params"]
    assert (config["cell"], config["num_layers"], config["hidden_dim"], config["embedding_dim"]) == (
        params["cell"], params["layers"], params["hidden_dim"], params["embedding_dim"])
    train_config = json.loads((artifact / "meta.json").read_text())["train_config"]
    assert train_config["lr"] == params["lr"] and train_config["epochs"] == 1  # the flag wins over the file


def test_a_config_file_with_an_unknown_setting_is_an_error(tmp_path):
    from pipeline.offline import read_config_file

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"params": {"hiden_dim": 64}}))
    with pytest.raises(ConfigError, match="unknown settings hiden_dim"):
        read_config_file(str(bad))
