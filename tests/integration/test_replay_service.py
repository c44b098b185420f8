"""``forecaster replay`` of a file equals what ``forecaster serve`` emits for the same file's values.

The same checkpoint is published for both; the file goes to the input topic through ``forecaster produce
--file`` (real processes all the way) and through ``forecaster replay`` with no broker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from forecaster.checkpoints.store import promote, save_checkpoint
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]
START_MS = 1_700_000_000_000


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "forecaster", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_replay_equals_the_service_forecasts(topics, serve, broker, tmp_path: Path) -> None:
    # A trained-looking checkpoint (random weights, the service's model shape), published.
    torch.manual_seed(4)
    shape = topics.settings().model.model_dump(exclude={"seed"})
    model = RecurrentForecaster(**shape)
    version = save_checkpoint(tmp_path / "checkpoints", model, Scaling())
    promote(tmp_path / "checkpoints", version)
    # A file with rows out of time order, a duplicate timestamp and a bad value: both paths skip alike.
    frame = generate(n_series=5, n_values=40, start_ms=START_MS, step_ms=60_000, seed=11)
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    extra = pd.DataFrame(
        {"series": ["series-0", "series-1"], "ts": [START_MS + 60_000, START_MS], "value": [1e6, "x"]}
    )
    data = tmp_path / "data.csv"
    pd.concat([frame, extra], ignore_index=True).to_csv(data, index=False)

    service = serve().start()
    run_cli(service.env, "produce", "--file", str(data), "--no-progress")
    served = [r.json() for r in broker.read(topics.output, count=len(frame), timeout=60)]
    assert service.terminate() == 0

    output = tmp_path / "forecasts.csv"
    replayed = run_cli(service.env, "replay", "--input", str(data), "--output", str(output), "--no-progress")
    assert "dropped 1 duplicate" in replayed.stderr and "skipped 1 bad rows" in replayed.stderr
    mine = pd.read_csv(output)
    assert len(mine) == len(served) == len(frame)
    assert set(mine["model_version"]) == {b["model_version"] for b in served} == {version}
    theirs = {(b["series"], b["ts"]): b["forecast"] for b in served}
    assert set(theirs) == set(zip(mine["series"], mine["ts"], strict=True))
    columns = [f"h{k + 1}" for k in range(model.horizon)]
    expected = np.array([theirs[key] for key in zip(mine["series"], mine["ts"], strict=True)])
    np.testing.assert_allclose(mine[columns].to_numpy(), expected, rtol=0, atol=1e-5)
    # The duplicate's value (1e6) was stepped by neither: forecasts stay on the series' scale.
    assert np.abs(mine[columns].to_numpy()).max() < 1e4
