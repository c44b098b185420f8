"""The service's side of shadow promotion: start a trial, feed it every batch, decide, end it.

With ``checkpoints.promotion = shadow`` the swapper validates the version ``CANDIDATE`` names; at a batch
boundary ``Trial.tend`` starts a ``forecaster.engine.shadow.Shadow`` with it (refused, with a log line,
when a second state table would pass ``state.max_series`` or the forecasts have another length); the loop
calls ``before`` and ``observe`` around each engine step; ``tend`` asks for the verdict and writes the
decision (``forecaster.checkpoints.promotion.decide``): promoted, the version is published and the swapper
swaps it in as the champion (re-warmed, as any swap); rejected, the trial ends. A trial also ends when
``CANDIDATE`` moves on (decided elsewhere: another instance, or by hand) or the champion changes.

The challenger's state is not written to the changelog and its forecasts go nowhere: a restart (or a
rebalance that moves partitions) starts the comparison again from the champion's restored state, and
exactly once concerns the champion's output only, which the trial never changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from forecaster.checkpoints.promotion import decide
from forecaster.engine.shadow import Shadow
from forecaster.errors import CheckpointError
from forecaster.metrics.shadow import ShadowMetrics

log = logging.getLogger(__name__)


class Trial:
    """Shadow promotion in the loop (inactive, and free, with ``checkpoints.promotion = immediate``)."""

    def __init__(self, settings: Any, engine: Any, swapper: Any, registry: Any) -> None:
        self.settings = settings.checkpoints
        self.max_series = settings.state.max_series
        self.enabled = self.settings.promotion == "shadow"
        self.engine = engine
        self.swapper = swapper
        self.metrics = ShadowMetrics(registry) if self.enabled else None
        self.shadow: Shadow | None = None

    # ---- around each engine step ---------------------------------------------------------------------

    def before(self, series: Sequence[str]) -> None:
        if self.shadow is not None:
            self.shadow.before(series)

    def observe(self, series: Sequence[str], ts: Any, values: Any, out: Any) -> None:
        if self.shadow is not None:
            self.shadow.observe(series, ts, values, out)

    # ---- at batch boundaries -------------------------------------------------------------------------

    def tend(self, swapped: str | None) -> None:
        """After a possible swap (``swapped``: the new champion's version): start, decide or end a trial."""
        if not self.enabled:
            return
        shadow = self.shadow
        if shadow is not None and swapped is not None:
            self._end(f"the champion is now {swapped}")
            shadow = None
        if shadow is None:
            loaded = self.swapper.challenger_if_ready()
            if loaded is not None:
                self._start(loaded)
            return
        if self.swapper.candidate_now != shadow.version:
            self._end("CANDIDATE moved on (decided elsewhere, or a newer candidate)", seen=True)
            return
        verdict, detail = shadow.verdict()
        if verdict is not None:
            self._decide(shadow, "promoted" if verdict == "promote" else "rejected", detail)

    def refresh(self) -> None:
        """Every metrics refresh: the challenger follows the champion's evictions; figures out."""
        if self.shadow is not None and self.metrics is not None:
            # Only memory is at stake (a series the champion dropped and the challenger kept has seen no
            # values since in either), so the walk over the challenger's series waits until it holds more.
            if self.shadow.challenger.resident > self.engine.resident:
                self.shadow.prune()
            self.metrics.update(self.shadow)

    # ---- inside ----------------------------------------------------------------------------------------

    def _start(self, loaded: Any) -> None:
        engine = self.engine
        horizon = engine.model.horizon
        if loaded.model.horizon != horizon:
            log.error(
                "candidate %s forecasts %d steps, the champion %d: not tried in shadow (promote it by hand)",
                loaded.version,
                loaded.model.horizon,
                horizon,
            )
            self.swapper.trial_ended(loaded.version, refused=True)
            return
        if not Shadow.fits(engine, self.max_series):
            log.error(
                "candidate %s not tried in shadow: a second state table for the %d resident series (about %d"
                " bytes, as much as the champion's) would pass state.max_series=%d; raise it or promote by"
                " hand",
                loaded.version,
                engine.resident,
                engine.state_bytes,
                self.max_series,
            )
            self.swapper.trial_ended(loaded.version, refused=True)
            return
        self.shadow = Shadow(
            engine,
            loaded.model,
            loaded.version,
            min_values=self.settings.shadow_min_values,
            max_values=self.settings.shadow_max_values,
            z=self.settings.shadow_z,
            coverage=self.settings.shadow_coverage,
        )
        log.info(
            "shadow trial: %s steps beside the champion %s on every value (%d series copied and re-warmed,"
            " second table about %d bytes); promoted after %d values at steps %s when its absolute errors"
            " are lower by more than %.1f standard errors, rejected after %d without that",
            loaded.version,
            engine.version,
            self.shadow.challenger.resident,
            self.shadow.challenger.state_bytes,
            self.settings.shadow_min_values,
            self.shadow.score.steps,
            self.settings.shadow_z,
            self.settings.shadow_max_values,
        )

    def _decide(self, shadow: Shadow, decision: str, detail: dict[str, Any]) -> None:
        try:
            record = decide(self.settings.dir, shadow.version, decision, by="shadow", detail=detail)  # type: ignore[arg-type]
        except CheckpointError as exc:
            log.error(
                "shadow trial of %s: the decision %s could not be written: %s", shadow.version, decision, exc
            )
            self._end("the decision could not be written", refused=True)
            return
        by = "shadow" if record.get("by") == "shadow" and record.get("detail") == detail else "elsewhere"
        steps = ", ".join(
            f"step {s['step']}: MAE {s['mae_champion']:.4g} -> {s['mae_challenger']:.4g} (z {s['z']:.2f}, {s['count']} values)"
            for s in detail["steps"]
        )
        log.info(
            "shadow trial of %s against %s: %s (%s)",
            shadow.version,
            shadow.champion_version,
            record["decision"],
            steps,
        )
        if self.metrics is not None:
            self.metrics.decided(record["decision"], by)
        self._end(f"{record['decision']}", refused=True)
        if record["decision"] == "promoted":
            self.swapper.check_now()  # LATEST names it now: validated for the swap at the next boundary

    def _end(self, why: str, seen: bool = False, refused: bool = False) -> None:
        shadow, self.shadow = self.shadow, None
        if shadow is None:
            return
        log.info("shadow trial of %s ended: %s", shadow.version, why)
        self.swapper.trial_ended(shadow.version, refused=refused or seen)
        if self.metrics is not None:
            self.metrics.update(shadow)  # the figures the decision read
            self.metrics.ended()
