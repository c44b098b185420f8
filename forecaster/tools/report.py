"""The replay report: one PNG with actuals against forecasts for a few series, and the error by horizon.

matplotlib (the ``notebooks`` extra) is imported only here, lazily, with the Agg backend: nothing else in
the package needs it, and a missing install gives a one-line ``ForecasterError``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from forecaster.errors import ReportError
from forecaster.tools.replay import ReplayResult, duration

SERIES_SHOWN = 4
LAST_POINTS = 200  # values of each series drawn (its most recent ones)


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``ReportError`` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError(
            "--report needs matplotlib: pip install 'forecaster[notebooks]' (or pip install matplotlib)"
        ) from None
    return plt


def pick_series(result: ReplayResult, n: int = SERIES_SHOWN) -> list[str]:
    """The ``n`` series with the most values (ties by name)."""
    groups = result.rows.by_series()
    return sorted(groups, key=lambda name: (-len(groups[name]), name))[:n]


def write_report(result: ReplayResult, path: str | os.PathLike[str]) -> None:
    """Draw the report of ``result`` into the PNG ``path``."""
    plt = require_matplotlib()
    shown = pick_series(result)
    rows = result.rows
    groups = rows.by_series()
    fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(11, 2.6 * (len(shown) + 1)), squeeze=False)
    try:
        # Panels 1..n: what happened, the one-step forecasts, and the full horizon from the last origin.
        for ax, name in zip(axes[:-1, 0], shown, strict=True):
            at = groups[name][-LAST_POINTS:]
            period = int(rows.periods()[at[-1]])
            x, nxt, unit = _axis(rows.ts[at], period)
            ax.plot(x, rows.values[at], color="black", lw=1.2, label="actual")
            if len(at) > 1 and rows.lower is not None and rows.upper is not None:
                # One-step bands of each level (widest first, lighter), and the bands of the last origin.
                ahead = x[-1] + np.arange(1, result.horizon + 1)
                for li in reversed(range(len(rows.labels))):
                    shade = 0.15 + 0.15 * (len(rows.labels) - 1 - li)
                    label = f"{rows.labels[li]}% interval"
                    lo, hi = rows.lower[at][:-1, li, 0], rows.upper[at][:-1, li, 0]
                    ax.fill_between(nxt, lo, hi, color="tab:blue", alpha=shade, lw=0, label=label)
                    lo, hi = rows.lower[at][-1, li], rows.upper[at][-1, li]
                    ax.fill_between(ahead, lo, hi, color="tab:orange", alpha=shade, lw=0)
            if len(at) > 1:
                ax.plot(nxt, rows.forecasts[at][:-1, 0], color="tab:blue", lw=1.0, label="forecast, 1 step")
                ahead = x[-1] + np.arange(1, result.horizon + 1)
                ax.plot(
                    ahead,
                    rows.forecasts[at][-1],
                    color="tab:orange",
                    lw=1.0,
                    ls="--",
                    label=f"forecast, {result.horizon} steps",
                )
            ax.set_title(f"{name} (last {len(at)} values, x in {unit})", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        # Last panel: MAE by horizon step, the model against both baselines on the same points.
        ax = axes[-1, 0]
        steps = np.arange(1, result.horizon + 1)
        for name, style in (("model", "-o"), ("seasonal_naive", "--s"), ("last_value", ":^")):
            label = (
                f"seasonal naive (season {result.season})"
                if name == "seasonal_naive"
                else name.replace("_", " ")
            )
            ax.plot(steps, result.errors[name].mae(), style, ms=3, label=label)
        ax.set_xlabel("horizon step")
        ax.set_ylabel("MAE")
        ax.set_title("error by horizon", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write the report: {exc}") from None
    finally:
        plt.close(fig)


def _axis(ts: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray, str]:
    """x of each value, x of each one-step forecast (made after all values but the last), and the unit.

    With a period, x is time in periods and a one-step forecast lies one period after its origin (a gap
    shows as one); without, x is time in median spacings and a one-step forecast lies at the next value.
    """
    t = (ts - ts[0]).astype(np.float64)
    if period > 0:
        x = t / period
        return x, x[:-1] + 1.0, f"periods of {duration(period)}"
    step = float(np.median(np.diff(ts))) if len(ts) > 1 else 1.0
    x = t / step if step > 0 else np.arange(len(ts), dtype=np.float64)
    return x, x[1:], "steps (no period: a step is the next value)"
