"""Reading series files: long and wide CSV, bad rows reported with line numbers, clear errors."""

import io

import numpy as np
import pandas as pd
import pytest

from forecaster.data import parse_timestamps, read_series
from forecaster.errors import DataError


def test_long_csv_keeps_good_rows_in_file_order():
    text = "series,ts,value\nb,2000,2\na,1000,1.5\nb,1000,-3e2\n"
    loaded = read_series(io.StringIO(text))
    assert loaded.layout == "long"
    assert loaded.frame["series"].tolist() == ["b", "a", "b"]
    assert loaded.frame["ts"].tolist() == [2000, 1000, 1000]
    assert loaded.frame["value"].tolist() == [2.0, 1.5, -300.0]
    assert loaded.bad_rows == []


def test_long_csv_column_names_are_case_insensitive():
    loaded = read_series(io.StringIO("Series,TS,Value\nx,5,1\n"))
    assert loaded.frame[["series", "ts", "value"]].values.tolist() == [["x", 5, 1.0]]


def test_bad_rows_are_skipped_with_line_numbers_and_reasons():
    text = "series,ts,value\na,1,1\na,2,abc\n,3,1\na,not-a-time,2\na,4,\na,5,inf\na,6,nan\na,7,7\n"
    loaded = read_series(io.StringIO(text))
    assert loaded.frame["ts"].tolist() == [1, 7]
    assert [(b.line, b.reason) for b in loaded.bad_rows] == [
        (3, "value_not_number"),
        (4, "missing_series"),
        (5, "bad_ts"),
        (6, "value_not_number"),
        (7, "value_not_number"),
        (8, "value_not_number"),
    ]
    assert loaded.bad_summary() == {"value_not_number": 4, "missing_series": 1, "bad_ts": 1}


def test_iso_timestamps_become_epoch_milliseconds_utc():
    ms, ok = parse_timestamps(pd.Series(["1970-01-01T00:00:01Z", "1970-01-02", "2020-01-01T01:00:00+01:00"]))
    assert ok.all()
    assert ms.tolist() == [1000, 86_400_000, 1_577_836_800_000]


def test_historical_timestamps_are_fine_far_future_ones_are_bad():
    ms, ok = parse_timestamps(pd.Series(["1949-01-01", "-1", "1000", str(10**15), "2300-01-01"]))
    assert ok.tolist() == [True, True, True, False, False]
    assert ms[0] == -662_688_000_000


def test_wide_csv_has_one_series_per_column_and_skips_blank_cells():
    text = "date,north,south\n2020-01-01,1,10\n2020-01-02,,11\n2020-01-03,3,x\n"
    loaded = read_series(io.StringIO(text))
    assert loaded.layout == "wide"
    north = loaded.frame[loaded.frame["series"] == "north"]
    south = loaded.frame[loaded.frame["series"] == "south"]
    assert north["value"].tolist() == [1.0, 3.0]
    assert south["value"].tolist() == [10.0, 11.0]
    assert [(b.line, b.reason, b.detail) for b in loaded.bad_rows] == [(4, "value_not_number", "south")]
    day = 86_400_000
    assert np.diff(north["ts"].to_numpy()).tolist() == [2 * day]


def test_wide_csv_time_column_found_by_name_not_position():
    loaded = read_series(io.StringIO("a,time\n1,1000\n2,2000\n"))
    assert loaded.frame["series"].unique().tolist() == ["a"]
    assert loaded.frame["ts"].tolist() == [1000, 2000]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("series,ts,value\n", "no data rows"),
        ("series,ts\na,1\n", "missing value"),
        ("time\n1\n", "one column per series"),
    ],
)
def test_unreadable_files_raise_one_clear_data_error(text, message):
    with pytest.raises(DataError, match=message):
        read_series(io.StringIO(text))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_series(tmp_path / "absent.csv")


# --- the long layout of statsforecast / NeuralForecast (unique_id, ds, y) -------------------------


def test_nixtla_long_csv_is_read_as_long_and_says_so(caplog):
    text = "unique_id,ds,y\nH1,2024-01-01 00:00,10\nH1,2024-01-01 01:00,11.5\nH2,2024-01-01 00:00,x\n"
    with caplog.at_level("INFO", logger="forecaster.data"):
        loaded = read_series(io.StringIO(text))
    assert loaded.layout == "nixtla"
    assert loaded.frame["series"].tolist() == ["H1", "H1"]
    assert loaded.frame["ts"].tolist() == [1704067200000, 1704070800000]
    assert loaded.frame["value"].tolist() == [10.0, 11.5]
    assert [(b.line, b.reason) for b in loaded.bad_rows] == [(4, "value_not_number")]
    assert "long (unique_id, ds, y; statsforecast/NeuralForecast) layout, 2 rows, 1 series" in caplog.text


