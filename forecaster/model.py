"""The recurrent forecaster: one GRU, LSTM or plain RNN stack with a linear head to ``horizon`` values.

``forward`` runs a whole sequence; ``step`` is its time = 1 case, which serving calls once per new value.
``step`` takes a fused path (torch's ``gru_cell`` / ``lstm_cell`` / ``rnn_tanh_cell`` per layer on the
module's own weights) that skips ``nn.GRU``'s per-call checks; a test holds it equal to ``forward``.

With ``base_seasons = m > 0`` the model forecasts a residual over a seasonal baseline read from the
series' recent values: for step k, the mean of the values at the same phase in each of the last m
seasons (``season = 1, m = 1``: the last value); with ``base_level`` that pattern is moved to the current
level (plus the newest value, minus the mean of the values one cycle earlier at the same phase: seasonal
naive with the year-on-year change of level, which suits trending series). Per step, a weight ``mix``
(a parameter, 0 at first) moves that baseline toward the last value: step 1 of a half-hourly load is
closer to the last half hour, step 48 to the same time yesterday. The head starts at zero, so an untrained
model forecasts exactly that baseline, and training learns what the baseline misses.

With ``trend_span = L > 0`` the baseline also carries a trend: the slope per step is the mean of the newest
season of values minus the mean of the season ``L`` values earlier, over ``L`` (for ``season = 1``:
``(newest - value L back) / L``, the drift of the last L steps); each step adds that slope times how far
the target lies past the values the baseline read, damped by ``damping`` (phi): ``phi + ... + phi^age``.
For seasonal naive the age is a whole number of seasons (the mean age of the seasons averaged), which
makes it seasonal naive plus the recent mean seasonal change; for the last value or a level-moved
baseline it is the step itself, a damped local trend.

The baseline is a weighted sum of values whose weights add up to one, so it commutes with any shift and
scale: it is computed on the earlier values expressed in the units of the *current* input (the scaling
statistics at the current value), which equals the baseline in data units, scaled. (Each input in the units
it had when it was stepped would not: a running mean and deviation move, most of all on trending series.)
The baseline needs the ``context`` values before the current one: ``step`` takes them as ``past``, in the
current input's units (NaN for values before a series' first); ``forward`` over a scaled sequence takes
the baselines ready-made (``base``, see ``scaled_baseline``). Seasons not seen yet are left out of the
mean; with none seen for a step, its baseline is the newest value (the last value).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

# A hidden state: (layers, batch, hidden), or (h, c) for an LSTM.
State = Tensor | tuple[Tensor, Tensor]

CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
_FUSED_CELLS = {"gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}


class ForecasterConfig(BaseModel):
    """The build arguments of a ``RecurrentForecaster``, with their limits (settings, manifests, loader).

    Settings read it from the environment (``FORECASTER_MODEL__HIDDEN_SIZE=32``); manifests are checked
    strictly (``Manifest``): there a ``"12"`` is not a season and ``true`` is not a layer count.

    >>> config = ForecasterConfig(cell="lstm", hidden_size=8, num_layers=1, horizon=3)
    >>> build_model(config).config == config
    True
    >>> from pydantic import ValidationError
    >>> try:
    ...     ForecasterConfig(season=0)
    ... except ValidationError as exc:
    ...     print(exc.errors()[0]["loc"], exc.errors()[0]["type"])
    ('season',) greater_than_equal
    """

    model_config = ConfigDict(extra="forbid")

    cell: Literal["gru", "lstm", "rnn"] = "gru"
    input_size: int = Field(default=1, ge=1, le=64)
    hidden_size: int = Field(default=64, ge=1, le=4096)
    num_layers: int = Field(default=2, ge=1, le=16)
    horizon: int = Field(default=12, ge=1, le=1024)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # The baseline the model forecasts a residual over (module docstring); 0 seasons: none.
    season: int = Field(default=1, ge=1, le=100_000)
    base_seasons: int = Field(default=0, ge=0, le=16)
    base_level: bool = False
    trend_span: int = Field(default=0, ge=0, le=100_000)  # values between the two seasons giving the slope
    damping: float = Field(default=1.0, gt=0.0, le=1.0)  # of the trend, per step ahead
    # The spacing of the series the model was trained on (ms; 0: none found): one step is one period, and
    # the service puts series on that time grid (``forecaster.timegrid``).
    period_ms: int = Field(default=0, ge=0, le=2**62)
    # With a baseline: the net also reads the baseline's last one-step error (module docstring).
    error_input: bool = False

    @model_validator(mode="after")
    def _baseline_reads_the_value(self) -> ForecasterConfig:
        if self.base_seasons and self.input_size != 1:
            raise ValueError("a seasonal baseline reads the value input: input_size must be 1")
        return self


def build_model(config: ForecasterConfig, seed: int | None = None) -> RecurrentForecaster:
    """The one way to build a model from its config; ``seed`` makes the initial weights repeatable."""
    if seed is not None:
        torch.manual_seed(seed)
    return RecurrentForecaster(**config.model_dump())


class RecurrentForecaster(nn.Module):
    """A recurrent stack whose output after each step is a forecast of the next ``horizon`` values.

    ``y[..., k]`` is the (scaled) value expected ``k + 1`` steps after the input.

    >>> model = RecurrentForecaster("gru", hidden_size=8, num_layers=2, horizon=3)
    >>> y, h = model(torch.zeros(4, 10, 1))
    >>> tuple(y.shape), tuple(h.shape)
    ((4, 10, 3), (2, 4, 8))
    >>> y1, h1 = model.step(torch.zeros(4, 1), model.initial_state(4))
    >>> tuple(y1.shape)
    (4, 3)
    """

    def __init__(
        self,
        cell: str = "gru",
        input_size: int = 1,
        hidden_size: int = 64,
        num_layers: int = 2,
        horizon: int = 12,
        dropout: float = 0.0,
        season: int = 1,
        base_seasons: int = 0,
        base_level: bool = False,
        trend_span: int = 0,
        damping: float = 1.0,
        period_ms: int = 0,
        error_input: bool = False,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if min(input_size, hidden_size, num_layers, horizon, season) < 1 or min(base_seasons, trend_span) < 0:
            raise ValueError(
                "input_size, hidden_size, num_layers, horizon and season must be >= 1, base_seasons and "
                "trend_span >= 0"
            )
        if not 0.0 < damping <= 1.0:
            raise ValueError("damping must be in (0, 1]")
        if base_seasons and input_size != 1:
            raise ValueError("a seasonal baseline reads the value input: input_size must be 1")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.horizon = horizon
        self.dropout = float(dropout)
        self.season = int(season)
        self.base_seasons = int(base_seasons)
        self.base_level = bool(base_level) and self.base_seasons > 0
        self.trend_span = int(trend_span) if self.base_seasons else 0
        self.damping = float(damping)
        self.period_ms = int(period_ms)
        self.error_input = bool(error_input) and self.base_seasons > 0
        # nn.GRU warns about dropout with a single layer; it has no effect there anyway.
        rnn_dropout = self.dropout if num_layers > 1 else 0.0
        self.rnn = CELLS[cell](
            input_size + self.error_input, hidden_size, num_layers, batch_first=True, dropout=rnn_dropout
        )
        self.head = nn.Linear(hidden_size, horizon)
        if self.base_seasons:  # an untrained model forecasts the baseline itself
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.mix = nn.Parameter(torch.zeros(horizon))  # (horizon,) weight of the last value, per step
        # How far back from the newest input the baseline reads, per season averaged and step: (m, horizon).
        step = torch.arange(1, horizon + 1)
        cycles = torch.ceil(step / self.season).long()  # (horizon,) seasons between a target and its value
        back = self.season * cycles - step  # (horizon,) in [0, season)
        seasons = torch.arange(max(self.base_seasons, 1))[:, None] * self.season  # (m, 1)
        self.register_buffer("_back", back[None, :] + seasons, persistent=False)  # (m, horizon)
        # base_level: the inputs a whole number of cycles before the newest one, (m, horizon).
        self.register_buffer("_lag", self.season * cycles[None, :] + seasons, persistent=False)
        # trend_span: the newest season of values and the one trend_span earlier, (2, season) back.
        block = torch.arange(self.season)
        self.register_buffer("_block", torch.stack([block, block + self.trend_span]), persistent=False)
        # How many steps the target lies past the values the baseline read, damped: (horizon,).
        anchored = self.season == 1 or self.base_level
        age = step.double() if anchored else self.season * (cycles + (max(self.base_seasons, 1) - 1) / 2.0)
        phi = self.damping
        ahead = age if phi == 1.0 else phi * (1.0 - phi**age) / (1.0 - phi)
        self.register_buffer("_ahead", ahead.float(), persistent=False)
        reach = int((self._lag if self.base_level else self._back).max())
        if self.trend_span:
            reach = max(reach, int(self._block.max()))
        # Read on every step, computed once: the baseline reads ``reach`` inputs back; its error one more.
        self._reach = reach if self.base_seasons else 0
        self._context = self._reach + self.error_input
        self._packed: list[list[Tensor]] | None = None  # per layer [w_ih, w_hh, b_ih, b_hh], for step()

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): weights may be new tensors
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    @property
    def config(self) -> ForecasterConfig:
        """The build arguments: ``build_model(model.config)`` rebuilds the same shape."""
        return ForecasterConfig(**{name: getattr(self, name) for name in ForecasterConfig.model_fields})

    @property
    def is_lstm(self) -> bool:
        return self.cell == "lstm"

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """The zero state for ``batch`` series."""
        device = self.head.weight.device if device is None else device
        h = torch.zeros(self.num_layers, batch, self.hidden_size, device=device)  # (layers, batch, hidden)
        return (h, torch.zeros_like(h)) if self.is_lstm else h

    @property
    def context(self) -> int:
        """Inputs before the current one that the baseline reads (0: no baseline)."""
        return self._context

    def scaled_baseline(
        self, values: Tensor, stats: Tensor, scaling: Any, start: int, stop: int
    ) -> Tensor | None:
        """The baseline after each of positions ``start .. stop - 1`` of series ``values`` (batch, T) in data
        units (NaN past a series' end), in the units of the model input at that position (``stats``
        (batch, T, N_STATS) after each value; the baseline is computed on ``scaling.inner`` values, the
        logarithms for log scaling): the ``base`` of ``forward(x[:, start:stop], ...)``; None
        without a baseline. Values are read as float32, as the serving engine's ring buffer keeps them.
        With ``error_input`` a last column is added, (batch, T, horizon + 1): the step-1 baseline after the
        input before each, in that input's units (what the baseline's one-step error is taken from)."""
        if not self.base_seasons:
            return None
        lo = max(0, start - self.context)
        got = scaling.inner(values[:, lo:stop].float().double())  # (batch, <= context + T) float32 values
        full = F.pad(got, (self.context - (start - lo), 0), value=math.nan)  # (batch, context + T)
        seq, before = self._baselines(full)  # (batch, T, horizon), (batch, T) or None
        base = scaling.standardize(stats[:, start:stop], seq)  # (batch, T, horizon)
        if before is None:
            return base
        before = scaling.standardize(stats[:, start:stop], before[..., None])  # (batch, T, 1)
        return torch.cat([base, before], -1)

    def baseline(self, recent: Tensor) -> Tensor:
        """Baseline forecasts in scaled units after the newest of ``recent`` (batch, n) inputs (NaN stands
        for values before a series began; fewer than ``context + 1`` are padded so): (batch, horizon)."""
        need = self.context + 1
        if recent.shape[1] < need:
            recent = F.pad(recent, (need - recent.shape[1], 0), value=math.nan)
        recent = recent[:, -need:]
        return self._baseline_seq(recent)[:, -1]  # (batch, horizon)

    def _baselines(self, full: Tensor) -> tuple[Tensor, Tensor | None]:
        """``full`` (batch, context + T) inputs -> the baseline after each of the last T (batch, T, horizon),
        and with ``error_input`` the step-1 baseline after the input before each (batch, T), without
        gradients (an input of the net)."""
        if not self.error_input:
            return self._baseline_seq(full), None
        seq = self._baseline_seq(full)  # (batch, T + 1, horizon): both from one pass
        return seq[:, 1:], seq[:, :-1, 0].detach()

    def _baseline_seq(self, full: Tensor) -> Tensor:
        """``full`` (batch, n) inputs -> the baseline after each one that has ``reach`` before it: (batch,
        n - reach, horizon) (with ``n = context + T``: the last T, and with ``error_input`` the one before)."""
        steps = full.shape[1] - self._reach
        now = self._reach + torch.arange(steps, device=full.device)  # position of each newest input
        newest = full[:, now, None]  # (batch, T, 1)
        seasonal = full[:, now[:, None, None] - self._back].nanmean(2)  # (batch, T, horizon), NaN: none seen
        base = torch.where(seasonal.isnan(), newest, seasonal)
        if self.base_level:  # move the pattern by the change of level since one cycle before (if seen)
            base = base + (newest - full[:, now[:, None, None] - self._lag].nanmean(2)).nan_to_num(0.0)
        if self.trend_span:  # the slope per step between two seasons of values, times each target's age
            means = full[:, now[:, None, None] - self._block].nanmean(3)  # (batch, T, 2) newest, earlier
            slope = ((means[..., :1] - means[..., 1:]) / self.trend_span).nan_to_num(0.0)  # (batch, T, 1)
            base = base + slope * self._ahead
        # (NaN before a series' first value stays NaN; nan_to_num keeps 0 * NaN out of mix's gradient)
        return base + self.mix * (newest - base).nan_to_num(0.0)  # (batch, T, horizon)

    def _with_past(self, values: Tensor, past: Tensor | None) -> Tensor:
        past = (
            values.new_full((values.shape[0], self.context), math.nan)
            if past is None
            else past.to(values.dtype)
        )
        return torch.cat([past, values], 1)  # (batch, context + T)

    def forward(
        self, x: Tensor, h: State | None = None, past: Tensor | None = None, base: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """``x`` (batch, time, input_size) -> forecasts (batch, time, horizon) and the final state.

        ``base`` (batch, time, horizon): the baseline after each input, in that input's units
        (``scaled_baseline``). Without it the baseline is read from ``x`` itself, which is right when the
        inputs' units do not change along the sequence (unscaled values); ``past`` (batch, context) are
        then the inputs before ``x[:, 0]``, NaN before the series began (None: it starts with ``x``).
        With ``error_input``, ``base`` carries the previous step-1 baseline as a last column."""
        if self.base_seasons:
            if base is None:
                base, before = self._baselines(self._with_past(x[..., 0], past))
            elif self.error_input:
                base, before = base[..., : self.horizon], base[..., self.horizon]
            if self.error_input:
                x = torch.cat([x, self._error(x[..., 0], before)[..., None]], -1)
        out, h = self.rnn(x, h)  # (batch, time, hidden)
        y = self.head(out)  # (batch, time, horizon)
        if self.base_seasons:
            y = y + base
        return y, h

    @staticmethod
    def _error(value: Tensor, before: Tensor) -> Tensor:
        """The baseline's one-step error: the value less the step-1 baseline made before it (0 without one).
        An input, not a path for gradients: the baseline before a series' first values is NaN, and its
        parameters (``mix``) learn through the forecast itself."""
        error = value.detach() - before.detach().to(value.dtype)
        return torch.where(error.isfinite(), error, torch.zeros_like(error))

    def step(self, x: Tensor, h: State, past: Tensor | None = None) -> tuple[Tensor, State]:
        """One value per series: ``x`` (batch, input_size) -> forecasts (batch, horizon) and the new state.

        ``past`` (batch, context): each series' values before ``x``, in the units of ``x`` (NaN before its
        first value)."""
        if self.training and self.dropout > 0.0 and self.num_layers > 1:
            y, h = self.forward(x.unsqueeze(1), h, past)  # dropout between layers: leave it to nn.RNNBase
            return y.squeeze(1), h
        value = x[:, :1]  # (batch, 1) the value input, for the baseline
        base = None
        if self.base_seasons:
            seq, before = self._baselines(self._with_past(value, past))  # (batch, 1, horizon), (batch, 1)
            base = seq[:, -1]
            if before is not None:
                x = torch.cat([x, self._error(value, before)], 1)
        weights = self._packed
        if weights is None:  # fetched once: nn.RNNBase.all_weights costs more than a small step
            weights = self._packed = self.rnn.all_weights  # per layer: [w_ih, w_hh, b_ih, b_hh]
        if self.is_lstm:
            hs, cs = h
            new_h, new_c = [], []
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
                x, c = torch.lstm_cell(x, (hs[layer], cs[layer]), w_ih, w_hh, b_ih, b_hh)  # (batch, hidden)
                new_h.append(x)
                new_c.append(c)
            state: State = (torch.stack(new_h), torch.stack(new_c))  # (layers, batch, hidden) each
        else:
            cell = _FUSED_CELLS[self.cell]
            new_h = []
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
                x = cell(x, h[layer], w_ih, w_hh, b_ih, b_hh)  # (batch, hidden)
                new_h.append(x)
            state = torch.stack(new_h)  # (layers, batch, hidden)
        y = F.linear(x, self.head.weight, self.head.bias)  # (batch, horizon)
        if base is not None:
            y = y + base
        return y, state

    def readout(self, h: State, recent: Tensor | None = None) -> Tensor:
        """The forecast (batch, horizon) of state ``h`` whose newest values are ``recent`` (batch, n), in
        the units of the newest: what ``step`` returned when it made ``h``."""
        top = h[0][-1] if self.is_lstm else h[-1]  # (batch, hidden)
        y = self.head(top)  # (batch, horizon)
        if self.base_seasons:
            y = y + self.baseline(recent)
        return y

    def warm(self, x: Tensor, lengths: Tensor, recent: Tensor | None = None) -> tuple[Tensor, State]:
        """Run from the zero state over right-aligned windows of different lengths.

        ``x`` (batch, W, input_size) holds each series' last ``lengths[i]`` inputs at its end (padding
        before them is ignored); returns the forecast after each series' last input (batch, horizon)
        and the state there, exactly what ``forward`` over those inputs alone returns. Every length
        must be >= 1. ``recent`` (batch, W): the same values in the units of the last input, right-aligned
        (NaN before each series' values), for the baseline (None: read from ``x``). With ``error_input`` the
        baseline's errors along the window are read in the last input's units (stepping read each in its
        own): a re-warm from a window is a close start, not the stepped state.
        """
        window = x.shape[1]
        lengths = lengths.to(device=x.device, dtype=torch.long)
        if recent is None:
            recent = x[..., 0]
        recent = recent.masked_fill(  # (batch, W) right-aligned; NaN before each series' values
            torch.arange(window, device=x.device) < (window - lengths)[:, None], math.nan
        )
        if self.error_input:  # the baseline's one-step errors along the window, in the newest input's units
            seq = self._baseline_seq(F.pad(recent, (self._reach + 1, 0), value=math.nan))  # (batch, W + 1, H)
            x = torch.cat([x, self._error(recent, seq[:, :window, 0])[..., None].to(x.dtype)], -1)
        # Left-align each row so packing sees its values first: row i starts at W - lengths[i].
        shift = torch.arange(window, device=x.device) + (window - lengths)[:, None]  # (batch, W)
        x = x.gather(1, (shift % window).unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (batch, W, input)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed, None)  # h: (layers, batch, hidden) in the original row order
        return self.readout(h, recent), h  # (batch, horizon)
