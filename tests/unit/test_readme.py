"""README's Python quickstart runs as written, and says what it does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_quickstart_runs_and_its_comments_hold() -> None:
    (block,) = python_blocks()
    names: dict = {}
    exec(compile(block, str(README), "exec"), names)  # noqa: S102  (the project's own README)
    out, engine, model = names["out"], names["engine"], names["model"]
    assert out.series == ["s1", "s2", "s1"] and out.forecasts.shape == (3, 12)
    # "1: not newer than s1's last ts, not stepped": the block made that call once; again, still one.
    assert engine.process(["s1"], [2000], [9.9]).duplicates == 1
    # "the full-sequence pass: equal to the engine's rows for s1" (float32 steps in another order: 1e-5)
    full = names["reference_forecast"](model, [21.5, 21.7])
    np.testing.assert_allclose(out.forecasts[[0, 2]], full, rtol=1e-5, atol=1e-5)
