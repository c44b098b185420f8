"""The synthetic generator: reproducible, distinct series, seasonal with the configured period."""

import numpy as np

from forecaster.tools.synthetic import SeriesShape, SyntheticSource, generate


def test_same_seed_same_values_other_seed_other_values():
    a = generate(n_series=4, n_values=50, seed=3)
    b = generate(n_series=4, n_values=50, seed=3)
    c = generate(n_series=4, n_values=50, seed=4)
    assert a.equals(b)
    assert not np.allclose(a["value"], c["value"])


def test_frame_is_in_time_order_with_every_series_at_every_tick():
    frame = generate(n_series=3, n_values=5, start_ms=1000, step_ms=10)
    assert frame["ts"].is_monotonic_increasing
    assert frame.groupby("series")["ts"].apply(list).tolist() == [[1000, 1010, 1020, 1030, 1040]] * 3


def test_series_are_seasonal_with_the_configured_period():
    shape = SeriesShape(season=12, noise=0.01, trend=0.0, shift_probability=0.0)
    _, values = zip(*SyntheticSource(1, seed=0, shape=shape).ticks(240), strict=True)
    series = np.concatenate(values)
    centred = series - series.mean()
    lag = [float(np.corrcoef(centred[:-k], centred[k:])[0, 1]) for k in range(1, 20)]
    assert int(np.argmax(lag)) + 1 == 12
