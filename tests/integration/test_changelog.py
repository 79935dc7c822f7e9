"""The state changelog is compacted and its segments roll, so what a restore reads follows the
number of users, not the number of events ever seen (issue 17, "state that moves fast")."""

from __future__ import annotations

import time
from collections import Counter

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from models.synthetic import SyntheticConfig, generate
from pipeline.clients import consume, produce_events, shift_to_now

from .conftest import Watcher, latest_states


def _topic_config(settings, topic: str) -> dict[str, str]:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return {name: entry["value"] for name, entry in described["topic"][topic].items()}
    finally:
        admin.close()


def _records_per_user(settings, topic: str) -> Counter:
    return Counter(key for key, _, _ in consume(settings, topic, 0, 3.0))


def test_the_changelog_is_compacted_and_rolls_so_a_restore_reads_about_one_record_per_user(stack):
    users = 40
    worker = stack.start_worker(RECUR_CHANGELOG_SEGMENT_MS="1000")
    topic = f"{stack.settings.app_id}-user-state-changelog"
    config = _topic_config(stack.settings, topic)
    assert (config["cleanup.policy"], config["segment.ms"], config["segment.bytes"]) == ("compact", "1000", "67108864")
    recs = Watcher(stack.settings, stack.settings.recommendations_topic)
    written, waves, seed = 0, 0, 60
    deadline = time.monotonic() + 120  # the broker's cleaner looks every 15 s (log.cleaner.backoff.ms)
    while True:  # waves of events until the cleaner has compacted the rolled segments
        wave = shift_to_now(generate(SyntheticConfig(n_events=400, n_users=users, seed=seed + waves)))
        produce_events(stack.settings, wave)
        recs.wait_for_events({e.event_id for e in wave}, timeout=60)
        waves += 1
        written = sum(1 for _ in consume(stack.settings, topic, 0, 0.5)) if waves == 1 else written
        per_user = _records_per_user(stack.settings, topic)
        if waves >= 8 and 2 * max(per_user.values()) <= waves or time.monotonic() > deadline:
            break
    states = latest_states(stack.settings)
    assert stack.stop_worker(worker) == 0
    recs.close()
    assert len(per_user) == users and len(states) == users  # every user's state is still there
    assert written >= users  # a wave writes at least one state per user: `waves` records each at least
    assert 2 * max(per_user.values()) <= waves, (waves, per_user.most_common(3))  # over half went: compaction ran
    print(f"changelog: after {waves} waves of 400 events for {users} users, {sum(per_user.values())} records "
          f"({max(per_user.values())} at most per user, each having written {waves} or more); the first wave alone "
          f"had written {written}")
