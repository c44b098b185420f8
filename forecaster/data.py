"""Reading series files: CSV (long or wide) and Parquet, into one long frame ``series, ts, value``.

Long format has the columns ``series``, ``ts`` and ``value`` (one row per value), or the same under the
names statsforecast and NeuralForecast use, ``unique_id``, ``ds`` and ``y`` (layout ``nixtla``). Wide format has one
time column (``ts``, ``time``, ``timestamp``, ``date``, ``datetime`` or else the first column) and one
numeric column per series. Timestamps are epoch milliseconds (integers) or anything ISO-8601-like that
pandas parses (dates, date-times; naive ones are read as UTC), from year 1 to 2200. A CSV separated by
semicolons or tabs (as written where the comma is the decimal mark) may write its values with a decimal
comma: ``1,5`` and ``1.234,5`` are read as 1.5 and 1234.5 in a value column that holds such numbers.

Bad rows never raise: they are returned with their line number and reason so callers can report and skip
them. A file that cannot be read as series at all raises ``DataError`` with a one-line message.

>>> import io
>>> loaded = read_series(io.StringIO("series,ts,value\\na,1000,1.5\\na,2000,x\\n"))
>>> loaded.frame.to_dict("list")
{'series': ['a'], 'ts': [1000], 'value': [1.5], 'line': [2]}
>>> [(bad.line, bad.reason) for bad in loaded.bad_rows]
[(3, 'value_not_number')]
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from forecaster.errors import DataError
from forecaster.records.input import MAX_ABS_VALUE

TIME_COLUMNS = ("ts", "time", "timestamp", "date", "datetime")
LONG_COLUMNS = ("series", "ts", "value")
# statsforecast / NeuralForecast / MLForecast keep long frames under these names.
NIXTLA_COLUMNS = {"unique_id": "series", "ds": "ts", "y": "value"}
LAYOUTS = {
    "long": "long (series, ts, value)",
    "nixtla": "long (unique_id, ds, y; statsforecast/NeuralForecast)",
    "wide": "wide (a time column, one column per series)",
}

log = logging.getLogger(__name__)
# 0001-01-01 .. 2200-01-01 in epoch ms: history files may well predate 1970 (unlike live records);
# anything outside is not a timestamp a user meant.
MIN_TS_MS = -62_135_596_800_000
MAX_TS_MS = 7_258_118_400_000
DAY_MS = 86_400_000
# A number written with a decimal comma, its integer digits maybe grouped by three with points or spaces
# (a no-break or narrow no-break space as spreadsheets write them), and one grouped without a fraction.
_GROUPS = r"\d{1,3}(?:[.\s\u00a0\u202f]\d{3})+"
_DECIMAL_COMMA = rf"[+-]?(?:{_GROUPS}|\d*),\d+(?:[eE][+-]?\d+)?"
_GROUPED = r"[+-]?\d{1,3}(?:\.\d{3})+"


@dataclass(frozen=True)
class BadRow:
    """A row that was skipped: its 1-based line number in the file (header = line 1) and why."""

    line: int
    reason: str
    detail: str = ""


@dataclass
class LoadedSeries:
    """Good rows as a long frame (``series`` str, ``ts`` int64 ms, ``value`` float64, ``line``) plus the bad."""

    frame: pd.DataFrame
    bad_rows: list[BadRow] = field(default_factory=list)
    layout: str = "long"

    def bad_summary(self) -> dict[str, int]:
        """Count of skipped rows per reason."""
        return dict(Counter(bad.reason for bad in self.bad_rows))


def read_series(source: str | os.PathLike[str] | IO[str], *, fmt: str | None = None) -> LoadedSeries:
    """Read a long or wide CSV (or a Parquet file) into a ``LoadedSeries``; logs the layout it found."""
    loaded = _read_any(source, fmt)
    if loaded.frame.empty:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(loaded.bad_summary().items()))
        first = loaded.bad_rows[0].line if loaded.bad_rows else None
        raise DataError(f"{_name(source)}: no good row ({reasons}; the first at line {first})")
    _warn_unlikely_ts(loaded.frame["ts"].to_numpy(), _name(source))
    log.info(
        "%s: %s layout, %d rows, %d series",
        _name(source),
        LAYOUTS[loaded.layout],
        len(loaded.frame),
        loaded.frame["series"].nunique(),
    )
    return loaded


def _warn_unlikely_ts(ts: np.ndarray, name: str) -> None:
    """Log a warning when the timestamps, read as epoch milliseconds, all fall within 1970: numbers in other
    units (seconds, years, 20200101 dates) read as milliseconds."""
    if len(ts) < 2 or ts.min() < 0 or ts.max() >= 365 * DAY_MS:
        return
    log.warning(
        "%s: ts runs from %d to %d, read as epoch milliseconds: all within 1970. Seconds need * 1000; years "
        "or dates such as 20200101 need ISO-8601 text (2020-01-01)",
        name,
        ts.min(),
        ts.max(),
    )


def _read_any(source: str | os.PathLike[str] | IO[str], fmt: str | None) -> LoadedSeries:
    raw, decimal_comma = _read_table(source, fmt)
    if raw.columns.size == 0 or raw.empty:
        raise DataError(f"{_name(source)}: the file has no data rows")
    raw.columns = [str(c).strip() for c in raw.columns]
    lowered = {c.lower(): c for c in raw.columns}
    if all(c in lowered for c in LONG_COLUMNS):
        return _long(raw.rename(columns={lowered[c]: c for c in LONG_COLUMNS}), "long", decimal_comma)
    if all(c in lowered for c in NIXTLA_COLUMNS):
        # Other columns (exogenous features) are left out: the model reads the target only.
        renamed = raw.rename(columns={lowered[c]: new for c, new in NIXTLA_COLUMNS.items()})
        return _long(renamed, "nixtla", decimal_comma)
    # A column only the long layouts have, without the rest: a long file missing one (a wide file may
    # well have a series called "y").
    for layout, columns, marks in (
        ("long", LONG_COLUMNS, ("series", "value")),
        ("nixtla", tuple(NIXTLA_COLUMNS), ("unique_id",)),
    ):
        if any(c in lowered for c in marks):
            missing = [c for c in columns if c not in lowered]
            raise DataError(
                f"{_name(source)}: {LAYOUTS[layout]} needs columns {','.join(columns)};"
                f" missing {','.join(missing)}"
            )
    return _wide(raw, source, decimal_comma)


def parse_timestamps(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Epoch-ms int64 array and a boolean mask of the entries that parsed to a sane timestamp."""
    if pd.api.types.is_datetime64_any_dtype(column):
        column = column.astype(str)
    numeric = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ms = np.zeros(len(column), dtype=np.int64)
    ok = np.isfinite(numeric)
    text = ~ok & column.notna().to_numpy()
    ok &= (numeric >= MIN_TS_MS) & (numeric < MAX_TS_MS)  # a number out of range (beyond int64: no cast)
    ms[ok] = numeric[ok].astype(np.int64)
    if text.any():
        parsed = _parse_dates(column[text].astype("string"))
        parsed_ok = parsed.notna().to_numpy()
        where = np.flatnonzero(text)[parsed_ok]
        ms[where] = parsed[parsed_ok].astype("datetime64[ms, UTC]").astype("int64").to_numpy()
        ok[where] = (ms[where] >= MIN_TS_MS) & (ms[where] < MAX_TS_MS)
    return ms, ok


