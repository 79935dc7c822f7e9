"""Issue 13, point 5: `recur demo` works in its own namespace and leaves the user's model,
topics and worker state alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from models.artifacts import current_version
from models.synthetic import SyntheticConfig, generate
from pipeline.clients import create_topics, end_offsets, produce_events, shift_to_now
from pipeline.config import load_settings


def test_demo_shows_the_lstm_and_leaves_the_users_model_topics_and_state_alone(bootstrap, foreign_registry, tmp_path):
    var = tmp_path / "var"
    shutil.copytree(foreign_registry, var / "models")  # the user's own model, trained on their catalogue
    users_version = current_version(var / "models")
    user = load_settings({"RECUR_BOOTSTRAP": bootstrap, "RECUR_VAR_DIR": str(var)})  # default topic names
    create_topics(user)
    produce_events(user, shift_to_now(generate(SyntheticConfig(n_events=20, n_users=5, seed=1))))
    topics = (user.events_topic, user.recommendations_topic, user.dlq_topic)
    before = {t: end_offsets(user, t) for t in topics}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECUR_")}, "RECUR_BOOTSTRAP": bootstrap,
           "RECUR_VAR_DIR": str(var), "RECUR_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--events", "300"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "received 300 recommendations for 300 events; by strategy {'lstm': 300}" in proc.stdout
    assert current_version(var / "models") == users_version  # the user's model: still live, still alone
    assert sorted(p.name for p in (var / "models").iterdir()) == sorted(p.name for p in foreign_registry.iterdir())
    assert {t: end_offsets(user, t) for t in topics} == before  # the user's topics: not one record more
    assert not (var / "faust").exists()  # the user's worker state: untouched
    assert current_version(var / "demo" / "models") is not None and (var / "demo" / "faust").is_dir()
