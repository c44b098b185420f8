"""Fitting the recurrent forecaster: truncated back-propagation through each series' whole history.

Series are batched (similar lengths together) and run from the zero state to their end in chunks of
``chunk_length`` values; the state is carried from chunk to chunk (detached), so the model learns to run
indefinitely, as it does in serving. Inputs are scaled by ``Scaling.transform_values`` (the serving code),
and targets and baselines read the values as it folded them in (a glitch moved into its series' range);
targets are the next ``horizon`` values in the units of the forecast made at t (the forecast in data units
is ``denormalize(stats_t, y_t)``, so the target is its inverse). Loss: the mean absolute (``loss="mae"``,
the default: the median, what MAE and MASE score) or squared (``"mse"``) error over all horizon steps
whose target lies in the series' training part; validation loss: the same over targets in its last
fraction.

>>> from forecaster.model import RecurrentForecaster
>>> from forecaster.scaling import Scaling
>>> model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2)
>>> v = [np.sin(np.arange(60) / 3.0) + 5.0]
>>> result = fit(model, v, Scaling(), epochs=2, chunk_length=16, progress=False)
>>> result.epochs, len(result.train_losses)
(2, 2)
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling

log = logging.getLogger(__name__)


def split_point(n: int, validation_fraction: float) -> int:
    """Values of a series of length ``n`` that belong to its training part (the rest is validation)."""
    return n - int(round(n * validation_fraction))


@dataclass
class Batch:
    """Series of one batch, right-padded to ``L``: inputs, statistics, and what targets are made of."""

    rows: list[int]  # positions in the caller's list
    n: np.ndarray  # (B,) length of each series
    n_train: np.ndarray  # (B,) training values of each series
    x: torch.Tensor  # (B, L, 1) float32 model inputs (0 past the end)
    stats: torch.Tensor  # (B, L, N_STATS) float64 scaling statistics after each value
    v: torch.Tensor  # (B, L + H) float64 values, NaN past the end
    values: (
        torch.Tensor
    )  # (B, L) float64 values, right-padded with each series' last one (what baselines read)
    scaling: Scaling  # what made ``x`` and ``stats``: targets go to the units of the input at their origin


def make_batches(
    values: Sequence[np.ndarray],
    scaling: Scaling,
    horizon: int,
    batch_series: int,
    validation_fraction: float,
    season: int = 1,
) -> list[Batch]:
    """Group series of similar length into padded batches, scaled once. A NaN value is a missing period of
    its series (on its time grid): stepped with the value ``season`` earlier as the engine steps it, never
    a target."""
    order = sorted(range(len(values)), key=lambda i: len(values[i]))
    order = [i for i in order if len(values[i]) > 0]
    batches = []
    for lo in range(0, len(order), batch_series):
        rows = order[lo : lo + batch_series]
        n = np.array([len(values[i]) for i in rows], dtype=np.int64)
        length = int(n.max())
        raw = np.zeros((len(rows), length))
        for r, i in enumerate(rows):  # right-pad with the last value: causal scaling ignores what follows
            raw[r, : n[r]] = values[i]
            raw[r, n[r] :] = values[i][-1]
        gap = np.isnan(raw)
        x, stats, folded = scaling.transform_values(raw, season=season)  # (B, L) float32, stats, (B, L)
        raw = folded.numpy()  # the values as the engine keeps them (a glitch moved into its series' range)
        past_end = torch.arange(length)[None, :] >= torch.as_tensor(n)[:, None]  # (B, L)
        missing = past_end | torch.from_numpy(gap)  # (B, L) no target here
        v = torch.full((len(rows), length + horizon), math.nan, dtype=torch.float64)
        v[:, :length] = torch.from_numpy(raw).masked_fill(missing, math.nan)
        batches.append(
            Batch(
                rows=rows,
                n=n,
                n_train=np.array([split_point(int(k), validation_fraction) for k in n]),
                x=x.masked_fill(past_end, 0.0).unsqueeze(-1),
                stats=stats,
                v=v,
                values=torch.from_numpy(raw),
                scaling=scaling,
            )
        )
    return batches


# What a forecast error costs in training: squared (the mean) or absolute (the median, what MAE and MASE score).
LOSSES = {"mse": torch.square, "mae": torch.abs}
MAX_SCALED_TARGET = 1e6  # targets further out (in scales of their series) are left out of the loss


def chunk_targets(
    batch: Batch, start: int, stop: int, horizon: int, warmup: int, part: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled targets (B, stop - start, H) float32 of forecasts made at t in [start, stop), and their mask.

    ``part`` picks the targets that count: ``"train"`` (inside each series' training part) or
    ``"validation"`` (in its last fraction). Forecasts made before ``warmup`` values never count.
    """
    future = batch.v[:, start + 1 : stop + horizon].unfold(1, horizon, 1)  # (B, stop - start, H)
    target = batch.scaling.rescale(batch.stats[:, start:stop], future)  # (B, T, H) float32
    index = (
        torch.arange(start, stop)[None, :, None] + torch.arange(1, horizon + 1)[None, None, :]
    )  # (1, T, H)
    n_train = torch.as_tensor(batch.n_train)[:, None, None]  # (B, 1, 1)
    in_part = index < n_train if part == "train" else index >= n_train  # (B, T, H)
    origin_ok = torch.arange(start, stop)[None, :, None] >= warmup  # (1, T, 1)
    # a target this many of its series' scales away is an outlier (e.g. 1e29 among values of 10): its
    # square would overflow the loss, and fitting it would teach the net nothing it can use
    plausible = target.abs() <= MAX_SCALED_TARGET
    mask = in_part & origin_ok & torch.isfinite(target) & plausible
    return target.nan_to_num(0.0).masked_fill(~plausible, 0.0).float(), mask


