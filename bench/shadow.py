"""Shadow promotion: how many values the decision needs, and how often it errs; prints JSON.

    python bench/shadow.py [--quick] [--seeds N] [--series N]

Two parts:

1. The decision on streams of known quality (``forecaster.engine.shadow.PairedScore`` and the verdict
   of ``Shadow``, default settings: 1000 values at each step, z 3, rejected after 50k). For each seed,
   ``--series`` series of a random walk; each model's forecast errors are AR(1) in time (phi 0.6, as a
   model's errors are from value to value) with scales set so that the challenger's MAE is 20% lower
   (``better_20``), 5% higher (``worse_5``) or equal (``equal``). Reported: values (all series together)
   until the verdict, and how many seeds ended promoted, rejected or undecided. Goals: ``better_20``
   promoted within 5k values; ``worse_5`` never promoted.
2. The same on real engines (``Shadow`` stepping both models) over ``forecaster.tools.synthetic`` series
   (season 24): an untrained GRU champion against a seasonal-naive challenger (untrained over a season-24
   baseline), and the reverse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from forecaster.engine.engine import Engine
from forecaster.engine.shadow import PairedScore, Shadow
from forecaster.model import ForecasterConfig, build_model
from forecaster.tools.synthetic import generate

HORIZON = 12
SCENARIOS = {"better_20": 0.8, "worse_5": 1.05, "equal": 1.0}  # challenger's error scale / champion's


class _Judge:
    """``Shadow``'s verdict over a bare ``PairedScore`` (no engines)."""

    def __init__(self, horizon: int, min_values: int, max_values: int, z: float) -> None:
        self.score = PairedScore(horizon)
        self.version, self.champion_version = "challenger", "champion"
        self.min_values, self.max_values, self.z = min_values, max_values, z

    verdict = Shadow.verdict


def _errors(rng: np.random.Generator, shape: tuple[int, int, int], phi: float = 0.6) -> np.ndarray:
    """(T, S, H) AR(1) in time, unit marginal variance."""
    e = rng.normal(size=shape)
    out = np.empty(shape)
    out[0] = e[0]
    for t in range(1, shape[0]):
        out[t] = phi * out[t - 1] + np.sqrt(1 - phi * phi) * e[t]
    return out


def decision_run(seed: int, n_series: int, scale: float, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    steps = args.max_values // n_series + HORIZON + 2
    truth = np.cumsum(rng.normal(size=(steps, n_series)), axis=0) + 100.0
    champion = truth[:, :, None] + _errors(rng, (steps, n_series, HORIZON))  # forecasts made at t for t+k
    challenger = truth[:, :, None] + scale * _errors(rng, (steps, n_series, HORIZON))
    judge = _Judge(HORIZON, args.min_values, args.max_values, args.z)
    slots = np.arange(n_series)
    # The forecast made after value t for t + k: what PairedScore pairs with value t + k.
    for t in range(steps):
        # forecasts made now for k = 1..H ahead: centred on the truth they target, errors as drawn
        ahead = np.minimum(t + np.arange(1, HORIZON + 1), steps - 1)
        f_champion = truth[ahead].T + (champion[t] - truth[t][:, None])
        f_challenger = truth[ahead].T + (challenger[t] - truth[t][:, None])
        judge.score.add(slots, truth[t], f_champion, f_challenger)
        decision, detail = judge.verdict()
        if decision is not None:
            return {
                "decision": decision,
                "values": judge.score.count(1),
                "z": [s["z"] for s in detail["steps"]],
            }
    return {
        "decision": None,
        "values": judge.score.count(1),
        "z": [s["z"] for s in judge.verdict()[1]["steps"]],
    }


def engine_run(champion_model: Any, challenger_model: Any, args: argparse.Namespace) -> dict[str, Any]:
    frame = generate(n_series=args.series, n_values=2000, seed=7)
    engine = Engine(champion_model, "champion", window=64)
    shadow = Shadow(
        engine,
        challenger_model,
        "challenger",
        min_values=args.min_values,
        max_values=args.max_values,
        z=args.z,
    )
    started = time.perf_counter()
    for _, group in frame.groupby("ts", sort=True):
        names, ts, values = group["series"].tolist(), group["ts"].to_numpy(), group["value"].to_numpy()
        shadow.before(names)
        out = engine.process(names, ts, values)
        shadow.observe(names, ts, values, out)
        decision, detail = shadow.verdict()
        if decision is not None:
            break
    return {
        "decision": decision,
        "values": shadow.score.count(1),
        "steps": detail["steps"],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--min-values", type=int, default=1000)
    parser.add_argument("--max-values", type=int, default=50_000)
    parser.add_argument("--z", type=float, default=3.0)
    args = parser.parse_args(argv)
    seeds = args.seeds or (5 if args.quick else 20)
    report: dict[str, Any] = {
        "settings": {"min_values": args.min_values, "max_values": args.max_values, "z": args.z},
        "series": args.series,
        "seeds": seeds,
        "horizon": HORIZON,
        "decision": {},
    }
    for name, scale in SCENARIOS.items():
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        runs = [decision_run(seed, args.series, scale, args) for seed in range(seeds)]
        values = [r["values"] for r in runs if r["decision"] is not None]
        report["decision"][name] = {
            "challenger_error_scale": scale,
            "promoted": sum(r["decision"] == "promote" for r in runs),
            "rejected": sum(r["decision"] == "reject" for r in runs),
            "undecided": sum(r["decision"] is None for r in runs),
            "values_to_decision": (
                {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if values
                else None
            ),
        }
    config = ForecasterConfig(hidden_size=16, num_layers=1, horizon=HORIZON)
    untrained = build_model(config, seed=1)
    seasonal = build_model(config.model_copy(update={"season": 24, "base_seasons": 1}), seed=1)
    print("[bench] engines", file=sys.stderr, flush=True)
    report["engines"] = {
        "seasonal_naive_challenges_untrained": engine_run(untrained, seasonal, args),
        "untrained_challenges_seasonal_naive": engine_run(seasonal, untrained, args),
    }
    d = report["decision"]
    report["goals"] = {
        "better_20_promoted_within_5k_values": bool(
            d["better_20"]["promoted"] == seeds and d["better_20"]["values_to_decision"]["max"] <= 5000
        ),
        "worse_5_never_promoted": d["worse_5"]["promoted"] == 0,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