def test_plain_long_and_wide_layouts_are_named_in_the_log(caplog):
    with caplog.at_level("INFO", logger="forecaster.data"):
        read_series(io.StringIO("series,ts,value\na,1,1\n"))
        read_series(io.StringIO("ts,a,y\n1,1,2\n"))  # a series called "y" stays a wide column
    assert "long (series, ts, value) layout, 1 rows, 1 series" in caplog.text
    assert "wide (a time column, one column per series) layout, 2 rows, 2 series" in caplog.text


def test_nixtla_parquet_with_datetimes_and_extra_columns(tmp_path):
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame(
        {
            "unique_id": ["a", "a", "b"],
            "ds": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-01"]),
            "y": [1.0, 2.0, 3.0],
            "price": [9.0, 9.0, 9.0],  # an exogenous column: not read
        }
    )
    frame.to_parquet(tmp_path / "train.parquet")
    loaded = read_series(tmp_path / "train.parquet")
    assert loaded.layout == "nixtla"
    assert loaded.frame[["series", "ts", "value"]].values.tolist() == [
        ["a", 1704067200000, 1.0],
        ["a", 1704153600000, 2.0],
        ["b", 1704067200000, 3.0],
    ]


def test_nixtla_layout_missing_a_column_says_which():
    with pytest.raises(DataError, match=r"unique_id,ds,y; missing y"):
        read_series(io.StringIO("unique_id,ds,target\na,1,1\n"))


def test_values_beyond_the_service_limit_are_bad_rows_in_both_layouts():
    long = read_series(io.StringIO("series,ts,value\na,1,1\na,2,1e300\na,3,-2e30\na,4,1e30\n"))
    assert long.frame["ts"].tolist() == [1, 4]
    assert [(b.line, b.reason) for b in long.bad_rows] == [
        (3, "value_out_of_range"),
        (4, "value_out_of_range"),
    ]
    wide = read_series(io.StringIO("ts,a,b\n1,1,5e31\n2,2,3\n"))
    assert sorted(wide.frame["value"].tolist()) == [1.0, 2.0, 3.0]
    assert [(b.line, b.reason, b.detail) for b in wide.bad_rows] == [(2, "value_out_of_range", "b")]


def test_a_long_file_under_other_names_is_not_read_as_wide():
    text = "store,date,sales\n" + "".join(f"{s},2020-01-0{d},{s * d}\n" for s in (1, 2, 3) for d in (1, 2, 3))
    with pytest.raises(DataError, match="6 of its times repeat.*series,ts,value"):
        read_series(io.StringIO(text))


def test_day_first_dates_are_read_in_one_format():
    days = pd.date_range("2020-01-01", periods=40, freq="D")
    text = "series,ts,value\n" + "".join(f"a,{d:%d/%m/%Y},{i}\n" for i, d in enumerate(days))
    frame = read_series(io.StringIO(text)).frame
    assert (
        frame["ts"].to_numpy() == np.asarray(days, dtype="datetime64[ms]").astype(np.int64)
    ).all()  # not 2020-02-01 for 02/01/2020


def test_month_first_dates_and_mixed_formats_still_parse():
    days = pd.date_range("2020-01-01", periods=40, freq="D")
    text = "series,ts,value\n" + "".join(f"a,{d:%m/%d/%Y},{i}\n" for i, d in enumerate(days))
    assert (
        read_series(io.StringIO(text)).frame["ts"].to_numpy()
        == np.asarray(days, dtype="datetime64[ms]").astype(np.int64)
    ).all()
    mixed = "series,ts,value\na,2020-01-01,1\na,2020-01-02 06:00,2\na,2020-01-03T00:00:00Z,3\n"
    assert read_series(io.StringIO(mixed)).frame["ts"].tolist() == [
        1577836800000,
        1577836800000 + 30 * 3_600_000,
        1577836800000 + 2 * 86_400_000,
    ]


