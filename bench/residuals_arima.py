"""AutoARIMA on the residuals ``bench/residuals.py --dump DIR`` wrote: what a statistical model of the
baseline's one-step errors finds; prints JSON. Needs numpy and statsforecast only (the bench extra; where
statsforecast cannot share the project's pandas, a virtual environment of its own).

    python bench/residuals_arima.py DIR [--series 8]

Per set: AutoARIMA (``season_length`` the baseline's season; over 24, none, for time) fitted on each of
the first ``--series`` series' earlier residuals (at most the last 2000), the orders it picked, and its
one-step MAE on the held-out residuals, parameters fixed (``forward``), over the residuals' own MAE
(below 1: structure a model of the recent errors can take at h1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from statsforecast.models import AutoARIMA

FIT_LIMIT = 2000


def arima_share(path: Path, limit: int) -> dict:
    data = np.load(path)
    season, test_from = int(data["season"]), data["test_from"]
    orders: dict[str, int] = {}
    num = den = 0.0
    started = time.perf_counter()
    for i in range(min(limit, len(test_from))):
        r = np.nan_to_num(data[f"r{i}"][1:], nan=0.0)  # a missing period's error counts as none
        cut = int(test_from[i]) - 1
        if cut < 3 * season + 10 or len(r) - cut < 5:
            continue
        first = max(0, cut - FIT_LIMIT)
        model = AutoARIMA(season_length=season if season <= 24 else 1).fit(r[first:cut])
        fitted = model.forward(y=r[first:], h=1, fitted=True)["fitted"]
        error = r[cut:] - fitted[cut - first :]
        ok = np.isfinite(error)
        num += float(np.abs(error[ok]).sum())
        den += float(np.abs(r[cut:][ok]).sum())
        p, q, sp, sq, s, d, sd = model.model_["arma"]
        key = f"({p},{d},{q})({sp},{sd},{sq})[{s}]"
        orders[key] = orders.get(key, 0) + 1
    return {
        "orders": orders,
        "test_mae_over_residual_mae": round(num / den, 4) if den else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--series", type=int, default=8, help="series per set (the first ones)")
    args = parser.parse_args(argv)
    report = {"bench": "residuals_arima", "sets": {}}
    for path in sorted(Path(args.folder).glob("*.npz")):
        report["sets"][path.stem] = arima_share(path, args.series)
        print(json.dumps({path.stem: report["sets"][path.stem]}), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
