"""The watch that starts a stalled table restore again (pipeline/recovery_watch.py); the real
broker path is tests/integration/test_resilience.py's restore that waits on a commit marker."""

from __future__ import annotations

from pipeline.recovery_watch import StallClock


def test_a_restore_whose_records_left_stay_the_same_is_due_once_each_stall_period():
    clock = StallClock(stall_seconds=30)
    seen = [(t, clock.due(t, True, 24)) for t in (0, 10, 29.9, 30, 45, 59.9, 60)]
    assert [t for t, due in seen if due] == [30, 60]


def test_a_restore_that_reads_records_is_never_due_however_long_it_takes():
    clock = StallClock(stall_seconds=30)
    assert not any(clock.due(t, True, 1_000_000 - 1000 * t) for t in range(0, 300, 5))


def test_no_restore_or_nothing_left_to_read_is_never_due_and_starts_the_clock_over():
    clock = StallClock(stall_seconds=30)
    assert not clock.due(0, True, 5)
    assert not clock.due(40, False, 5)  # the restore ended meanwhile
    assert not clock.due(41, True, 0)  # a restore with nothing left to read
    assert not clock.due(42, True, 5)  # a new restore: its clock starts here
    assert not clock.due(71.9, True, 5)
    assert clock.due(72, True, 5)


def test_the_watch_starts_a_stalled_recovery_again_and_says_so_once_a_period(tmp_path):
    from collections import Counter

    from faust.types import TP

    from pipeline.app import create_app
    from pipeline.config import load_settings
    from pipeline.recovery_watch import RecoveryWatch

    streams = create_app(load_settings({"RECUR_VAR_DIR": str(tmp_path), "RECUR_APP_ID": "recur-unit"}))
    recovery = streams.app.tables.recovery
    tp = TP(streams.state.changelog_topic.get_topic_name(), 0)
    recovery.active_highwaters = Counter({tp: 16})
    recovery.active_offsets = Counter({tp: 15})  # one record left: a commit marker, say
    recovery._set_recovery_started()
    restarts = []
    watch = RecoveryWatch(streams.app, 30, lambda: restarts.append(1), loop=streams.app.loop)
    assert watch.interval == 5.0
    assert [t for t in (0, 5, 29, 30, 35) if watch.check(t)] == [30]
    assert restarts == [1] and recovery.signal_recovery_start.is_set()
    recovery.signal_recovery_start.clear()
    recovery.active_offsets[tp] = 16  # restored: nothing left
    assert not any(watch.check(t) for t in (40, 60, 90, 120))
    assert restarts == [1] and not recovery.signal_recovery_start.is_set()
