"""The seasons a baseline may use: from the calendar first, then one more from autocorrelation.

The spacing of the timestamps names the usual seasons before any statistics: monthly data repeats
yearly (12), quarterly too (4), weekly data yearly (52), daily data weekly and yearly (7, 365), hourly
data daily and weekly (24, 168), and so on. A trend swamps a yearly pattern in the autocorrelation of the
values, so the statistical estimate (``detect_season``, on first differences) only adds one more
candidate. A candidate is kept when the history holds two of its seasons and the retained window
(``state.window``) holds what its baseline reads; the log says which were tried and why each other
was dropped.

>>> day = 86_400_000
>>> calendar_seasons([np.arange(0, 30 * day, day)])
('daily', (7, 365))
>>> calendar_seasons([np.array([0, 17, 99])])
('irregular', ())
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forecaster.train.baselines import detect_season

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
DAY_MS = 1440 * MINUTE_MS
# (name, shortest spacing, longest spacing, seasons) of the calendars recognised; spacing in ms.
CALENDARS: tuple[tuple[str, float, float, tuple[int, ...]], ...] = (
    ("minutely", 0.95 * MINUTE_MS, 1.05 * MINUTE_MS, (60, 1440)),
    ("15-minute", 14.5 * MINUTE_MS, 15.5 * MINUTE_MS, (96, 672)),
    ("half-hourly", 29 * MINUTE_MS, 31 * MINUTE_MS, (48, 336)),
    ("hourly", 58 * MINUTE_MS, 62 * MINUTE_MS, (24, 168)),
    ("daily", 0.95 * DAY_MS, 1.05 * DAY_MS, (7, 365)),
    ("weekly", 6.9 * DAY_MS, 7.1 * DAY_MS, (52,)),
    ("monthly", 27.5 * DAY_MS, 31.5 * DAY_MS, (12,)),
    ("quarterly", 88 * DAY_MS, 93 * DAY_MS, (4,)),
)


def calendar_seasons(ts: Sequence[np.ndarray]) -> tuple[str, tuple[int, ...]]:
    """The calendar of the timestamps (epoch ms, per series) by their median spacing, and its seasons."""
    gaps = [np.diff(np.asarray(t, dtype=np.int64)) for t in ts if len(t) > 1]
    if not gaps:
        return "irregular", ()
    spacing = float(np.median(np.concatenate(gaps)))
    for name, low, high, seasons in CALENDARS:
        if low <= spacing <= high:
            return name, seasons
    return "irregular", ()


@dataclass
class SeasonPlan:
    """The seasons the trainer tries: ``season`` (the first: the seasonal-naive reference and MASE's scale)
    and ``more``; ``dropped`` says why each other candidate was not tried."""

    season: int
    more: list[int] = field(default_factory=list)
    tried: dict[int, str] = field(default_factory=dict)  # season -> where it came from
    dropped: dict[int, str] = field(default_factory=dict)  # season -> why not

    def describe(self) -> dict[str, Any]:
        """The manifest's entry: what was tried (and from where), what was dropped (and why)."""
        return {
            "season": self.season,
            "tried": {str(s): why for s, why in self.tried.items()},
            "dropped": {str(s): why for s, why in self.dropped.items()},
        }


def plan_seasons(
    ts: Sequence[np.ndarray],
    training: Sequence[np.ndarray],
    *,
    declared: int | None,
    longer: Sequence[int],
    reach: Any,
    window: int,
) -> SeasonPlan:
    """The seasons to try on series whose timestamps are ``ts`` and training parts ``training``.

    ``declared`` (``train.season``) replaces the calendar and the autocorrelation when set (and stays the
    reference season whatever the data); ``longer`` (``train.seasons``) are added either way.
    ``reach(season)``: the values the plainest baseline of that season reads before the current one; a
    season is dropped unless ``reach(season) < window``."""
    offered: dict[int, str] = {}
    if declared is not None:
        offered[int(declared)] = "declared (train.season)"
    else:
        name, seasons = calendar_seasons(ts)
        for s in seasons:
            offered.setdefault(s, f"calendar ({name})")
        found = detect_season(training)
        if found > 1:
            offered.setdefault(found, "autocorrelation of first differences")
        else:
            log.info("autocorrelation of first differences: no season found")
    for s in longer:
        offered.setdefault(int(s), "declared (train.seasons)")
    longest = max((len(v) for v in training), default=0)
    plan = SeasonPlan(season=1)
    for s, source in offered.items():
        if s <= 1:
            plan.dropped[s] = f"{source}: no season"
        elif longest < 2 * s:
            plan.dropped[s] = (
                f"{source}: the longest training part ({longest} values) holds fewer than two seasons"
            )
        elif reach(s) >= window:
            plan.dropped[s] = f"{source}: its baseline reads {reach(s) + 1} values, state.window is {window}"
        else:
            plan.tried[s] = source
    kept = list(plan.tried)
    if declared is not None:
        plan.season, plan.more = int(declared), [s for s in kept if s != declared]
    elif kept:
        plan.season, plan.more = kept[0], kept[1:]
    for s, source in plan.tried.items():
        log.info("season %d tried: %s", s, source)
    for s, why in plan.dropped.items():
        log.info("season %d dropped: %s", s, why)
    return plan
