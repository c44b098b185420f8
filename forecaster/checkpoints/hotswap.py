"""Hot swap: the service's first model, and a watcher that swaps in newly published checkpoints.

``initial_model`` picks what the service starts with: the checkpoint ``LATEST`` names, else the last one
published or promoted that still loads (``HISTORY``: a rollback sticks), else a fresh (untrained) model;
in a folder without a ``HISTORY`` (written before it existed) the newest valid one stands in for it. ``ModelSwapper`` watches ``LATEST`` on a daemon thread, loads
and validates a new version there (off the hot path), and ``swap_if_ready(engine)``, called by the
service between two batches, swaps it in with every resident series re-warmed over its retained window
and returns the new version. A refused checkpoint is logged and counted once; the old model keeps serving.

Small tables re-warm at the batch boundary (``engine.rewarm``). Above ``background_above`` retained
values, the windows are copied at one boundary, the new model runs over the copy on another thread while
the old one keeps serving, and later boundaries catch up the values that arrived meanwhile before the
swap (``forecaster.engine.rewarm.RewarmJob``): the pauses are the copies and a short last catch-up, not the
re-warm. Either way no value is skipped or stepped twice.

The metrics (``forecaster_model_swaps_total{result}``, ``forecaster_model_swap_seconds``) live here, on
the registry the caller injects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from prometheus_client import REGISTRY, CollectorRegistry

from forecaster.checkpoints.promotion import candidate_version, decision_of
from forecaster.checkpoints.store import (
    LoadedCheckpoint,
    chosen_versions,
    latest_version,
    list_checkpoints,
    load_checkpoint,
)
from forecaster.engine.rewarm import RewarmJob
from forecaster.errors import CheckpointError
from forecaster.metrics import SwapMetrics
from forecaster.model import RecurrentForecaster, build_model
from forecaster.scaling import Scaling

log = logging.getLogger(__name__)

INIT_VERSION = "init"
BACKGROUND_ABOVE = 1 << 20  # retained values (series x W) above which the re-warm leaves the hot path


class Rewarmable(Protocol):
    """What the swapper needs from the engine (``forecaster.engine.engine.Engine``)."""

    table: Any

    def rewarm(self, model: RecurrentForecaster, version: str) -> Any: ...


def fresh_model(settings: Any, device: str | torch.device = "cpu") -> RecurrentForecaster:
    """An untrained model built from ``settings.model`` (seeded), in eval mode on ``device``."""
    return build_model(settings.model.config, seed=settings.model.seed).to(device).eval()


def initial_model(settings: Any, device: str | torch.device = "cpu") -> tuple[RecurrentForecaster, str]:
    """The model the service starts with and its version; never raises on a bad checkpoint.

    ``LATEST`` if it loads and was trained with the configured scaling; else the most recently chosen
    (published or promoted) version in ``HISTORY`` that does; without a ``HISTORY``, the newest valid
    checkpoint; else a fresh model with version ``"init"``.
    """
    root = Path(settings.checkpoints.dir)
    scaling = Scaling.from_settings(settings.scaling)
    try:
        wanted = latest_version(root)
    except CheckpointError as exc:
        log.error("checkpoint LATEST in %s is unusable: %s", root, exc)
        wanted = None
    if wanted is not None:
        loaded = _load_compatible(root / wanted, device, scaling, settings.state.window)
        if loaded is not None:
            log.info("serving checkpoint %s from %s", loaded.version, root)
            return loaded.model, loaded.version
    chosen = chosen_versions(root)
    if chosen is None:  # no HISTORY: a folder from before it; the newest valid version stands in
        candidates = [
            (i.version, "the newest valid one") for i in reversed(list_checkpoints(root)) if not i.problem
        ]
    else:
        candidates = [(v, "the last one published or promoted that loads") for v in chosen]
    for version, which in candidates:
        if version == wanted or not (root / version).is_dir():
            continue
        loaded = _load_compatible(root / version, device, scaling, settings.state.window)
        if loaded is not None:
            log.warning("serving checkpoint %s, %s in %s (LATEST: %s)", loaded.version, which, root, wanted)
            return loaded.model, loaded.version
    log.warning("no valid checkpoint in %s: serving an untrained model (version %r)", root, INIT_VERSION)
    return fresh_model(settings, device), INIT_VERSION


def _load_compatible(
    path: Path, device: str | torch.device, scaling: Scaling, window: int
) -> LoadedCheckpoint | None:
    try:
        loaded = load_checkpoint(path, device=device)
        _check_compatible(loaded, scaling=scaling, horizon=None, window=window)
        return loaded
    except CheckpointError as exc:
        log.error("checkpoint %s refused: %s", path, exc)
        return None


def _check_compatible(
    loaded: LoadedCheckpoint, *, scaling: Scaling | None, horizon: int | None, window: int | None = None
) -> None:
    if window is not None and loaded.model.context >= window:
        raise CheckpointError(
            f"{loaded.version}: its baseline reads {loaded.model.context} values back, the "
            f"service retains {window} (state.window)"
        )
    if scaling is not None and loaded.scaling != scaling:
        raise CheckpointError(
            f"{loaded.version}: trained with scaling {loaded.scaling.settings}, the service runs {scaling.settings}"
        )
    if horizon is not None and loaded.model.horizon != horizon:
        raise CheckpointError(
            f"{loaded.version}: horizon {loaded.model.horizon}, the service forecasts {horizon}"
        )


class ModelSwapper:
    """Watches a checkpoint folder and hands a validated new model to the engine between two batches.

    >>> import tempfile
    >>> from prometheus_client import CollectorRegistry
    >>> swapper = ModelSwapper(tempfile.mkdtemp(), "init", registry=CollectorRegistry(), poll_seconds=1.0)
    >>> swapper.check_now() is None   # nothing published yet
    True
    >>> swapper.swap_if_ready(engine=None) is None
    True
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        current_version: str,
        registry: CollectorRegistry | None = REGISTRY,
        poll_seconds: float = 5.0,
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.perf_counter,
        *,
        scaling: Scaling | None = None,
        horizon: int | None = None,
        metrics: SwapMetrics | None = None,
        background_above: int = BACKGROUND_ABOVE,
        window: int | None = None,
        promotion: str = "immediate",
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.promotion = promotion  # shadow: CANDIDATE is watched too (a challenger for a trial)
        self._challenger: LoadedCheckpoint | None = None
        self.on_trial: str | None = None  # the candidate the loop is trying in shadow
        self.candidate_now: str | None = None  # what CANDIDATE named at the last look
        self._tried: set[str] = set()  # candidates whose trial ended here (or decided before)
        self.current_version = current_version
        self.poll_seconds = float(poll_seconds)
        self.device = device
        self.clock = clock
        self.scaling = scaling  # refuse checkpoints trained with another scaling
        self.horizon = horizon  # refuse checkpoints whose forecasts have another length
        self.window = window  # refuse checkpoints whose baseline reads further back than the retained window
        self.metrics = metrics or SwapMetrics(registry)
        self.background_above = background_above
        self._job: RewarmJob | None = None
        self._paused = 0.0  # seconds the boundaries of the job in progress paused the loop
        self._lock = threading.Lock()
        self._ready: LoadedCheckpoint | None = None
        # The last version the service thread took from _ready: being swapped in (at the boundary or in the
        # background), then current or refused; the watcher never validates it again meanwhile.
        self._handed: str | None = None
        self._refused: set[str] = set()
        self._last_pointer_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pending_version(self) -> str | None:
        """The validated version waiting for the next batch boundary, if any."""
        with self._lock:
            return self._ready.version if self._ready else None

    def check_now(self) -> str | None:
        """Look at ``LATEST`` once (and at ``CANDIDATE`` in shadow promotion); load and validate a new
        version. Returns the version now pending for a swap."""
        pending = self._check_latest()
        if self.promotion == "shadow":
            self._check_candidate()
        return pending

    # ---- shadow promotion: the candidate on trial ------------------------------------------------------

    def _check_candidate(self) -> None:
        """Load and validate the version ``CANDIDATE`` names when it is new and undecided; it waits in
        ``challenger_if_ready`` for the loop to start a trial."""
        try:
            wanted = candidate_version(self.checkpoint_dir)
        except CheckpointError as exc:
            wanted = None
            if str(exc) != self._last_pointer_error:
                self._last_pointer_error = str(exc)
                self._refuse(None, exc)
        self.candidate_now = wanted
        with self._lock:
            ready = self._challenger.version if self._challenger else None
        if wanted is None or wanted in (self.current_version, ready, self.on_trial):
            return
        if wanted in self._refused or wanted in self._tried:
            return
        try:
            if decision_of(self.checkpoint_dir, wanted) is not None:
                self._tried.add(wanted)  # decided already: never on trial again
                return
            loaded = load_checkpoint(self.checkpoint_dir / wanted, device=self.device)
            _check_compatible(loaded, scaling=self.scaling, horizon=self.horizon, window=self.window)
        except CheckpointError as exc:
            self._refuse(wanted, exc)
            return
        log.info("candidate %s validated; it goes on trial in shadow at the next batch boundary", wanted)
        with self._lock:
            self._challenger = loaded

    def challenger_if_ready(self) -> LoadedCheckpoint | None:
        """The validated candidate waiting for its trial (taken: it is then ``on_trial``), or None."""
        with self._lock:
            ready, self._challenger = self._challenger, None
        if ready is not None:
            if self.candidate_now != ready.version:  # replaced or decided meanwhile
                return None
            self.on_trial = ready.version
        return ready

    def trial_ended(self, version: str, refused: bool = False) -> None:
        """The trial of ``version`` is over (``refused``: decided, or refused to start: never tried again
        here; a promoted version still swaps in through ``LATEST``)."""
        if refused:
            self._tried.add(version)
        if self.on_trial == version:
            self.on_trial = None

    # ---- the published version -------------------------------------------------------------------------

    def _check_latest(self) -> str | None:
        try:
            wanted = latest_version(self.checkpoint_dir)
        except CheckpointError as exc:
            if str(exc) != self._last_pointer_error:  # log and count a bad pointer once, not every poll
                self._last_pointer_error = str(exc)
                self._refuse(None, exc)
            return self.pending_version
        self._last_pointer_error = None
        with self._lock:  # one look at both: the service thread moves a version from _ready to _handed
            pending, handed = (self._ready.version if self._ready else None), self._handed
        if wanted is None or wanted in (self.current_version, pending, handed) or wanted in self._refused:
            return pending
        try:
            loaded = load_checkpoint(self.checkpoint_dir / wanted, device=self.device)
            _check_compatible(loaded, scaling=self.scaling, horizon=self.horizon, window=self.window)
        except CheckpointError as exc:
            self._refuse(wanted, exc)
            return pending
        log.info("checkpoint %s validated; swapping it in at the next batch boundary", wanted)
        with self._lock:
            self._ready = loaded
        return wanted

    def swap_if_ready(self, engine: Rewarmable | None) -> str | None:
        """At a batch boundary: swap in the pending model if it is ready; the new version, or None.

        A large table takes two boundaries: this one copies the windows and starts the background
        re-warm (returns None), a later one catches up and swaps (returns the version).
        """
        if engine is None:
            return None
        if self._job is not None:
            return self._advance_job(engine)
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is not None:
                self._handed = ready.version
        if ready is None:
            return None
        started = self.clock()
        if _retained_values(engine) > self.background_above:
            try:
                self._job = RewarmJob(ready.model, ready.version, engine)
            except Exception as exc:
                self._refuse(ready.version, exc)
                return None
            self._paused = self.clock() - started
            log.info("re-warming %d series with %s in the background", len(self._job.slots), ready.version)
            return None
        try:
            engine.rewarm(ready.model, ready.version)
        except Exception as exc:  # the old model keeps serving whatever went wrong
            self._refuse(ready.version, exc)
            return None
        return self._swapped(ready.version, self.clock() - started, "")

    def wait_rewarm(self, timeout: float | None = None) -> bool:
        """Block until background work in progress is done (True), or ``timeout`` passes."""
        job = self._job
        return True if job is None else job.wait(timeout)

    def _advance_job(self, engine: Rewarmable) -> str | None:
        job = self._job
        assert job is not None
        if job.busy:
            return None
        started = self.clock()
        try:
            if job.engine is not engine:
                raise RuntimeError("the engine changed during the re-warm")
            counts = job.at_boundary(engine)
        except Exception as exc:  # the background work failed: the engine was not touched
            self._job = None
            self._refuse(job.version, exc)
            return None
        self._paused += self.clock() - started
        if counts is None:  # another background pass started
            return None
        self._job = None
        detail = f" (background {job.background_seconds:.3f} s; {counts})"
        return self._swapped(job.version, self._paused, detail)

    def _swapped(self, version: str, seconds: float, detail: str) -> str:
        self.metrics.seconds.observe(seconds)
        self.metrics.swaps.labels(result="ok").inc()
        log.info("model swapped: %s -> %s, paused %.3f s%s", self.current_version, version, seconds, detail)
        self.current_version = version
        return version

    def start(self) -> ModelSwapper:
        """Start the watcher thread (a daemon); returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="forecaster-model-swapper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the watcher thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _watch(self) -> None:
        while True:
            try:
                self.check_now()
            except Exception:  # the watcher must outlive any surprise; the service keeps serving
                log.exception("checkpoint watcher: unexpected error")
            if self._stop.wait(self.poll_seconds):
                return

    def _refuse(self, version: str | None, exc: BaseException) -> None:
        if version is not None:
            self._refused.add(version)
        self.metrics.swaps.labels(result="refused").inc()
        log.error(
            "checkpoint %s refused, still serving %s: %s", version or "LATEST", self.current_version, exc
        )


def _retained_values(engine: Any) -> int:
    table = getattr(engine, "table", None)
    return 0 if table is None else int(table.resident) * int(table.window_size)