def _parse_dates(text: pd.Series) -> pd.Series:
    """Text timestamps as UTC datetimes (NaT where none), in one format for the whole column where one
    reads as many as parsing each entry on its own does: month first, else day first (``01/02/2020`` is
    2 January unless a ``13/02/2020`` shows the column is day first). Only columns of mixed formats are
    parsed entry by entry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "could not infer format": the mixed parse below covers it
        mixed = None
        for dayfirst in (False, True):
            try:
                parsed = pd.to_datetime(text, errors="coerce", utc=True, dayfirst=dayfirst)
            except (ValueError, TypeError):
                continue
            if parsed.notna().all():  # every entry in one format: the usual case, no entry-by-entry parse
                return parsed
            if mixed is None:
                mixed = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
            if parsed.notna().sum() >= mixed.notna().sum():
                return parsed
    return mixed if mixed is not None else pd.to_datetime(text, errors="coerce", utc=True, format="mixed")


def _separator(source: str | os.PathLike[str] | IO[str]) -> str:
    """The CSV's field separator, from its header line: a comma, else a semicolon or a tab (files written
    where the comma is the decimal mark); a comma for a stream that cannot be read twice."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8", errors="replace") as f:
                header = f.readline()
        elif source.seekable():
            at = source.tell()
            header = source.readline()
            source.seek(at)
        else:
            return ","
    except (OSError, ValueError, AttributeError):
        return ","
    header = header.decode("utf-8", "replace") if isinstance(header, bytes) else str(header)
    if "," in header:
        return ","
    return next((sep for sep in (";", "\t") if sep in header), ",")


