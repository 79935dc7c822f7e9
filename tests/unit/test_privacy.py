"""Pseudonymous snapshots, erasing a user's rows, retention, and the snapshot consumer's part of
an erasure request (the broker side: tests/integration/test_privacy.py)."""

import asyncio
import hashlib
import hmac
import json
from types import SimpleNamespace

from aiokafka import TopicPartition

from models.events import Event
from pipeline.config import load_settings
from pipeline.records import encode_forget
from pipeline.snapshot_files import Buffer, read_events, read_sessions, write_snapshot
from pipeline.snapshot_privacy import expire, forget_rows, pseudonymizer
from pipeline.snapshot_tools import list_files

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR


def _buffer(rows, key=""):
    stored = pseudonymizer(key)
    buf = Buffer()
    for part, off, user, item, t in rows:
        buf.add(part, off, Event(user, item, 0, t), stored(user))
    return buf


ROWS = [(0, 0, "ann", "i1", T0), (0, 1, "bob", "i2", T0 + 1), (0, 2, "ann", "i3", T0 + 2),
        (1, 0, "cid", "i4", T0 + 3), (0, 3, "ann", "i5", T0 + HOUR), (1, 1, "bob", "i6", T0 + HOUR + 1)]


def test_the_stored_id_is_hmac_sha256_of_the_id_under_the_key_and_the_id_itself_without_one():
    assert pseudonymizer("")("ann") == "ann"
    stored = pseudonymizer("k1")("ann")
    assert stored == hmac.new(b"k1", b"ann", hashlib.sha256).hexdigest() and len(stored) == 64
    assert pseudonymizer("k2")("ann") != stored and pseudonymizer("k1")("bob") != stored


def test_training_reads_pseudonymous_snapshots_into_the_same_sessions(tmp_path):
    write_snapshot(str(tmp_path / "raw"), _buffer(ROWS))
    write_snapshot(str(tmp_path / "hashed"), _buffer(ROWS, key="k1"))
    raw, hashed = read_sessions(tmp_path / "raw"), read_sessions(tmp_path / "hashed")
    assert sorted(s.items for s in raw) == sorted(s.items for s in hashed) and len(raw) == 5
    users = {e.user_id for e in read_events(tmp_path / "hashed")}
    assert users == {pseudonymizer("k1")(u) for u in ("ann", "bob", "cid")}


def test_forget_rows_removes_every_row_of_the_user_and_leaves_the_rest_as_it_was(tmp_path):
    root = str(tmp_path)
    write_snapshot(root, _buffer(ROWS, key="k1"))
    before = read_events(root)
    assert len(list_files(root).files) == 4  # (partition, hour): (0, T0), (1, T0), (0, T0+1h), (1, T0+1h)
    ann = pseudonymizer("k1")("ann")
    done = forget_rows(root, [ann])
    assert (done.files_scanned, done.files_rewritten, done.files_removed) == (4, 1, 1)  # ann alone in (0, T0+1h)
    assert (done.rows_removed, done.events_removed) == (2, 3)
    after = read_events(root)
    assert ann not in {e.user_id for e in after}
    assert sorted((e.user_id, e.item_id) for e in after) == sorted((e.user_id, e.item_id) for e in before if e.user_id != ann)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporary file left
    again = forget_rows(root, [ann])  # a redelivered request changes nothing
    assert (again.rows_removed, again.files_rewritten, again.files_removed) == (0, 0, 0)


def test_expire_deletes_the_files_of_hours_older_than_the_retention(tmp_path):
    now = T0 + 10 * DAY
    rows = [(0, 0, "ann", "i1", now - 3 * DAY), (0, 1, "bob", "i2", now - DAY - 2 * HOUR), (0, 2, "cid", "i3", now - HOUR)]
    write_snapshot(str(tmp_path), _buffer(rows))
    done = expire(str(tmp_path), 1.0, now)
    assert done.files_removed == 2 and done.oldest_kept.startswith("dt=")
    assert [e.user_id for e in read_events(tmp_path)] == ["cid"]


class _Consumer:
    def __init__(self):
        self.commits = []

    async def commit(self, offsets):
        self.commits.append(offsets)


class _Producer:
    def __init__(self):
        self.sent = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append((topic, key, json.loads(value)))

    async def stop(self):
        pass


def test_a_forget_request_drops_buffered_events_removes_written_rows_then_commits_and_reports(tmp_path):
    from prometheus_client import CollectorRegistry

    from pipeline.metrics import Metrics
    from pipeline.snapshots import SnapshotConsumer

    root = tmp_path / "snap"
    settings = load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_SNAPSHOT_DIR": str(root),
                              "RECUR_SNAPSHOT_USER_KEY": "k1"})
    snap = SnapshotConsumer(settings, Metrics(CollectorRegistry()))
    snap.consumer, snap.producer = _Consumer(), _Producer()
    events, forget = TopicPartition("events", 0), TopicPartition("forget", 0)
    snap.positions[events] = 0
    write_snapshot(str(root), _buffer(ROWS[:3], key="k1"))  # an earlier flush: ann's and bob's rows
    for part, off, user, item, t in ROWS[4:]:  # buffered, not written yet: one of ann's, one of bob's
        snap.pending.add(part, off, Event(user, item, 0, t), snap.stored_id(user))
    key, value = encode_forget("ann", "req-1", T0)
    snap._forget(SimpleNamespace(key=key, value=value, partition=0, offset=7, timestamp=T0))
    assert len(snap.pending) == 1  # ann's buffered event is gone at once
    snap.offsets.update({events: 4, forget: 8})
    asyncio.run(snap.flush())
    assert snap.consumer.commits == [{events: 4, forget: 8}] and snap.forgets == []
    assert {e.user_id for e in read_events(root)} == {snap.stored_id("bob")}
    [(topic, rkey, report)] = snap.producer.sent
    assert topic == "forget-reports" and rkey == b"req-1"
    assert report["part"] == "snapshots" and report["events_removed"] == 2 and "ann" not in report.values()
    assert snap.metrics.forget_requests.labels("snapshots")._value.get() == 1
    assert snap.unclean == set()  # the forget topic's partitions never go to the files' clean-up


def test_the_key_is_a_secret_of_the_environment_and_never_printed():
    settings = load_settings({"RECUR_SNAPSHOT_USER_KEY": "s3cret"})
    assert settings.snapshot_user_key == "s3cret" and settings.public()["snapshot_user_key"] == "***"
