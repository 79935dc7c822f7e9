"""Issue 18: forgetting a user through the real broker, with pseudonymous snapshots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

from kafka import KafkaProducer

from models.artifacts import load_artifact
from models.events import Event
from models.synthetic import SyntheticConfig, generate
from pipeline.clients import consume, produce_events, shift_to_now
from pipeline.snapshot_files import read_events
from pipeline.snapshot_privacy import pseudonymizer

from .conftest import Watcher, expected_lists, latest_states, metric, scrape, wait_for_metric

KEY = "integration-test-key"  # a throwaway HMAC key of this test, not a secret


def _snapshot_events(snap, n: int, timeout: float = 30.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    while True:
        got = read_events(snap) if any(snap.rglob("*.parquet")) else []
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _last_per_key(settings, topic: str) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}
    for key, value, _ in consume(settings, topic, 0, 5.0):
        out[key] = value
    return out


def test_forget_erases_state_snapshot_rows_and_lists_and_the_next_event_starts_afresh(stack, model_registry, tmp_path):
    snap = tmp_path / "snapshots"
    env = {"RECUR_SNAPSHOT_DIR": str(snap), "RECUR_SNAPSHOT_INTERVAL": "1", "RECUR_SNAPSHOT_USER_KEY": KEY,
           "RECUR_EXCLUDE_PURCHASED": "false", "RECUR_USERS_COUNT_INTERVAL": "0.5"}
    events = shift_to_now(generate(SyntheticConfig(n_events=600, n_users=6, seed=51)))
    users = sorted({e.user_id for e in events})
    gone, others = users[0], users[1:]
    stored = pseudonymizer(KEY)
    worker = stack.start_worker(**env)
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    produce_events(stack.settings, events)
    recs.wait_for_events({e.event_id for e in events}, timeout=60)
    before_rows = _snapshot_events(snap, len(events))
    assert len(before_rows) == len(events)
    # pseudonymous: the files hold HMAC-SHA256(key, id), never the id
    assert {e.user_id for e in before_rows} == {stored(u) for u in users}
    assert not any(u.encode() in p.read_bytes() for p in snap.rglob("*.parquet") for u in users)
    assert wait_for_metric(worker, "recur_users_in_state", lambda n: n == 6) == 6
    changelog = f"{stack.settings.app_id}-user-state-changelog"
    before_states = latest_states(stack.settings)

    started = time.monotonic()
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "forget", gone, "--timeout", "60"],
                         env={**stack.env, **env}, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)["requests"][0]
    n_gone = sum(1 for e in events if e.user_id == gone)
    assert report["state"]["had_state"] is True
    assert report["snapshots"]["events_removed"] == n_gone and report["snapshots"]["rows_removed"] >= 1
    assert gone not in cli.stdout  # the report names the request, not the user

    # the table: the state is gone locally and a tombstone is the user's last changelog record
    assert wait_for_metric(worker, "recur_users_in_state", lambda n: n == 5) == 5
    after_states = latest_states(stack.settings)
    assert gone in after_states and after_states[gone] is None
    assert {u: after_states[u] for u in others} == {u: before_states[u] for u in others}  # others untouched
    assert _last_per_key(stack.settings, changelog)[gone.encode()] is None
    # the snapshots: no row of the user anywhere, every other row as it was
    after_rows = read_events(snap)
    assert stored(gone) not in {e.user_id for e in after_rows}
    key = lambda e: (e.user_id, e.event_id, e.item_id, e.timestamp_ms)  # noqa: E731
    assert sorted(map(key, after_rows)) == sorted(key(e) for e in before_rows if e.user_id != stored(gone))
    # the recommendations: a tombstone is the user's last record
    assert _last_per_key(stack.settings, stack.settings.recommendations_topic)[gone.encode()] is None

    # the next event starts afresh: the list a user never seen before gets for it
    artifact = load_artifact(model_registry)
    known = [e for e in events if e.user_id == gone and artifact.vocab.get(e.item_id) >= 0]
    nxt = Event(gone, known[-1].item_id, 0, int(time.time() * 1000), event_id="after-forget")
    produce_events(stack.settings, [nxt])
    recs.wait_for_events({"after-forget"}, timeout=30)
    got = {v["event_id"]: [i["item_id"] for i in v["items"]] for v in recs.values()}["after-forget"]
    fresh = expected_lists(artifact, [nxt])["after-forget"]
    kept = expected_lists(artifact, [e for e in events if e.user_id == gone] + [nxt])["after-forget"]
    assert fresh != kept  # the two differ, so the check below can tell them apart
    assert got == fresh
    keyless = KafkaProducer(bootstrap_servers=stack.settings.bootstrap_servers)  # a shop's malformed request
    keyless.send(stack.settings.forget_topic, key=None, value=b'{"request_id": "r"}').get(30)
    keyless.close()
    [(_, value, headers)] = stack.dead_letters(1)
    assert headers["recur.error.reason"] == "forget_without_user" and value == b'{"request_id": "r"}'
    assert headers["recur.original.topic"] == stack.settings.forget_topic
    text = scrape(worker)
    assert metric(text, "recur_dead_letters_total", 'reason="forget_without_user"') == 1 and worker.poll() is None
    assert metric(text, "recur_forget_requests_total", 'part="state"') == 1
    assert metric(text, "recur_forget_requests_total", 'part="snapshots"') == 1
    assert metric(text, "recur_forget_seconds_count") == 2
    assert stack.stop_worker(worker) == 0
    recs.close()
    log = worker.log_path.read_text()
    assert "forget: request" in log and not any(u in log for u in users)  # no user id in the log
    print(f"forget test: {n_gone} events of 1 of 6 users erased (state, {report['snapshots']['rows_removed']} snapshot "
          f"rows, list) in {took:.1f}s; reports {report}; counts of snapshot events per user before "
          f"{sorted(Counter(e.user_id[:8] for e in before_rows).values())}")