@dataclass
class FitResult:
    """What ``fit`` did: epochs run, mean losses per epoch (scaled, ``fit``'s ``loss``), and the best validation loss."""

    epochs: int
    train_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    best_validation_loss: float = math.nan
    stopped_early: bool = False


def fit(
    model: RecurrentForecaster,
    values: Sequence[np.ndarray],
    scaling: Scaling,
    *,
    epochs: int = 20,
    chunk_length: int = 64,
    batch_series: int = 64,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.2,
    patience: int = 3,
    warmup: int = 8,
    seed: int = 0,
    progress: bool | None = None,
    loss: str = "mae",
) -> FitResult:
    """Train ``model`` in place on per-series ``values``; the weights of the best validation epoch are kept."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    horizon = model.horizon
    batches = make_batches(values, scaling, horizon, batch_series, validation_fraction, model.season)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    rng = random.Random(seed)
    result = FitResult(epochs=0)
    best_state, best, waited = None, math.inf, 0
    steps_per_epoch = sum(math.ceil(max(int(b.n_train.max()) - 1, 0) / chunk_length) for b in batches)
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc="train",
        unit="chunk",
        disable={True: False, False: True, None: None}[progress],
    )
    try:
        for epoch in range(epochs):
            train_loss = _train_epoch(
                model, rng.sample(batches, len(batches)), optimizer, chunk_length, warmup, bar, loss
            )
            validation_loss = validation_error(model, batches, chunk_length, warmup, loss)
            result.epochs = epoch + 1
            result.train_losses.append(train_loss)
            result.validation_losses.append(validation_loss)
            watched = validation_loss if math.isfinite(validation_loss) else train_loss
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{validation_loss:.4f}")
            log.info(
                "epoch %d: train loss %.5f, validation loss %.5f", epoch + 1, train_loss, validation_loss
            )
            if watched < best:
                best, best_state, waited = watched, copy.deepcopy(model.state_dict()), 0
            else:
                waited += 1
                if waited >= patience:
                    result.stopped_early = True
                    log.info("early stop after epoch %d: no improvement for %d epochs", epoch + 1, patience)
                    break
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.best_validation_loss = best
    model.eval()
    return result


def _forward(model: RecurrentForecaster, batch: Batch, start: int, stop: int, h: Any) -> tuple:
    """The model over positions ``start .. stop - 1`` of ``batch`` from state ``h``, with its baseline
    read as the serving engine reads it (``RecurrentForecaster.scaled_baseline``)."""
    base = model.scaled_baseline(batch.values, batch.stats, batch.scaling, start, stop)  # (B, T, H) or None
    return model(batch.x[:, start:stop], h, base=base)  # (B, T, H), state


def _train_epoch(
    model: RecurrentForecaster,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    chunk_length: int,
    warmup: int,
    bar: tqdm,
    loss: str = "mae",
) -> float:
    model.train()
    penalty = LOSSES[loss]
    total, count = 0.0, 0
    for batch in batches:
        end = int(batch.n_train.max()) - 1  # the last origin with a training target
        h = None
        for start in range(0, max(end, 0), chunk_length):
            stop = min(start + chunk_length, end)
            y, h = _forward(model, batch, start, stop, h)  # (B, T, H)
            h = tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach()
            target, mask = chunk_targets(batch, start, stop, model.horizon, warmup, "train")
            bar.update(1)
            n = int(mask.sum())
            if n == 0:
                continue
            cost = (penalty(y - target) * mask).sum() / n
            optimizer.zero_grad(set_to_none=True)
            cost.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += float(cost.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / count:.4f}")
    return total / count if count else math.nan


def validation_error(
    model: RecurrentForecaster, batches: list[Batch], chunk_length: int, warmup: int, loss: str = "mae"
) -> float:
    """Scaled mean ``loss`` (``LOSSES``) of the forecasts whose targets lie in each series' validation part."""
    penalty = LOSSES[loss]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            h = None
            length = batch.x.shape[1]
            first = max(int(batch.n_train.min()) - 1, 0)  # forecasts before it have no validation target
            for start in range(0, length, max(chunk_length, 256)):
                stop = min(start + max(chunk_length, 256), length)
                y, h = _forward(model, batch, start, stop, h)  # (B, T, H)
                if stop <= first:
                    continue
                target, mask = chunk_targets(batch, start, stop, model.horizon, warmup, "validation")
                total += float((penalty(y - target) * mask).sum())
                count += int(mask.sum())
    model.train(was_training)
    return total / count if count else math.nan
