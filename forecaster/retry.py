"""One way to wait before trying again: exponential back-off with jitter, capped, within a deadline.

The places that retry (the transactional producer being re-created, the broker check at start) use it
instead of fixed sleeps: a first retry comes soon, a broker that stays away is not hammered.

>>> waits = []
>>> backoff = Backoff(first=0.1, factor=2.0, cap=0.5, jitter=0.0, sleep=waits.append)
>>> for _ in range(5):
...     _ = backoff.wait()
>>> waits
[0.1, 0.2, 0.4, 0.5, 0.5]
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays ``first``, ``first * factor``, ... up to ``cap`` seconds, each moved by up to ``jitter`` of itself
    (so instances that failed together do not retry together); ``reset()`` after a success.

    ``deadline`` (a ``clock()`` value) shortens the last wait so it never sleeps past it; ``wait`` returns
    False once the deadline has passed.
    """

    first: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 0.1
    deadline: float | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not (self.first > 0 and self.factor >= 1 and self.cap >= self.first and 0 <= self.jitter < 1):
            raise ValueError("need first > 0, factor >= 1, cap >= first and 0 <= jitter < 1")

    def delay(self) -> float:
        """The next wait, in seconds (before the deadline cuts it)."""
        base = min(self.cap, self.first * self.factor**self.attempts)
        return base * (1.0 + self.jitter * (2.0 * self.rng.random() - 1.0))

    def wait(self) -> bool:
        """Sleep the next delay (cut at the deadline); False when the deadline has already passed."""
        delay = self.delay()
        if self.deadline is not None:
            left = self.deadline - self.clock()
            if left <= 0:
                return False
            delay = min(delay, left)
        self.attempts += 1
        self.sleep(delay)
        return True

    def reset(self) -> None:
        self.attempts = 0
