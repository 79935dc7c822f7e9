"""Start faust's recovery again when it stops getting changelog records.

Faust's recovery of a worker's active partitions reads their changelog through the worker's own
consumer and waits, with no timeout, until it has read up to the highwaters. Once in ~7 CI runs a
worker that took its partitions back after the other worker was killed (a -> b -> a) waited there
for good: faust logged only "No event received for active tp ... since recovery start", and every
partition of the worker, not just the two it took back, stayed paused (2,788 of 6,000 events
unserved after 2 minutes). Faust's consumer drops a record it fetched when its flow is stopped
while the record is handed over (`Consumer._drain_messages`), and `flow_control.resume()` empties
the changelog queue; a changelog record lost either way is never fetched again (the consumer's
position is past it), so the wait never ends. robinhood/faust PR 542 and faust-streaming issues 21
and 74 report the same hang. Which way it was lost here was not pinned down: the hang is rare and
the log shows no more than that line.

So a watch (a service of the worker) checks the records left to restore. When they stay the
same, above zero, for `recovery_stall_seconds`, it starts the recovery again, as a new rebalance
with the same partitions would: faust reads the highwaters again, the bulk restore
(`pipeline/bulk_restore.py`) reads what is left with its own consumer, and faust seeks its
consumer back to the last record applied. Nothing is lost by a restart: every state record is
keyed, and applying one twice is the same as once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
from mode import Service

from pipeline import faust_internals as internals

log = logging.getLogger(__name__)


@dataclass
class StallClock:
    """When the records left to restore last changed; `due` says when to start again."""

    stall_seconds: float
    remaining: int | None = None
    since: float = 0.0

    def due(self, now: float, in_recovery: bool, remaining: int) -> bool:
        """-> True when recovery has had `remaining` (> 0) records left for `stall_seconds`;
        the clock then starts over, so a recovery that stays stuck is started again each period."""
        if not in_recovery or remaining <= 0:
            self.remaining = None
            return False
        if remaining != self.remaining:
            self.remaining, self.since = remaining, now
            return False
        if now - self.since < self.stall_seconds:
            return False
        self.since = now
        return True


class RecoveryWatch(Service):
    """Checks the app's recovery every few seconds and starts it again when it stalled;
    `restarted()` (counting it) is called at each restart. A service of the faust worker, started
    before the app: faust starts the app's own timers only once its first recovery has ended."""

    def __init__(self, app: faust.App, stall_seconds: float,
                 restarted: Callable[[], object] | None = None, **kwargs: Any) -> None:
        self.faust_app = app
        self.clock = StallClock(stall_seconds)
        self.interval = min(5.0, stall_seconds / 3)
        self.restarted = restarted  # not `on_restart`: mode's Service has a hook of that name
        super().__init__(**kwargs)

    @Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(self.interval)
            self.check(time.monotonic())

    def check(self, now: float) -> bool:
        """-> True when it started the recovery again."""
        recovery = internals.recovery_of(self.faust_app)
        in_recovery, remaining = internals.recovery_progress(recovery)
        if not self.clock.due(now, in_recovery, remaining):
            return False
        log.warning("restore: %d changelog records still to read and none read for %.0f s; "
                    "starting the recovery again", remaining, self.clock.stall_seconds)
        if self.restarted is not None:
            self.restarted()
        internals.restart_recovery(recovery)
        return True
