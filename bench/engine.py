"""Benchmark of the engine against the two obvious alternatives, in the same run; prints JSON.

    python bench/engine.py [--device cpu|cuda] [--quick]

Model: GRU, hidden 64, 2 layers, horizon 12, float32. Baselines:
  (a) window: for every new value, re-run ``nn.GRU`` over the series' last W values (W = 16 ... 1024);
  (b) incremental: ``index_select`` the states, ``nn.GRU`` over one step, head, ``index_copy_`` back.
The engine does everything the service needs (ordering, duplicates, scaling, online error, ring buffer),
the baselines only the recurrence. Every figure is a median with min and max over repeats; engine and
baselines alternate within each repeat so that load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from forecaster.engine.choice import Choice
from forecaster.engine.engine import Engine
from forecaster.engine.intervals import Intervals
from forecaster.engine.shadow import Shadow
from forecaster.model import RecurrentForecaster

MODEL = {"cell": "gru", "hidden_size": 64, "num_layers": 2, "horizon": 12}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stream:
    """Feeds an engine: ``batch`` distinct series out of ``names``, one new value each per call.

    Calls cycle through a few random subsets (random orders when ``batch`` is all of them) drawn
    beforehand, so every size sees the same access pattern."""

    def __init__(self, engine: Engine, names: list[str], batch: int, seed: int = 0, subsets: int = 8) -> None:
        self.engine, self.batch = engine, batch
        rng = np.random.default_rng(seed)
        self.subsets = [
            [names[i] for i in rng.choice(len(names), batch, replace=False)] for _ in range(subsets)
        ]
        self.ts = 1_700_000_000_000
        self.values = rng.normal(size=batch)
        self.calls = 0
        self.shadow: Shadow | None = None  # a challenger stepped beside (shadow_cost)

    def call(self) -> None:
        self.ts += 1
        self.calls += 1
        names = self.subsets[self.calls % len(self.subsets)]
        ts = np.full(self.batch, self.ts)
        if self.shadow is None:
            self.engine.process(names, ts, self.values)
            return
        self.shadow.before(names)
        out = self.engine.process(names, ts, self.values)
        self.shadow.observe(names, ts, self.values, out)


def populate(engine: Engine, names: list[str], chunk: int = 65_536) -> None:
    for lo in range(0, len(names), chunk):
        part = names[lo : lo + chunk]
        engine.process(part, np.zeros(len(part), dtype=np.int64), np.ones(len(part)))


def timed(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def calls_for(fn: Callable[[], Any], seconds: float, sync: Callable[[], None]) -> int:
    """Calls that take about ``seconds`` (one timed repeat), at least 3."""
    fn()
    once = timed(fn, 1, sync)
    return max(3, int(seconds / max(once, 1e-7)))


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = RecurrentForecaster(**MODEL).to(self.device).eval()
        cuda = self.device.type == "cuda"
        self.sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)

    def engine(
        self,
        capacity: int = 1024,
        intervals: bool = True,
        choice: Choice | None = None,
        model: RecurrentForecaster | None = None,
    ) -> Engine:
        return Engine(
            self.model if model is None else model,
            device=self.device,
            window=self.args.window,
            capacity=capacity,
            max_series=10_000_000,
            intervals=Intervals() if intervals else None,
            choice=choice,
        )

    def _on_off(self, batches: list[int], make: Callable[[bool, int], Engine], label: str) -> dict[str, Any]:
        """Cost per value of engines ``make(on, capacity)`` with a feature on and off, repeats interleaved,
        and the state bytes per series of each."""
        out: dict[str, Any] = {}
        for batch in batches:
            streams = {}
            for on in (True, False):
                streams[on] = Stream(make(on, max(1024, batch)), [f"s{i}" for i in range(batch)], batch)
                for _ in range(40):  # past the warm-ups: every step scored
                    streams[on].call()
            progress(f"{label} on/off batch {batch}")
            calls = {on: calls_for(streams[on].call, self.args.seconds, self.sync) for on in streams}
            us: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(self.args.repeats):
                for on in (True, False):
                    us[on].append(1e6 * timed(streams[on].call, calls[on], self.sync) / batch)
            ratios = [a / b for a, b in zip(us[True], us[False], strict=True)]
            out[str(batch)] = {
                "us_per_value_on": summary(us[True]),
                "us_per_value_off": summary(us[False]),
                "ratio_on_over_off": summary(ratios),
            }
        bytes_on, bytes_off = make(True, 1024).state_bytes / 1024, make(False, 1024).state_bytes / 1024
        out["state_bytes_per_series"] = {"on": bytes_on, "off": bytes_off, label: bytes_on - bytes_off}
        return out

    # ---- prediction intervals on vs off ---------------------------------------------------------------

    def intervals_cost(self, batches: list[int]) -> dict[str, Any]:
        """Cost per value with intervals (levels 80, 95) on and off."""
        return self._on_off(batches, lambda on, capacity: self.engine(capacity, intervals=on), "calibrator")

    # ---- per-series choice on vs off --------------------------------------------------------------------

    def choice_cost(self, batches: list[int]) -> dict[str, Any]:
        """Cost per value with the per-series choice on and off (intervals on in both), for the bench's
        model (no baseline: two candidates) and for one over a seasonal baseline of 12 (three). The stream
        repeats its values, so the last value is exact and every series switches to it (``all_switched``,
        the worst case: the whole decision runs); ``none_switched`` never lets a series switch (a model
        that serves its series well: the errors are scored, the decision skipped)."""
        torch.manual_seed(0)
        seasonal = RecurrentForecaster(**MODEL, season=12, base_seasons=1).to(self.device).eval()
        out: dict[str, Any] = {}
        for case, choice in (("all_switched", Choice()), ("none_switched", Choice(min_errors=1 << 62))):
            for name, m in (("no_baseline", self.model), ("seasonal_12", seasonal)):
                out[f"{name}_{case}"] = self._on_off(
                    batches,
                    lambda on, capacity, m=m, c=choice: self.engine(
                        capacity, choice=c if on else None, model=m
                    ),
                    "choice",
                )
        return out

    # ---- shadow promotion: the champion alone vs the champion with a challenger beside it -------------

    def shadow_cost(self, batches: list[int]) -> dict[str, Any]:
        """Cost per value of one engine alone and of the same engine with a ``Shadow`` (a second model of
        the same shape stepped on every value, both scored), repeats interleaved. Goal: <= 2.2x."""
        torch.manual_seed(1)
        challenger = RecurrentForecaster(**MODEL).to(self.device).eval()
        out: dict[str, Any] = {}
        for batch in batches:
            names = [f"s{i}" for i in range(batch)]
            alone = Stream(self.engine(capacity=max(1024, batch)), names, batch)
            paired = Stream(self.engine(capacity=max(1024, batch)), names, batch)
            for _ in range(20):
                alone.call()
                paired.call()
            paired.shadow = Shadow(paired.engine, challenger, "challenger")
            for _ in range(20):  # past the first values of the trial (nothing to score yet)
                paired.call()
            progress(f"shadow batch {batch}")
            calls = {
                k: calls_for(s.call, self.args.seconds, self.sync)
                for k, s in (("alone", alone), ("shadow", paired))
            }
            us: dict[str, list[float]] = {"alone": [], "shadow": []}
            for _ in range(self.args.repeats):
                for key, stream in (("alone", alone), ("shadow", paired)):
                    us[key].append(1e6 * timed(stream.call, calls[key], self.sync) / batch)
            ratios = [a / b for a, b in zip(us["shadow"], us["alone"], strict=True)]
            out[str(batch)] = {
                "us_per_value_alone": summary(us["alone"]),
                "us_per_value_shadow": summary(us["shadow"]),
                "ratio_shadow_over_alone": summary(ratios),
            }
        return out

    # ---- engine throughput and baseline (b) ----------------------------------------------------------

    def incremental_baseline(self, batch: int, capacity: int) -> Callable[[], None]:
        gru, head = self.model.rnn, self.model.head
        table = torch.zeros(MODEL["num_layers"], capacity, MODEL["hidden_size"], device=self.device)
        idx = torch.randperm(capacity, device=self.device)[:batch]
        x = torch.randn(batch, 1, 1, device=self.device)

        def step() -> None:
            with torch.inference_mode():
                h = table.index_select(1, idx)  # (layers, batch, hidden)
                out, h = gru(x, h)  # (batch, 1, hidden)
                head(out[:, -1]).cpu()  # (batch, horizon) forecasts, on the host like the engine's
                table.index_copy_(1, idx, h)

        return step

    def throughput(self, batches: list[int], with_baseline: set[int]) -> dict[str, Any]:
        engine_rates: dict[str, Any] = {}
        base_rates: dict[str, Any] = {}
        for batch in batches:
            engine = self.engine(capacity=max(1024, batch))
            stream = Stream(engine, [f"s{i}" for i in range(batch)], batch)
            stream.call()
            base = self.incremental_baseline(batch, max(1024, batch)) if batch in with_baseline else None
            progress(f"throughput batch {batch} ({torch.get_num_threads()} threads)")
            calls = calls_for(stream.call, self.args.seconds, self.sync)
            base_calls = calls_for(base, self.args.seconds, self.sync) if base is not None else 0
            e, b = [], []
            for _ in range(self.args.repeats):
                e.append(batch / timed(stream.call, calls, self.sync))
                if base is not None:
                    b.append(batch / timed(base, base_calls, self.sync))
            engine_rates[str(batch)] = summary(e)
            if b:
                base_rates[str(batch)] = summary(b)
        return {"engine": engine_rates, "incremental_baseline": base_rates}

    # ---- baseline (a): re-run the window per value ---------------------------------------------------

    def window_baseline(self, windows: list[int], batch: int) -> dict[str, Any]:
        out = {}
        for w in windows:
            progress(f"window baseline W={w} batch {batch}")
            x = torch.randn(batch, w, 1, device=self.device)

            def run(x: torch.Tensor = x) -> None:
                with torch.inference_mode():
                    y, _ = self.model(x)  # (batch, W, horizon)
                    y[:, -1].cpu()

            if w == windows[0]:
                run()  # first call: one-off allocations
            reps = [batch / timed(run, 1, self.sync) for _ in range(max(1, self.args.repeats // 2))]
            out[str(w)] = summary(reps)
        return out

    # ---- cost per value vs history length and resident series ---------------------------------------

    def history_cost(self, batch: int, lengths: list[int]) -> dict[str, Any]:
        engine = self.engine(capacity=batch)
        stream = Stream(engine, [f"s{i}" for i in range(batch)], batch)
        out, done = {}, 0
        for length in lengths:
            progress(f"history {length} batch {batch}")
            while done < length:
                stream.call()
                done += 1
            calls = max(3, min(length // 4, calls_for(stream.call, self.args.seconds, self.sync)))
            reps = [timed(stream.call, calls, self.sync) / batch * 1e6 for _ in range(self.args.repeats)]
            done += calls * self.args.repeats
            out[str(length)] = summary(reps)
        return out

    def resident_cost(self, batch: int, sizes: list[int]) -> dict[str, Any]:
        out = {}
        for size in sizes:
            progress(f"resident {size}")
            gc.collect()
            rss_before = rss_bytes()
            engine = self.engine(capacity=1024)
            names = [f"series-{i:09d}" for i in range(size)]
            populate(engine, names)
            stream = Stream(engine, names, min(batch, size))
            calls = calls_for(stream.call, self.args.seconds, self.sync)
            reps = [
                timed(stream.call, calls, self.sync) / stream.batch * 1e6 for _ in range(self.args.repeats)
            ]
            out[str(size)] = {
                "us_per_value": summary(reps),
                "series_per_step": stream.batch,
                "ms_per_step": summary([r * stream.batch / 1000 for r in reps]),
                "state_bytes": engine.state_bytes,
                "state_bytes_per_slot": engine.state_bytes / engine.table.capacity,
                "rss_bytes": rss_bytes(),
                "rss_growth_per_series": (rss_bytes() - rss_before) / size,
                "capacity": engine.table.capacity,
            }
            del engine, stream, names
            gc.collect()
        return out

    def step_paths(self, batches: list[int]) -> dict[str, Any]:
        """The model's fused one-step path against ``forward`` over time = 1 (what it replaces)."""
        out = {}
        for batch in batches:
            x = torch.randn(batch, 1, device=self.device)
            h = self.model.initial_state(batch, self.device)

            def fused(x: torch.Tensor = x, h: Any = h) -> None:
                with torch.inference_mode():
                    self.model.step(x, h)

            def forward(x: torch.Tensor = x, h: Any = h) -> None:
                with torch.inference_mode():
                    self.model(x[:, None], h)

            calls = calls_for(fused, self.args.seconds, self.sync)
            f, g = [], []
            for _ in range(self.args.repeats):
                f.append(timed(fused, calls, self.sync) * 1e6)
                g.append(timed(forward, calls, self.sync) * 1e6)
            out[str(batch)] = {"fused_step_us": summary(f), "forward_step_us": summary(g)}
        return out