def _read_table(source: str | os.PathLike[str] | IO[str], fmt: str | None) -> tuple[pd.DataFrame, bool]:
    """The file as a frame, and whether its values may carry a decimal comma (a CSV not separated by commas)."""
    name = _name(source)
    fmt = fmt or ("parquet" if name.lower().endswith((".parquet", ".pq")) else "csv")
    try:
        if fmt == "parquet":
            return pd.read_parquet(source).reset_index(drop=True), False
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise DataError(f"{name}: no such file")
        sep = _separator(source)
        frame = pd.read_csv(source, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True)
        return frame, sep != ","
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: the file is empty") from None
    except (ValueError, OSError, ImportError, pd.errors.ParserError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{name}: cannot read as {fmt}: {first_line}") from None


def _numbers(cells: pd.Series, decimal_comma: bool) -> np.ndarray:
    """A value column as float64, NaN where a cell is not a number; a number written as text reads as the
    float ``float()`` gives (pandas 2's own parse, with numpy 2.4, is one unit in the last place off for
    about a fifth of 17-digit values). With ``decimal_comma`` (a CSV separated by semicolons or tabs), a
    column where some cells are numbers only with a decimal comma (``1,5``, ``-1.234,5``, ``1 234,5``) is
    read with the comma as the decimal mark and points or spaces as thousands separators, wherever they
    group digits by three."""
    values = _exactly(cells, pd.to_numeric(cells.replace("", np.nan), errors="coerce"))
    if not decimal_comma or np.isfinite(values).all():
        return values
    column = cells.astype("string").str.strip()
    comma = column.str.fullmatch(_DECIMAL_COMMA).fillna(False)  # never a plain number: a failed cell
    if not comma.any():
        return values
    european = comma | column.str.fullmatch(_GROUPED).fillna(False)
    rewritten = column[european].str.replace(r"[.\s\u00a0\u202f]", "", regex=True).str.replace(",", ".")
    values[european.to_numpy(dtype=bool)] = _exactly(rewritten, pd.to_numeric(rewritten, errors="coerce"))
    return values


def _exactly(cells: pd.Series, parsed: pd.Series) -> np.ndarray:
    """``parsed`` (``pd.to_numeric`` of ``cells``) as float64, its numbers read from text parsed again by
    ``float()``: the nearest double, as Python, orjson and the service read the same digits."""
    values = np.array(parsed.to_numpy(dtype=np.float64, na_value=np.nan))  # a copy: pandas 3's is read-only
    if not (cells.dtype == object or pd.api.types.is_string_dtype(cells.dtype)):
        return values
    at = np.flatnonzero(np.isfinite(values))
    text = cells.to_numpy(dtype=object)[at]
    try:
        values[at] = np.fromiter(map(float, text), np.float64, len(at))
    except (TypeError, ValueError):  # a cell pandas reads and float() does not: keep pandas' reading
        values[at] = [_float_or(t, v) for t, v in zip(text, values[at], strict=True)]
    return values


def _float_or(text: object, fallback: float) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return fallback


def _long(raw: pd.DataFrame, layout: str, decimal_comma: bool) -> LoadedSeries:
    lines = np.arange(len(raw), dtype=np.int64) + 2
    series = raw["series"].astype("string").str.strip()
    values = _numbers(raw["value"], decimal_comma)
    ts, ts_ok = parse_timestamps(raw["ts"])
    reasons = np.full(len(raw), "", dtype=object)
    finite = np.isfinite(values)
    reasons[~finite] = "value_not_number"
    reasons[finite & (np.abs(values) > MAX_ABS_VALUE)] = "value_out_of_range"
    reasons[~ts_ok] = "bad_ts"
    reasons[(series.isna() | (series == "")).to_numpy()] = "missing_series"
    good = reasons == ""
    bad = [BadRow(int(line), str(reason)) for line, reason in zip(lines[~good], reasons[~good], strict=True)]
    frame = pd.DataFrame(
        {
            "series": series[good].astype(str).to_numpy(),
            "ts": ts[good],
            "value": values[good],
            "line": lines[good],
        }
    )
    return LoadedSeries(frame.reset_index(drop=True), bad, layout)


def _wide(raw: pd.DataFrame, source: object, decimal_comma: bool) -> LoadedSeries:
    lowered = {c.lower(): c for c in raw.columns}
    time_column = next((lowered[c] for c in TIME_COLUMNS if c in lowered), raw.columns[0])
    value_columns = [c for c in raw.columns if c != time_column]
    if not value_columns:
        raise DataError(
            f"{_name(source)}: needs long columns series,ts,value or a time column plus one column per series"
        )
    lines = np.arange(len(raw), dtype=np.int64) + 2
    ts, ts_ok = parse_timestamps(raw[time_column])
    repeats = int(pd.Series(ts[ts_ok]).duplicated().sum())
    if repeats:  # one row per time in a wide file: this is a long file under other column names
        raise DataError(
            f"{_name(source)}: read as {LAYOUTS['wide']} with time column {time_column!r}, but {repeats} of"
            f" its times repeat; a long file needs columns series,ts,value (or unique_id,ds,y)"
        )
    bad = [BadRow(int(line), "bad_ts") for line in lines[~ts_ok]]
    parts = []
    for column in value_columns:
        cells = raw[column]
        blank = (cells.astype("string").str.strip() == "").fillna(True).to_numpy(dtype=bool)
        values = _numbers(cells, decimal_comma)
        finite = np.isfinite(values)
        bad_value = ts_ok & ~blank & ~finite
        bad += [BadRow(int(line), "value_not_number", str(column)) for line in lines[bad_value]]
        huge = ts_ok & finite & (np.abs(values) > MAX_ABS_VALUE)
        bad += [BadRow(int(line), "value_out_of_range", str(column)) for line in lines[huge]]
        keep = ts_ok & finite & ~huge
        parts.append(
            pd.DataFrame({"series": str(column), "ts": ts[keep], "value": values[keep], "line": lines[keep]})
        )
    frame = pd.concat(parts, ignore_index=True)
    bad.sort(key=lambda row: row.line)
    return LoadedSeries(frame, bad, "wide")


def _name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, io.IOBase):
        return getattr(source, "name", "<stream>")
    return "<data>"
