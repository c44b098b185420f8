"""Replay: event-time order, duplicates and bad rows, metrics by hand, engine parity, the command and its report."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster.checkpoints.store import promote, save_checkpoint
from forecaster.cli import main
from forecaster.cli import replay as replay_cli
from forecaster.engine.engine import Engine, reference_forecast
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.replay import (
    forecasts_frame,
    format_metrics,
    format_period,
    format_problems,
    load_rows,
    long_frame,
    replay,
    score,
)
from forecaster.train.baselines import detect_season

# Unsorted rows, a duplicate (line 6: same series and ts as line 5) and a bad value (line 11).
TINY = """series,ts,value
b,1000,10
a,1000,1
a,3000,2
a,2000,3
a,2000,99
a,4000,4
b,2000,10
a,5000,3
b,3000,12
a,6000,oops
"""


def constant_model(forecast: list[float]) -> RecurrentForecaster:
    """A model whose every forecast is ``forecast`` (zero weights, the head's bias), with no scaling."""
    model = RecurrentForecaster("gru", hidden_size=2, num_layers=1, horizon=len(forecast))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias.copy_(torch.tensor(forecast))
    return model


def test_metrics_of_a_tiny_file_equal_a_hand_computation() -> None:
    engine = Engine(constant_model([2.0, 3.0]), version="const", scaling=Scaling(kind="none"))
    result = replay(io.StringIO(TINY), engine, season=2, batch_rows=3, progress=False)

    # In event-time order a = 1, 3, 2, 4, 3 and b = 10, 10, 12 (the first of two equal timestamps wins).
    assert len(result.rows) == 8
    assert result.rows.duplicate_lines == [6]
    assert [(b.line, b.reason) for b in result.bad_rows] == [(11, "value_not_number")]
    assert result.out_of_order == 2  # a's 2000 (twice) after its 3000; b's rows are in order
    assert result.rows.ts.tolist() == sorted(result.rows.ts.tolist())
    # Points where the target and the seasonal-naive forecast (season 2) exist, worked out on paper:
    # h1: a at t=1,2,3 (targets 2,4,3), b at t=1 (12); h2: a at t=0,1,2 (2,4,3), b at t=0 (12).
    model, naive, last = (result.errors[k] for k in ("model", "seasonal_naive", "last_value"))
    assert model.count.tolist() == [4, 4]
    np.testing.assert_allclose(model.mae(), [13 / 4, 11 / 4])
    np.testing.assert_allclose(naive.mae(), [5 / 4, 5 / 4])
    np.testing.assert_allclose(last.mae(), [6 / 4, 5 / 4])
    np.testing.assert_allclose(model.rmse(), [math.sqrt(105 / 4), math.sqrt(83 / 4)])
    # MASE: each series' absolute errors over its in-sample seasonal-naive MAE (whole series here, nothing
    # held out): a |2-1|, |4-3|, |3-2| -> 1; b |12-10| -> 2. h1: (0+2+1)/1 + 10/2 = 8; h2: (1+1+0)/1 + 9/2 = 6.5.
    np.testing.assert_allclose(model.mase(), [8 / 4, 6.5 / 4])
    np.testing.assert_allclose(naive.mase(), [(3 / 1 + 2 / 2) / 4, (3 / 1 + 2 / 2) / 4])
    metrics = result.metrics()
    assert metrics["model"]["mae"] == pytest.approx(3.0)
    assert metrics["model"]["mase"] == pytest.approx(14.5 / 8)
    assert metrics["model"]["mase_by_horizon"] == pytest.approx([2.0, 1.625])
    assert metrics["seasonal_naive"]["mase"] == pytest.approx(1.0)
    assert metrics["model"]["relative_mae_vs_seasonal_naive"] == pytest.approx(3.0 / 1.25)
    assert metrics["model"]["relative_mae_vs_seasonal_naive_by_horizon"] == pytest.approx([13 / 5, 11 / 5])
    assert metrics["model"]["relative_mae_vs_last_value"] == pytest.approx(3.0 / (11 / 8))
    assert metrics["model"]["relative_mae_vs_last_value_by_horizon"] == pytest.approx([13 / 6, 11 / 5])
    table = format_metrics(result)
    assert table.splitlines()[-1].split()[:8] == [
        "overall",
        "8",
        "3",
        f"{math.sqrt(188 / 8):.6g}",
        "1.8125",
        "1.0000",
        "2.4000",
        "2.1818",
    ]
    problems = "\n".join(format_problems(result))
    assert "skipped 1 bad rows" in problems and "line 11" in problems
    assert "dropped 1 duplicate" in problems and "lines 6" in problems
    assert "2 rows were out of time order within their series" in problems


def test_a_flat_series_is_left_out_of_mase_and_the_table_says_so() -> None:
    """The tiny file's figures with a flat series c beside a and b: MASE as before, MAE with c's points."""
    engine = Engine(constant_model([2.0, 3.0]), version="const", scaling=Scaling(kind="none"))
    flat = "".join(f"c,{t * 1000},7\n" for t in range(1, 5))
    result = replay(io.StringIO(TINY + flat), engine, season=2, batch_rows=3, progress=False)
    model = result.errors["model"]
    # c (7, 7, 7, 7) has no in-sample scale; its h1 points t=1,2 and h2 points t=0,1 (errors 5 and 4).
    assert model.count.tolist() == [6, 6] and model.unscaled_series == 1
    np.testing.assert_allclose(model.mae(), [(13 + 10) / 6, (11 + 8) / 6])
    np.testing.assert_allclose(model.mase(), [8 / 4, 6.5 / 4])  # a's and b's alone, as above
    assert result.metrics()["model"]["mase_series_left_out"] == 1
    assert "MASE leaves out 1 series without an in-sample scale" in format_metrics(result)
    assert "leaves out" not in format_metrics(replay(io.StringIO(TINY), engine, season=2, progress=False))


def test_replay_forecasts_equal_the_reference_whatever_the_batch_size() -> None:
    torch.manual_seed(1)
    model = RecurrentForecaster("lstm", hidden_size=6, num_layers=2, horizon=3)
    rng = np.random.default_rng(0)
    rows = [
        (f"s{i}", 1000 * t, float(v)) for i in range(4) for t, v in enumerate(rng.normal(10, 2, 25 + 5 * i))
    ]
    rng.shuffle(rows)
    text = "series,ts,value\n" + "".join(f"{s},{t},{v!r}\n" for s, t, v in rows)
    frame = pd.DataFrame(rows, columns=["series", "ts", "value"]).sort_values("ts", kind="stable")
    for batch_rows in (1, 7, 10_000):
        result = replay(
            io.StringIO(text), Engine(model, window=8), season=1, batch_rows=batch_rows, progress=False
        )
        groups = result.rows.by_series()
        assert sorted(groups) == ["s0", "s1", "s2", "s3"]
        for name, at in groups.items():
            values = frame[frame["series"] == name].sort_values("ts")["value"].to_numpy().copy()
            np.testing.assert_array_equal(result.rows.values[at], values)
            np.testing.assert_allclose(
                result.rows.forecasts[at], reference_forecast(model, values), atol=1e-5
            )


def test_log_scaling_skips_values_that_are_not_positive_as_bad_rows() -> None:
    text = "series,ts,value\na,1000,2\na,2000,0\nb,1000,-3\na,3000,4\nb,2000,5\n"
    model = RecurrentForecaster("gru", hidden_size=3, num_layers=1, horizon=2)
    result = replay(
        io.StringIO(text), Engine(model, window=8, scaling=Scaling("log")), season=1, progress=False
    )
    assert [(b.line, b.reason) for b in result.bad_rows] == [(3, "not_positive"), (4, "not_positive")]
    groups = result.rows.by_series()
    np.testing.assert_array_equal(result.rows.values[groups["a"]], [2.0, 4.0])
    np.testing.assert_allclose(
        result.rows.forecasts[groups["a"]], reference_forecast(model, [2.0, 4.0], Scaling("log")), rtol=1e-5
    )
    assert "not_positive 2" in format_problems(result)[0]


def test_score_from_scores_only_the_later_part() -> None:
    values = [np.arange(10.0)]
    model = [np.repeat(np.arange(10.0)[:, None] + 1.0, 2, axis=1)]  # exact at step 1, off by 1 at step 2
    errors = score(values, {"model": model}, horizon=2, season=1, first_origin=[6])
    # origins 6, 7 and 8 (9 is last): step 1 has 3 targets, step 2 has 2 (from origins 6 and 7)
    assert errors["model"].count.tolist() == [3, 2]
    np.testing.assert_allclose(errors["model"].mae(), [0.0, 1.0])
    np.testing.assert_allclose(errors["last_value"].mae(), [1.0, 2.0])
    text = "series,ts,value\n" + "".join(f"a,{t},{t}\n" for t in range(10))
    # Value by value: with a period learnt from them, the origins before it was settled are not scored.
    engine = Engine(constant_model([0.0, 0.0]), scaling=Scaling(kind="none"), period_ms=0)
    result = replay(io.StringIO(text), engine, season=1, score_from=7, progress=False)
    assert result.errors["model"].count.tolist() == [3, 2]


def test_season_is_detected_when_not_given() -> None:
    t = np.arange(120)
    values = 10 + np.sin(2 * np.pi * t / 6) * 3 + np.random.default_rng(0).normal(0, 0.1, 120)
    text = "ts,x\n" + "".join(f"{i},{v}\n" for i, v in zip(t, values, strict=True))  # wide layout
    result = replay(io.StringIO(text), Engine(constant_model([0.0])), progress=False)
    assert result.season == detect_season([values]) == 6  # no calendar in steps of 1 ms
    hourly = "ts,x\n" + "".join(f"{3_600_000 * i},{v}\n" for i, v in zip(t, values, strict=True))
    result = replay(io.StringIO(hourly), Engine(constant_model([0.0])), progress=False)
    assert result.season == 24  # the calendar's daily season of hourly data (120 hours hold it twice)


# ---- the command ----------------------------------------------------------------------------------------


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A published checkpoint under a checkpoint root that the settings point at."""
    root = tmp_path / "checkpoints"
    torch.manual_seed(0)
    version = save_checkpoint(
        root, RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), Scaling()
    )
    promote(root, version)
    monkeypatch.setenv("FORECASTER_CHECKPOINTS__DIR", str(root))
    monkeypatch.setenv("FORECASTER_STATE__DEVICE", "cpu")
    return root, version


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cli_writes_forecasts_and_prints_the_metrics(tmp_path, published, capsys) -> None:
    _, version = published
    data = write(tmp_path, TINY)
    out = tmp_path / "forecasts.csv"
    assert main(["replay", "--input", str(data), "--output", str(out), "--season", "2", "--no-progress"]) == 0
    printed = capsys.readouterr()
    forecasts = pd.read_csv(out)
    bounds = [f"{side}_{level}_h{k}" for side in ("lower", "upper") for level in (80, 95) for k in (1, 2)]
    assert forecasts.columns.tolist() == [
        "series",
        "ts",
        "model_version",
        "h1",
        "h2",
        "at_1",
        "at_2",
        *bounds,
    ]
    # The model has no period and no series is long enough to learn its own: steps are values, not times.
    assert forecasts["at_1"].isna().all() and forecasts["at_2"].isna().all()
    made = forecasts.dropna(subset=bounds)  # a series' first 3 forecasts have no bounds (empty cells)
    assert len(made) == 2 and forecasts[bounds].isna().all(axis=1).sum() == 6
    assert (made["lower_95_h1"] <= made["lower_80_h1"]).all()
    assert (made["lower_80_h2"] <= made["h2"]).all() and (made["h2"] <= made["upper_80_h2"]).all()
    assert len(forecasts) == 8 and set(forecasts["model_version"]) == {version}
    assert forecasts["ts"].is_monotonic_increasing
    assert "overall" in printed.out and "relMAE/snaive" in printed.out and version in printed.out
    assert "cover 80%" in printed.out and "Winkler 95%" in printed.out
    assert "per-series choice, series by the source of their last forecast: h1: " in printed.out
    assert "line 11" in printed.err and "duplicate" in printed.err


def test_cli_json_figures(tmp_path, published, capsys) -> None:
    data = write(tmp_path, TINY)
    assert main(["replay", "--input", str(data), "--json", "--season", "2", "--no-progress"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["values"] == 8 and figures["duplicates"] == 1 and figures["bad_rows"] == 1
    assert figures["season"] == 2 and len(figures["model"]["mae_by_horizon"]) == 2
    by_source = figures["series_by_source"]  # the service's default: the per-series choice on
    assert sum(n for key, n in by_source.items() if key.startswith("h1:")) == 2  # series a and b
    assert set(by_source) >= {"h1:model", "h1:last_value", "h2:model", "h2:last_value"}


def test_cli_without_a_published_checkpoint_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FORECASTER_CHECKPOINTS__DIR", str(tmp_path / "nothing"))
    assert main(["replay", "--input", str(write(tmp_path, TINY)), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no published checkpoint" in err and "forecaster train" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("series,value\na,1\n", "missing ts"),
        ("series,ts,value\n", "no data rows"),
    ],
)
def test_cli_malformed_files_give_one_line(tmp_path, published, capsys, text, message) -> None:
    assert main(["replay", "--input", str(write(tmp_path, text)), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_missing_file(tmp_path, published, capsys) -> None:
    assert main(["replay", "--input", str(tmp_path / "absent.csv"), "--no-progress"]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "{tmp}"], "is a folder"),
        (["--output", "{tmp}/absent/forecasts.csv"], "does not exist"),
        (["--report", "{tmp}/absent/report.png"], "does not exist"),
        (["--device", "tpu"], "not one torch knows"),
    ],
)
def test_cli_unusable_outputs_and_devices_are_refused_before_the_replay(
    tmp_path, published, capsys, monkeypatch, extra, message
) -> None:
    replayed = []
    monkeypatch.setattr(replay_cli, "replay", lambda *a, **k: replayed.append(a))
    argv = ["replay", "--input", str(write(tmp_path, TINY)), "--no-progress"]
    assert main(argv + [arg.format(tmp=tmp_path) for arg in extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert replayed == []


def test_cli_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, published, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["replay", "--input", str(write(tmp_path, TINY)), "--device", "cuda", "--no-progress"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_non_numeric_and_unsorted_rows_are_counted_not_fatal(tmp_path, published, capsys) -> None:
    text = "series,ts,value\na,3000,1\na,1000,x\na,2000,2\na,2000,3\nb,1000,\n"
    assert main(["replay", "--input", str(write(tmp_path, text)), "--season", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad rows" in err and "line 3" in err and "line 6" in err
    assert "dropped 1 duplicate" in err and "out of time order" in err


def test_cli_report_png(tmp_path, published) -> None:
    pytest.importorskip("matplotlib")
    report = tmp_path / "report.png"
    assert (
        main(["replay", "--input", str(write(tmp_path, TINY)), "--report", str(report), "--no-progress"]) == 0
    )
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_without_matplotlib_says_how_to_install(tmp_path, published, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = tmp_path / "report.png"
    assert (
        main(["replay", "--input", str(write(tmp_path, TINY)), "--report", str(report), "--no-progress"]) == 1
    )
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err and not report.exists()


def test_cli_refuses_a_checkpoint_whose_baseline_reaches_past_the_window(
    tmp_path, monkeypatch, capsys
) -> None:
    root = tmp_path / "checkpoints"
    model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2, season=12, base_seasons=2)
    promote(root, save_checkpoint(root, model, Scaling()))
    monkeypatch.setenv("FORECASTER_CHECKPOINTS__DIR", str(root))
    monkeypatch.setenv("FORECASTER_STATE__WINDOW", "20")
    assert main(["replay", "--input", str(write(tmp_path, TINY)), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "state.window" in err and "FORECASTER_STATE__WINDOW" in err and "Traceback" not in err
    monkeypatch.setenv("FORECASTER_STATE__WINDOW", "24")
    assert main(["replay", "--input", str(write(tmp_path, TINY)), "--no-progress", "--season", "2"]) == 0


def test_replay_of_a_residual_model_equals_the_reference() -> None:
    """The seasonal baseline's inputs come from the engine's ring buffer during a replay."""
    torch.manual_seed(2)
    model = RecurrentForecaster(
        "gru", hidden_size=5, num_layers=1, horizon=4, season=3, base_seasons=2, base_level=True
    )
    with torch.no_grad():
        model.head.bias.normal_()
    values = 10 + np.sin(np.arange(40) * 2 * np.pi / 3) + np.random.default_rng(3).normal(0, 0.1, 40)
    text = "series,ts,value\n" + "".join(f"a,{t},{float(v)!r}\n" for t, v in enumerate(values))
    result = replay(io.StringIO(text), Engine(model, window=16), season=3, batch_rows=5, progress=False)
    np.testing.assert_allclose(result.rows.forecasts, reference_forecast(model, values), atol=1e-5, rtol=0)


def test_cli_reads_the_statsforecast_layout_and_says_so(tmp_path, published, caplog) -> None:
    """unique_id, ds, y (statsforecast / NeuralForecast): the same forecasts as series, ts, value."""
    plain = write(tmp_path, TINY)
    nixtla = write(tmp_path, TINY.replace("series,ts,value", "unique_id,ds,y"), "nixtla.csv")
    outputs = []
    for data in (plain, nixtla):
        out = tmp_path / f"{data.stem}.out.csv"
        with caplog.at_level("INFO", logger="forecaster.data"):
            argv = ["replay", "--input", str(data), "--output", str(out), "--season", "2", "--no-progress"]
            assert main(argv) == 0
        outputs.append(pd.read_csv(out))
    pd.testing.assert_frame_equal(outputs[0], outputs[1])
    assert f"{nixtla}: long (unique_id, ds, y; statsforecast/NeuralForecast) layout" in caplog.text


def test_a_sorted_wide_file_is_not_out_of_time_order() -> None:
    text = "date,A,B\n2020-01-01,1,5\n2020-01-02,2,6\n2020-01-03,3,7\n"
    frame, bad, out_of_order = load_rows(io.StringIO(text))
    assert (out_of_order, len(frame), bad) == (0, 6, [])
    _, _, late = load_rows(io.StringIO("date,A,B\n2020-01-02,1,5\n2020-01-01,2,6\n"))
    assert late == 2  # both series' values on the second line are earlier than the first line's
    by_series = "series,ts,value\na,1000,1\na,2000,2\nb,1000,3\nb,2000,4\nb,1500,5\n"
    assert load_rows(io.StringIO(by_series))[2] == 1  # sorted by series, then time: only b's 1500 is late


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_cli_json_is_strict_when_a_figure_does_not_exist(tmp_path, published, capsys) -> None:
    text = "series,ts,value\n" + "".join(f"a,{t * 1000},5.0\n" for t in range(12))  # MASE's scale: 0
    assert (
        main(["replay", "--input", str(write(tmp_path, text)), "--json", "--season", "2", "--no-progress"])
        == 0
    )
    figures = _strict(capsys.readouterr().out)
    assert figures["values"] == 12 and figures["model"]["mase"] is None


def test_cli_counts_a_glitch_it_moved_into_its_series_range(tmp_path, published, capsys) -> None:
    rows = [f"a,{t},{5.0 + (t % 3) * 0.5}" for t in range(1, 21)] + ["a,21,1e29", "a,22,5.5"]
    data = write(tmp_path, "series,ts,value\n" + "\n".join(rows) + "\n")
    assert main(["replay", "--input", str(data), "--season", "1", "--no-progress", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["values"] == 22 and figures["clipped"] == 1
    assert main(["replay", "--input", str(data), "--season", "1", "--no-progress"]) == 0
    assert "1 values lay farther than scaling.clip" in capsys.readouterr().err


def test_cli_skips_series_ids_the_service_would_dead_letter_as_too_long(
    tmp_path, published, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("FORECASTER_SERVICE__MAX_SERIES_LENGTH", "5")
    text = "series,ts,value\n" + "".join(f"{s},{t},{t}\n" for t in (1, 2, 3) for s in ("short", "longer"))
    assert main(["replay", "--input", str(write(tmp_path, text)), "--season", "1", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "skipped 3 bad rows (series_too_long 3)" in printed.err
    assert "line 3 (series_too_long: 'longer'" in printed.err
    assert "replayed 3 values of 1 series" in printed.out


# ---- a step is a period ---------------------------------------------------------------------------------

# Series a every 10 s with the periods at 30 s and 40 s missing; its value is its time in periods.
GAPPED = "series,ts,value\n" + "".join(f"a,{t * 10_000},{t}\n" for t in (0, 1, 2, 5, 6, 7))


def test_a_gapped_series_is_scored_on_its_grid_and_missing_targets_are_skipped() -> None:
    engine = Engine(constant_model([0.0, 0.0]), scaling=Scaling(kind="none"), period_ms=10_000)
    result = replay(io.StringIO(GAPPED), engine, season=1, progress=False)
    assert result.rows.periods().tolist() == [10_000] * 6 and result.rows.imputed == 2
    # Origins at 0..2 and 5..7 periods: a step-1 target exists for 0, 1, 5 and 6 (3 and 8 do not), a
    # step-2 one for 0 and 5. The k-th next value would pair 2 with 5: scored on the grid, it is not.
    model, last = result.errors["model"], result.errors["last_value"]
    assert model.count.tolist() == [4, 2] and last.count.tolist() == [4, 2]
    np.testing.assert_allclose(last.mae(), [1.0, 2.0])  # the value k periods on is k more
    np.testing.assert_allclose(model.mae(), [(1 + 2 + 6 + 7) / 4, (2 + 7) / 2])
    np.testing.assert_array_equal(result.rows.target_times()[:, 0], result.rows.ts + 10_000)
    assert "every series on a grid of 10s (state.period)" in format_period(result, engine)
    assert "1 of 1 series stepped on a time grid" in format_period(result, engine)
    assert "2 missing periods stepped through" in format_period(result, engine)


def test_without_a_period_a_step_is_the_next_value_and_has_no_target_time() -> None:
    engine = Engine(constant_model([0.0, 0.0]), scaling=Scaling(kind="none"), period_ms=0)
    result = replay(io.StringIO(GAPPED), engine, season=1, progress=False)
    assert result.rows.periods().tolist() == [0] * 6 and result.rows.imputed == 0
    assert result.errors["last_value"].count.tolist() == [5, 4]  # every next value, gaps or not
    frame = forecasts_frame(result.rows)
    assert frame["at_1"].isna().all() and frame["at_2"].isna().all()
    assert long_frame(result.rows)["ds"].isna().all()
    assert "a step is the next value" in format_period(result, engine)


def test_the_long_layout_has_a_row_per_step_with_its_target_time() -> None:
    engine = Engine(constant_model([1.5, 2.5]), scaling=Scaling(kind="none"), period_ms=10_000, version="v")
    rows = replay(io.StringIO(GAPPED), engine, season=1, progress=False).rows
    buffer = io.StringIO()
    long_frame(rows).to_csv(buffer, index=False)
    frame = pd.read_csv(io.StringIO(buffer.getvalue()))
    levels = [f"{side}-{level}" for level in (80, 95) for side in ("lo", "hi")]
    assert frame.columns.tolist() == ["unique_id", "ds", "cutoff", "step", "y_hat", *levels, "model_version"]
    assert len(frame) == 2 * len(rows) and frame["step"].tolist() == [1, 2] * len(rows)
    assert (frame["ds"] == frame["cutoff"] + 10_000 * frame["step"]).all()
    assert frame["cutoff"].tolist() == np.repeat(rows.ts, 2).tolist()
    assert frame["y_hat"].tolist() == [1.5, 2.5] * len(rows) and set(frame["model_version"]) == {"v"}
    made = frame.dropna()  # a series' first forecasts have no bounds yet
    assert len(made) and (made["lo-95"] <= made["lo-80"]).all() and (made["hi-80"] <= made["hi-95"]).all()


def test_cli_writes_the_long_layout_on_the_models_grid(tmp_path, published, capsys) -> None:
    root, _ = published
    model = RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2, period_ms=10_000)
    promote(root, save_checkpoint(root, model, Scaling()))  # trained on series 10 s apart
    data, out = write(tmp_path, GAPPED), tmp_path / "long.csv"
    argv = ["replay", "--input", str(data), "--output", str(out), "--long", "--season", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "series started with the model's period of 10s" in printed
    assert "2 missing periods stepped through" in printed
    frame = pd.read_csv(out)
    assert frame.columns[:5].tolist() == ["unique_id", "ds", "cutoff", "step", "y_hat"]
    assert len(frame) == 6 * 2 and (frame["ds"] == frame["cutoff"] + 10_000 * frame["step"]).all()
    assert main(["replay", "--input", str(data), "--long", "--no-progress"]) == 2
    assert "--long is the layout of --output" in capsys.readouterr().err
    assert main(["replay", "--input", str(data), "--json", "--season", "1", "--no-progress"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["period_ms"] == 10_000 and figures["imputed"] == 2 and figures["series_with_a_period"] == 1
    assert figures["model"]["count"] == 4 + 2  # the step-1 and step-2 targets the grid holds