def ratio(a: dict[str, float], b: dict[str, float]) -> float:
    return a["median"] / b["median"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--intervals-only", action="store_true", help="only the cost of prediction intervals (on vs off)"
    )
    parser.add_argument(
        "--choice-only", action="store_true", help="only the cost of the per-series choice (on vs off)"
    )
    parser.add_argument(
        "--shadow-only",
        action="store_true",
        help="only the cost of a challenger in shadow (vs the engine alone)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run of well under a minute"
    )
    parser.add_argument("--window", type=int, default=256, help="retained values per series (W)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="length of one timed repeat")
    parser.add_argument("--batches", default=None, help="comma list of engine batch sizes")
    parser.add_argument("--windows", default=None, help="comma list of W for baseline (a)")
    parser.add_argument("--window-batch", type=int, default=None, help="batch of baseline (a)")
    parser.add_argument("--history", default=None, help="comma list of history lengths")
    parser.add_argument("--history-batch", type=int, default=None)
    parser.add_argument("--resident", default=None, help="comma list of resident series counts")
    parser.add_argument("--resident-batch", type=int, default=None, help="series per step at each size")
    parser.add_argument(
        "--threads",
        default=None,
        help="torch intra-op threads: comma list, 'all' = torch's default (quick: 1; else 1,all)",
    )
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    q = args.quick
    args.repeats = args.repeats or (3 if q else 7)
    args.seconds = args.seconds or (0.1 if q else 0.4)
    args.threads = args.threads or ("1" if q else "1,all")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    batches = ints(args.batches or ("1,64,1024" if q else "1,64,1024,16384"))
    windows = ints(args.windows or ("16,64,256" if q else "16,64,256,1024"))
    window_batch = args.window_batch or (64 if q else 1024)
    history = ints(args.history or ("16,512" if q else "16,4096"))
    history_batch = args.history_batch or (64 if q else 1024)
    resident = ints(args.resident or ("1000,10000" if q else "1000,100000,1000000"))
    resident_batch = args.resident_batch or (100_000 if cuda else 1024)
    if cuda:
        batches = sorted(set(batches) | {100_000})

    default_threads = torch.get_num_threads()
    bench = Bench(args)
    report: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "model": MODEL,
        "window": args.window,
        "quick": q,
        "repeats": args.repeats,
        "runs": {},
    }
    started = time.perf_counter()
    torch.set_num_threads(1)
    if args.shadow_only:
        report["shadow"] = bench.shadow_cost(batches)
        report["seconds"] = time.perf_counter() - started
        print(json.dumps(report, indent=2))
        return 0
    if args.choice_only:
        report["choice"] = bench.choice_cost(batches)
        report["seconds"] = time.perf_counter() - started
        print(json.dumps(report, indent=2))
        return 0
    report["intervals"] = bench.intervals_cost(batches)
    report["choice"] = bench.choice_cost(batches)
    report["shadow"] = bench.shadow_cost(batches)
    if args.intervals_only:
        report["seconds"] = time.perf_counter() - started
        print(json.dumps(report, indent=2))
        return 0
    for threads in args.threads.split(","):
        n = default_threads if threads == "all" else int(threads)
        torch.set_num_threads(n)
        run: dict[str, Any] = {"threads": n}
        run["throughput_values_per_s"] = bench.throughput(batches, {1, 1024})
        run["window_baseline_values_per_s"] = {
            "batch": window_batch,
            **bench.window_baseline(windows, window_batch),
        }
        run["step_paths"] = bench.step_paths([1, 1024])
        eng, inc = (
            run["throughput_values_per_s"]["engine"],
            run["throughput_values_per_s"]["incremental_baseline"],
        )
        ratios = {}
        if "256" in run["window_baseline_values_per_s"] and "1024" in eng:
            ratios["engine_over_window_W256_batch1024"] = ratio(
                eng["1024"], run["window_baseline_values_per_s"]["256"]
            )
        for b in ("1", "1024"):
            if b in eng and b in inc:
                ratios[f"engine_over_incremental_batch{b}"] = ratio(eng[b], inc[b])
        run["ratios"] = ratios
        report["runs"][threads] = run
    # History and resident-series costs once, at one thread: a busy machine makes several threads wait
    # on each other, which would hide what these two figures are about.
    torch.set_num_threads(1)
    hist = bench.history_cost(history_batch, history)
    res = bench.resident_cost(resident_batch, resident)
    layers, hidden = MODEL["num_layers"], MODEL["hidden_size"]
    biggest = res[str(max(resident))]
    report["history_us_per_value"] = {
        "batch": history_batch,
        **hist,
        "ratio_longest_over_shortest": ratio(hist[str(max(history))], hist[str(min(history))]),
    }
    report["resident"] = {
        "batch": resident_batch,
        **res,
        "ratio_largest_over_smallest": ratio(
            biggest["us_per_value"], res[str(min(resident))]["us_per_value"]
        ),
    }
    report["memory"] = {
        "state_bytes_per_series": biggest["state_bytes_per_slot"],
        "goal_bytes_per_series": 2 * (layers * hidden * 4 + args.window * 4),
        "rss_bytes_at_largest": biggest["rss_bytes"],
        "largest_resident": max(resident),
    }
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
