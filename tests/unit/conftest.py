"""Model factories shared by the unit tests (fixtures, so no test module imports another)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from forecaster.model import RecurrentForecaster

ModelFactory = Callable[..., RecurrentForecaster]


def small_model(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
    """A small seeded model in eval mode: 8 hidden units, 2 layers, horizon 3 unless ``kwargs`` say else."""
    torch.manual_seed(seed)
    options = {"hidden_size": 8, "num_layers": 2, "horizon": 3, **kwargs}
    return RecurrentForecaster(cell, **options).eval()


def randomize_head(model: RecurrentForecaster, seed: int = 1) -> RecurrentForecaster:
    """A residual model starts with a zero head (it forecasts its baseline); give it one that matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (*model.head.parameters(), *([model.mix] if model.base_seasons else [])):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


@pytest.fixture
def make_model() -> ModelFactory:
    """``make_model(cell, seed=0, **build_args)``: a small seeded model (a residual one has a random head)."""

    def make(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
        model = small_model(cell, seed, **kwargs)
        return randomize_head(model, seed + 1) if model.base_seasons else model

    return make