@pytest.mark.parametrize("first", [20200101, 1_600_000_000])  # a date as a number; epoch seconds
def test_numbers_that_are_not_epoch_milliseconds_are_warned_about(first, caplog):
    text = "series,ts,value\n" + "".join(f"a,{first + i * 3600},{i}\n" for i in range(5))
    with caplog.at_level("WARNING", logger="forecaster.data"):
        read_series(io.StringIO(text))
    assert "all within 1970" in caplog.text and "ISO-8601" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="forecaster.data"):
        read_series(io.StringIO("series,ts,value\na,2020-01-01,1\na,2020-01-02,2\n"))
    assert caplog.text == ""


def test_a_file_without_a_good_row_is_an_error():
    with pytest.raises(DataError, match=r"no good row \(2 bad_ts; the first at line 2\)"):
        read_series(io.StringIO("series,ts,value\na,1e40,1\na,soon,2\n"))


def test_semicolon_and_tab_separated_files_are_read(tmp_path):
    semicolon = "series;ts;value\na;2020-01-01;1.5\nb;2020-01-01;2\na;2020-01-02;3\n"
    loaded = read_series(io.StringIO(semicolon))
    assert loaded.layout == "long" and loaded.frame["series"].tolist() == ["a", "b", "a"]
    assert loaded.frame["value"].tolist() == [1.5, 2.0, 3.0]
    path = tmp_path / "wide.tsv"
    path.write_text("ts\tx\ty\n2020-01-01\t1\t2\n2020-01-02\t3\t4\n")
    wide = read_series(path)
    assert wide.layout == "wide" and sorted(wide.frame["series"].unique()) == ["x", "y"]
    # a comma in the header wins: a semicolon inside a series id stays in it
    assert read_series(io.StringIO("series,ts,value\na;b,1000,1\n")).frame["series"].tolist() == ["a;b"]
    # values that are not numbers in any notation are still bad rows, and a file of only those says so
    with pytest.raises(DataError, match="value_not_number"):
        read_series(io.StringIO("series;ts;value\na;2020-01-01;1,5x\n"))


def test_decimal_commas_are_read_where_the_separator_is_not_a_comma(tmp_path):
    # as a spreadsheet set to German writes it: semicolons, decimal commas, points grouping thousands
    long = "series;ts;value\na;2020-01-01;1,5\na;2020-01-02;-1.234,25\na;2020-01-03;2\na;2020-01-04;1.000\n"
    loaded = read_series(io.StringIO(long))
    assert loaded.frame["value"].tolist() == [1.5, -1234.25, 2.0, 1000.0] and not loaded.bad_rows
    path = tmp_path / "wide.tsv"
    path.write_text("ts\tx\ty\n2020-01-01\t0,25\t3.5\n2020-01-02\t1\u00a0234,5\tnope\n")
    wide = read_series(path).frame.sort_values(["series", "ts"])
    # x holds decimal commas; y does not, so its point stays the decimal mark and its bad cell a bad row
    assert wide["value"].tolist() == [0.25, 1234.5, 3.5]
    assert [(b.line, b.reason) for b in read_series(path).bad_rows] == [(3, "value_not_number")]
    # in a comma-separated file a quoted "1,5" is not a number: the comma is no decimal mark there
    quoted = read_series(io.StringIO('series,ts,value\na,1000,"1,5"\na,2000,2\n'))
    assert quoted.frame["value"].tolist() == [2.0] and quoted.bad_summary() == {"value_not_number": 1}


def test_values_read_from_text_are_the_nearest_double_of_their_digits(tmp_path):
    # pandas' own text parse is a unit in the last place off for some 17-digit values; the service reads
    # a record's digits with orjson, so replay and training must read a file's digits as float() does
    rng = np.random.default_rng(3)
    values = [float(v) for v in rng.normal(10, 2, 500)]
    long = "series,ts,value\n" + "".join(f"a,{1000 * i},{v!r}\n" for i, v in enumerate(values))
    assert read_series(io.StringIO(long)).frame["value"].tolist() == values
    wide = "ts;x\n" + "".join(f"{1000 * i};{v!r}\n" for i, v in enumerate(values))
    assert read_series(io.StringIO(wide)).frame["value"].tolist() == values
    comma = "ts;x\n" + "".join(f"{1000 * i};{v!r}\n".replace(".", ",") for i, v in enumerate(values))
    assert read_series(io.StringIO(comma)).frame["value"].tolist() == values
