"""The recurrent forecaster: one GRU, LSTM or plain RNN stack with a linear head to ``horizon`` values.

``forward`` runs a whole sequence; ``step`` is its time = 1 case, which serving calls once per new value.
``step`` takes a fused path (torch's ``gru_cell`` / ``lstm_cell`` / ``rnn_tanh_cell`` per layer on the
module's own weights) that skips ``nn.GRU``'s per-call checks; a test holds it equal to ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

# A hidden state: (layers, batch, hidden), or (h, c) for an LSTM.
State = Tensor | tuple[Tensor, Tensor]

CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
_FUSED_CELLS = {"gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}


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
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if min(input_size, hidden_size, num_layers, horizon) < 1:
            raise ValueError("input_size, hidden_size, num_layers and horizon must be >= 1")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.horizon = horizon
        self.dropout = float(dropout)
        # nn.GRU warns about dropout with a single layer; it has no effect there anyway.
        rnn_dropout = self.dropout if num_layers > 1 else 0.0
        self.rnn = CELLS[cell](input_size, hidden_size, num_layers, batch_first=True, dropout=rnn_dropout)
        self.head = nn.Linear(hidden_size, horizon)
        self._packed: list[list[Tensor]] | None = None  # per layer [w_ih, w_hh, b_ih, b_hh], for step()

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): weights may be new tensors
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    @property
    def build_args(self) -> dict[str, Any]:
        """The constructor arguments: ``RecurrentForecaster(**model.build_args)`` rebuilds the shape."""
        return {
            "cell": self.cell,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "horizon": self.horizon,
            "dropout": self.dropout,
        }

    @property
    def is_lstm(self) -> bool:
        return self.cell == "lstm"

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """The zero state for ``batch`` series."""
        device = self.head.weight.device if device is None else device
        h = torch.zeros(self.num_layers, batch, self.hidden_size, device=device)  # (layers, batch, hidden)
        return (h, torch.zeros_like(h)) if self.is_lstm else h

    def forward(self, x: Tensor, h: State | None = None) -> tuple[Tensor, State]:
        """``x`` (batch, time, input_size) -> forecasts (batch, time, horizon) and the final state."""
        out, h = self.rnn(x, h)  # (batch, time, hidden)
        return self.head(out), h  # (batch, time, horizon)

    def step(self, x: Tensor, h: State) -> tuple[Tensor, State]:
        """One value per series: ``x`` (batch, input_size) -> forecasts (batch, horizon) and the new state."""
        if self.training and self.dropout > 0.0 and self.num_layers > 1:
            y, h = self.forward(x.unsqueeze(1), h)  # dropout between layers: leave it to nn.RNNBase
            return y.squeeze(1), h
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
        return F.linear(x, self.head.weight, self.head.bias), state  # (batch, horizon)

    def warm(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        """Run from the zero state over right-aligned windows of different lengths.

        ``x`` (batch, W, input_size) holds each series' last ``lengths[i]`` inputs at its end (padding
        before them is ignored); returns the forecast after each series' last input (batch, horizon)
        and the state there, exactly what ``forward`` over those inputs alone returns. Every length
        must be >= 1.
        """
        window = x.shape[1]
        lengths = lengths.to(device=x.device, dtype=torch.long)
        # Left-align each row so packing sees its values first: row i starts at W - lengths[i].
        shift = torch.arange(window, device=x.device) + (window - lengths)[:, None]  # (batch, W)
        x = x.gather(1, (shift % window).unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (batch, W, input)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed, None)  # h: (layers, batch, hidden) in the original row order
        top = h[0][-1] if self.is_lstm else h[-1]  # (batch, hidden)
        return self.head(top), h  # (batch, horizon)
