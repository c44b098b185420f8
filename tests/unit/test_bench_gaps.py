"""bench/quality.py --gaps: which periods it removes, and that both runs are scored on the same points."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster.engine.engine import Engine
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.replay import step_rows

HOUR = 3_600_000


# One pytest-xdist worker runs this file: its module fixture is set up once.
pytestmark = pytest.mark.xdist_group("bench_gaps")


@pytest.fixture(scope="module")
def quality():
    path = Path(__file__).resolve().parents[2] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def hourly(n: int = 200, series: tuple[str, ...] = ("a", "b")) -> pd.DataFrame:
    t = np.arange(n)
    return pd.DataFrame(
        {
            "series": np.repeat(series, n),
            "ts": np.tile(t * HOUR, len(series)),
            "value": np.concatenate([10 + np.sin(t / (3 + i)) for i in range(len(series))]),
        }
    ).sort_values(["ts", "series"], kind="stable", ignore_index=True)


def runs(kept: np.ndarray) -> list[int]:
    """Lengths of the runs of False in ``kept``."""
    edges = np.diff(np.concatenate(([1], kept.astype(int), [1])))
    return (np.flatnonzero(edges == 1) - np.flatnonzero(edges == -1)).tolist()


@pytest.mark.parametrize("percent", [5.0, 20.0])
def test_the_periods_removed_are_a_share_of_each_part_in_short_runs(quality, percent: float) -> None:
    frame = hourly()
    start = 150 * HOUR
    holed, removed = quality.remove_periods(frame, start, percent)
    assert removed == {"train": 2 * round(1.5 * percent), "test": 2 * round(0.5 * percent)}
    assert len(holed) == len(frame) - sum(removed.values())
    again, _ = quality.remove_periods(frame, start, percent)
    pd.testing.assert_frame_equal(holed, again)  # seeded
    for name in ("a", "b"):
        kept = np.isin(np.arange(200) * HOUR, holed.loc[holed["series"] == name, "ts"])
        assert kept[0] and kept[150]  # the first value of each part stays: no run spans the cut
        assert all(1 <= n <= 6 for n in runs(kept))


def test_both_runs_are_scored_on_the_same_points(quality) -> None:
    model = RecurrentForecaster("gru", hidden_size=2, num_layers=1, horizon=3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias.copy_(torch.tensor([10.0, 10.5, 11.0]))
    frame = hourly()
    start = 150 * HOUR
    holed, _ = quality.remove_periods(frame, start, 20.0)

    def stepped(data: pd.DataFrame):
        engine = Engine(model, scaling=Scaling(kind="none"), period_ms=HOUR)
        return step_rows(engine, data, progress=False)

    errors = quality.gap_errors(stepped(frame), stepped(holed), start, 3, 24)
    # The same constant forecasts: on the same points the two runs' errors are the same.
    for field in ("count", "sum_abs", "sum_scaled"):
        np.testing.assert_array_equal(getattr(errors["gapless"], field), getattr(errors["gapped"], field))
    # By hand: held-out origins (from 149 h, the last value before the cut) present in the gapped data, and
    # their targets k hours later present too.
    expected = np.zeros(3, dtype=int)
    for name in ("a", "b"):
        have = set(holed.loc[holed["series"] == name, "ts"].tolist())
        for origin in (t for t in have if t >= 149 * HOUR):
            expected += [origin + k * HOUR in have for k in (1, 2, 3)]
    assert errors["gapped"].count.tolist() == expected.tolist()
    verdict = quality.gap_verdict(errors, 1.15, HOUR)
    assert verdict["ratio_h1_last"] == [1.0, 1.0] and verdict["met"] is True
    assert quality.gap_verdict(errors, None, HOUR)["met"] is None
