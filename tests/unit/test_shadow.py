"""Shadow: the challenger stepped beside the champion, the paired score, the verdict."""

from __future__ import annotations

import numpy as np
import torch

from forecaster.engine.engine import Engine
from forecaster.engine.shadow import PairedScore, Shadow
from forecaster.model import RecurrentForecaster


def _model(seed: int, hidden: int = 6, horizon: int = 3) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return RecurrentForecaster("gru", hidden_size=hidden, num_layers=1, horizon=horizon)


def _engine(model: RecurrentForecaster, **kwargs) -> Engine:
    return Engine(model, version="champ", window=64, capacity=4, clock=lambda: 1000.0, **kwargs)


def _stream(n_series: int, n_values: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(5.0, 20.0, n_series)
    for t in range(1, n_values + 1):
        names = [f"s{i}" for i in range(n_series)]
        values = base + np.sin(t / 3.0 + np.arange(n_series)) + rng.normal(0, 0.3, n_series)
        yield names, [t] * n_series, values


def _run(champion: Engine, shadow: Shadow | None, batches) -> list[np.ndarray]:
    got = []
    for names, ts, values in batches:
        if shadow is not None:
            shadow.before(names)
        out = champion.process(names, ts, values)
        if shadow is not None:
            shadow.observe(names, ts, values, out)
        got.append(out.forecasts.copy())
    return got


def test_the_champions_forecasts_are_the_same_with_and_without_a_shadow() -> None:
    alone = _run(_engine(_model(0)), None, _stream(5, 30))
    champion = _engine(_model(0))
    _run(champion, None, _stream(5, 10))
    shadow = Shadow(champion, _model(1, hidden=9), "chal")  # another shape: copied by window, re-warmed
    with_shadow = _run(champion, shadow, list(_stream(5, 30))[10:])
    np.testing.assert_array_equal(np.concatenate(alone[10:]), np.concatenate(with_shadow))
    assert shadow.score.count(1) == 5 * 19  # every value after the first of the shadow, at step 1
    assert shadow.unpaired_batches == 0


def test_a_challenger_identical_to_the_champion_scores_equal_and_is_never_promoted() -> None:
    champion = _engine(_model(0))
    _run(champion, None, _stream(4, 20))  # 20 values < window: the re-warm rebuilds the same state
    shadow = Shadow(champion, _model(0), "same", min_values=10, max_values=60)
    _run(champion, shadow, list(_stream(4, 40))[20:])
    for step in (1, 3):
        stats = shadow.score.stats(step)
        # Exact: the challenger's table holds the series in the champion's slot order (the same operations
        # in the same order).
        assert stats.count > 0 and stats.mean_difference == 0.0 and stats.z == 0.0
        assert stats.mae_champion == stats.mae_challenger
    decision, detail = shadow.verdict()
    assert decision == "reject" and detail["steps"][0]["count"] >= 60


def test_the_paired_score_matches_a_plain_loop_over_each_series() -> None:
    rng = np.random.default_rng(5)
    horizon = 4
    score = PairedScore(horizon, capacity=2)
    history: dict[str, list] = {}
    names = ["a", "b", "c"]
    for _ in range(12):  # batches with repeats of a series (several rounds) and slots changing hands
        rows = list(rng.choice(names, size=5))
        rows.sort(key=lambda n: 0)  # stepped order: one value per series per round
        by_round: list[str] = []
        counts: dict[str, int] = {}
        for name in rows:
            counts[name] = counts.get(name, 0) + 1
        for r in range(max(counts.values())):
            by_round += [n for n in names if counts.get(n, 0) > r]
        slots = np.array([names.index(n) for n in by_round], dtype=np.int64)
        values = rng.normal(size=len(by_round))
        champ = rng.normal(size=(len(by_round), horizon))
        chal = rng.normal(size=(len(by_round), horizon))
        score.add(slots, values, champ, chal)
        for i, name in enumerate(by_round):
            history.setdefault(name, []).append((values[i], champ[i], chal[i]))
    for step in (1, horizon):
        d, n, e_champs, e_chals = [], 0, [], []
        for rows in history.values():
            for k in range(step, len(rows)):
                v = rows[k][0]
                e_champ, e_chal = abs(v - rows[k - step][1][step - 1]), abs(v - rows[k - step][2][step - 1])
                e_champs.append(e_champ)
                e_chals.append(e_chal)
                d.append(e_champ - e_chal)
                n += 1
        stats = score.stats(step)
        assert stats.count == n
        np.testing.assert_allclose(stats.mean_difference, np.mean(d))
        np.testing.assert_allclose(stats.rmse_champion, np.sqrt(np.mean(np.square(e_champs))))
        np.testing.assert_allclose(stats.rmse_challenger, np.sqrt(np.mean(np.square(e_chals))))
        np.testing.assert_allclose(stats.z, np.mean(d) / (np.std(d, ddof=1) / np.sqrt(n)))


def test_a_slot_that_changes_hands_starts_its_history_afresh() -> None:
    score = PairedScore(horizon=1)
    one = np.ones((1, 1))
    score.add(np.array([0]), np.array([1.0]), one, one)
    score.add(np.array([0]), np.array([2.0]), one, one)
    assert score.count(1) == 1
    score.forget(np.array([0]))  # slot 0 now holds another series: not scored against the last one's
    score.add(np.array([0]), np.array([2.0]), one, one)
    assert score.count(1) == 1


def test_a_plainly_better_challenger_is_promoted_and_a_worse_one_rejected() -> None:
    champion = _engine(_model(0))
    _run(champion, None, _stream(8, 5))

    better = _model(3)
    shadow = Shadow(champion, better, "better", min_values=50, max_values=400)
    # scored by hand: the challenger's errors are half the champion's
    rng = np.random.default_rng(0)
    slots = np.arange(8)
    for _ in range(30):
        v = rng.normal(size=8)
        champ = v[:, None] + rng.normal(0, 1.0, (8, 3))
        chal = v[:, None] + rng.normal(0, 0.5, (8, 3))
        shadow.score.add(slots, v, champ, chal)
    assert shadow.verdict()[0] is None or shadow.score.count(1) >= 50
    for _ in range(60):
        v = rng.normal(size=8)
        shadow.score.add(
            slots, v, v[:, None] + rng.normal(0, 1.0, (8, 3)), v[:, None] + rng.normal(0, 0.5, (8, 3))
        )
    assert shadow.verdict()[0] == "promote"
    worse = Shadow(champion, _model(4), "worse", min_values=50, max_values=400)
    for _ in range(60):
        v = rng.normal(size=8)
        worse.score.add(
            slots, v, v[:, None] + rng.normal(0, 1.0, (8, 3)), v[:, None] + rng.normal(0, 1.05, (8, 3))
        )
        assert worse.verdict()[0] != "promote"
    assert worse.verdict()[0] == "reject"


def test_prune_forgets_series_the_champion_no_longer_holds() -> None:
    champion = _engine(_model(0))
    _run(champion, None, _stream(4, 5))
    shadow = Shadow(champion, _model(1), "chal")
    assert set(shadow.challenger.table.slots) == {"s0", "s1", "s2", "s3"}
    champion.drop(["s1", "s2"])
    assert shadow.prune() == 2 and set(shadow.challenger.table.slots) == {"s0", "s3"}
    # s1 comes back to the champion (a new series there): the challenger follows it from the champion
    shadow.before(["s1"])
    assert "s1" not in shadow.challenger.table.slots  # not in the champion yet either
    out = champion.process(["s1"], [99], [3.0])
    shadow.observe(["s1"], [99], [3.0], out)
    assert "s1" in shadow.challenger.table.slots


def test_shadow_fits_only_when_two_tables_stay_within_max_series() -> None:
    champion = _engine(_model(0))
    _run(champion, None, _stream(6, 2))
    assert Shadow.fits(champion, max_series=12) and not Shadow.fits(champion, max_series=11)


def test_batches_of_several_values_per_series_pair_up_whatever_slots_each_table_gave() -> None:
    """Within a round each engine orders its rows by its own slots: the pairing goes by input row."""
    champion = _engine(_model(0))
    _run(champion, None, _stream(3, 4))
    shadow = Shadow(champion, _model(0), "same")
    shadow.challenger.drop(["s0", "s1", "s2"])
    shadow.adopt(["s2", "s0", "s1"])  # other slots than the champion's
    rng = np.random.default_rng(1)
    for t in range(5, 45, 4):  # four values per series per batch, series interleaved
        names = [f"s{i % 3}" for i in range(12)]
        ts = [t + i // 3 for i in range(12)]
        values = rng.normal(10.0, 1.0, 12)
        shadow.before(names)
        out = champion.process(names, ts, values)
        shadow.observe(names, ts, values, out)
    assert shadow.unpaired_batches == 0
    stats = shadow.score.stats(3)
    # The same model: the same errors, paired right (a mispairing differs by a value's spread, ~1); the two
    # tables' slots differ, so float32 sums may run in another order: equal to their rounding.
    assert stats.count > 0 and abs(stats.mean_difference) < 1e-6


def test_with_coverage_both_models_intervals_are_scored_on_the_trials_values_only() -> None:
    from prometheus_client import CollectorRegistry

    from forecaster.metrics.shadow import ShadowMetrics

    champion = _engine(_model(0))
    _run(champion, None, _stream(4, 30))  # coverage the champion scored before the trial
    before = champion.coverage[champion.version].count.copy()
    shadow = Shadow(champion, _model(1), "chal", coverage=True)
    assert Shadow(champion, _model(1), "plain").coverage() == {}  # off by default: no bounds computed
    _run(champion, shadow, list(_stream(4, 60))[30:])
    both = shadow.coverage()
    assert set(both) == {"champion", "challenger"}
    champ_version, champ = both["champion"]
    chal_version, chal = both["challenger"]
    assert champ_version == "champ" and chal_version == "chal"
    total = champion.coverage[champion.version].count
    np.testing.assert_array_equal(champ.count, total - before)  # only what the trial scored
    assert (chal.count > 0).all() and (chal.inside <= chal.count).all()
    metrics = ShadowMetrics(CollectorRegistry())
    metrics.update(shadow)
    get = metrics.registry.get_sample_value
    share = get(
        "forecaster_shadow_coverage",
        {"role": "challenger", "model_version": "chal", "level": "80", "step": "h1"},
    )
    assert share == chal.inside[0, 0] / chal.count[0]
    rmse = get("forecaster_shadow_rmse", {"role": "champion", "model_version": "champ", "step": "1"})
    assert rmse == shadow.score.stats(1).rmse_champion > 0


def test_with_the_per_series_choice_both_sides_are_scored_as_served() -> None:
    """The challenger chooses like the champion: its forecasts are those an engine serving it with the same
    choice would emit (from its re-warm on), so the trial compares what each would serve."""
    from forecaster.engine.choice import Choice

    choice = Choice(halflife=8.0, min_errors=4)
    champion = _engine(_model(0), choice=choice)
    batches = list(_stream(3, 80, seed=2))
    _run(champion, None, batches[:10])
    shadow = Shadow(champion, _model(5), "challenger", min_values=10_000, max_values=20_000)
    assert shadow.challenger.choice == choice
    twin = _engine(_model(0), choice=choice)  # the same history, then the challenger swapped in
    _run(twin, None, batches[:10])
    twin.rewarm(_model(5), "challenger")
    got, want = [], []
    for names, ts, values in batches[10:]:
        shadow.before(names)
        out = champion.process(names, ts, values)
        got.append(shadow.observe(names, ts, values, out).forecasts)
        want.append(twin.process(names, ts, values).forecasts)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-6, atol=1e-6)
    raw = _engine(_model(0))
    _run(raw, None, batches[:10])
    raw.rewarm(_model(5), "challenger")
    unchosen = np.concatenate([raw.process(n, t, v).forecasts for n, t, v in batches[10:]])
    assert (np.abs(np.concatenate(got) - unchosen) > 1e-4).any()  # the choice changed some of them
