"""Liveness and readiness that mean something: what ``/healthz`` and ``/readyz`` answer.

The loop reports what happens (a turn, records consumed, the lag, the broker answering, partitions
assigned, revoked or lost); the HTTP thread asks ``healthy()`` and ``ready()`` at any time, even while
a batch runs. A member is *stalled* when, for ``stall_seconds``, it has assigned partitions with lag
but consumes nothing, has lost its group membership without getting partitions back, or its loop has
not turned. A stall is logged once, counted, fails ``/healthz``, and the loop rejoins the group.

>>> now = [0.0]
>>> health = Health(stall_seconds=30, clock=lambda: now[0])
>>> health.assigned([("in", 0)]); health.turned(); health.lag(5)
>>> now[0] = 31.0; health.turned(); why = health.check(); why
'partitions [0] have 5 records of lag and nothing was consumed for 31 s'
>>> health.stall(why), health.healthy()
(True, False)
>>> health.consumed(3); health.check(), health.healthy()
(None, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Health:
    """See the module docstring. ``progress_seconds`` bounds how long ``ready()`` stays true while
    lag does not move (at most ``stall_seconds``); ``turn_seconds`` how long it stays true while the
    loop does not turn (a batch runs at most ``service.max_batch_ms``; a loop held longer waits on the
    broker, e.g. a commit while it is away)."""

    def __init__(
        self,
        stall_seconds: float,
        *,
        progress_seconds: float = 10.0,
        turn_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_seconds = stall_seconds
        self.progress_seconds = min(progress_seconds, stall_seconds)
        self.turn_seconds = min(turn_seconds, stall_seconds)
        self.clock = clock
        now = clock()
        self.last_turn = now
        self.last_progress = now  # records consumed, or no lag, or partitions (re)assigned
        self.partitions: set[int] = set()
        self.lost_since: float | None = None
        self.total_lag: int | None = None
        self.connected = True
        self.polling = False
        self.stopping = False
        self.restoring: Callable[[], bool] = lambda: False
        self.stalled: str | None = None

    # ---- what the loop reports ------------------------------------------------------------------------

    def turned(self) -> None:
        self.last_turn = self.clock()
        self.polling = True

    def consumed(self, records: int) -> None:
        if records:
            self.last_progress = self.clock()
            self._recovered()

    def lag(self, total: int | None) -> None:
        """The total lag of the assigned partitions (None: the broker did not answer)."""
        self.total_lag = total
        if total is None:
            if self.connected:
                log.warning(
                    "the broker does not answer: /readyz reports not ready until it does; the client"
                    " reconnects and the loop carries on from where it was"
                )
            self.connected = False
            return
        if not self.connected:
            log.info("the broker answers again")
        self.connected = True
        if total == 0 and self.partitions:
            self.last_progress = self.clock()
            self._recovered()

    def assigned(self, tps: Iterable[Any]) -> None:
        self.partitions |= {tp[1] for tp in tps}
        self.lost_since = None
        self.last_progress = self.clock()
        self._recovered()

    def revoked(self, tps: Iterable[Any]) -> None:
        self.partitions -= {tp[1] for tp in tps}

    def lost(self, tps: Iterable[Any]) -> None:
        self.partitions -= {tp[1] for tp in tps}
        if not self.partitions and self.lost_since is None:
            self.lost_since = self.clock()

    # ---- the answers ----------------------------------------------------------------------------------

    def check(self) -> str | None:
        """Why the member is stalled now (None: it is not); called by the loop between batches."""
        now = self.clock()
        if self.lost_since is not None and now - self.lost_since >= self.stall_seconds:
            return f"lost its group membership {now - self.lost_since:.0f} s ago and got no partitions back"
        idle = now - self.last_progress
        if self.partitions and self.total_lag and idle >= self.stall_seconds:
            return (
                f"partitions {sorted(self.partitions)} have {self.total_lag} records of lag and nothing was"
                f" consumed for {idle:.0f} s"
            )
        return None

    def stall(self, why: str) -> bool:
        """Note a stall; True the first time (the caller logs, counts and rejoins once per stall)."""
        first = self.stalled is None
        self.stalled = why
        self.last_progress = self.clock()  # the next check waits another stall_seconds
        self.lost_since = None if self.lost_since is None else self.clock()
        return first

    def _recovered(self) -> None:
        if self.stalled is not None:
            log.info("consuming again after a stall (%s)", self.stalled)
            self.stalled = None

    def healthy(self) -> bool:
        """Alive: not stalled, and the loop turned within ``stall_seconds`` (answered from any thread)."""
        stuck = self.polling and self.clock() - self.last_turn >= self.stall_seconds
        return self.stalled is None and not stuck

    def ready(self) -> bool:
        """Holding partitions in a live group, connected, restored, and making progress (or no lag)."""
        now = self.clock()
        progressing = not self.total_lag or now - self.last_progress < self.progress_seconds
        return (
            self.polling
            and not self.stopping
            and bool(self.partitions)
            and self.lost_since is None
            and self.connected
            and not self.restoring()
            and progressing
            and now - self.last_turn < self.turn_seconds
        )
