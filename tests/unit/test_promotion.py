"""Shadow promotion in the checkpoint folder: CANDIDATE, decisions in the manifest, the trainer proposing,
the CLI deciding by hand, the swapper handing a candidate over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from forecaster.checkpoints import ModelSwapper
from forecaster.checkpoints.promotion import candidate_version, decide, decision_of, propose
from forecaster.checkpoints.store import latest_version, load_checkpoint, promote, save_checkpoint
from forecaster.cli import main
from forecaster.errors import CheckpointError
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling
from forecaster.tools.synthetic import SeriesShape, generate


def synthetic_csv(path: Path, n_series: int, n_values: int) -> Path:
    generate(n_series, n_values, seed=1, shape=SeriesShape(noise=2.0, shift_probability=0.0)).to_csv(
        path, index=False
    )
    return path


def _save(root: Path, seed: int = 0) -> str:
    import torch

    torch.manual_seed(seed)
    return save_checkpoint(
        root, RecurrentForecaster("gru", hidden_size=4, num_layers=1, horizon=2), Scaling()
    )


def test_a_promoted_candidate_is_published_and_the_decision_kept_in_its_manifest(tmp_path: Path) -> None:
    champion, challenger = _save(tmp_path, 0), _save(tmp_path, 1)
    promote(tmp_path, champion)
    propose(tmp_path, challenger)
    assert candidate_version(tmp_path) == challenger and decision_of(tmp_path, challenger) is None
    record = decide(tmp_path, challenger, "promoted", by="shadow", detail={"steps": [{"step": 1, "z": 4.2}]})
    assert latest_version(tmp_path) == challenger and candidate_version(tmp_path) is None
    manifest = json.loads((tmp_path / challenger / "manifest.json").read_text())
    assert manifest["promotion"] == record
    assert (
        record["champion"] == champion
        and record["by"] == "shadow"
        and record["detail"]["steps"][0]["z"] == 4.2
    )
    assert load_checkpoint(tmp_path / challenger).version == challenger  # still loads, checksum intact


def test_the_first_shadow_decision_stands_and_a_hand_decision_replaces_it(tmp_path: Path) -> None:
    champion, challenger = _save(tmp_path, 0), _save(tmp_path, 1)
    promote(tmp_path, champion)
    propose(tmp_path, challenger)
    decide(tmp_path, challenger, "rejected", by="shadow")
    again = decide(tmp_path, challenger, "promoted", by="shadow")  # another instance, later
    assert again["decision"] == "rejected" and latest_version(tmp_path) == champion
    decide(tmp_path, challenger, "promoted", by="hand")
    assert decision_of(tmp_path, challenger)["by"] == "hand" and latest_version(tmp_path) == challenger


def test_bad_names_and_decisions_are_refused(tmp_path: Path) -> None:
    version = _save(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        propose(tmp_path, "20990101T000000000Z-000000")
    with pytest.raises(CheckpointError, match="not a valid"):
        propose(tmp_path, "../x")
    with pytest.raises(CheckpointError, match="decision"):
        decide(tmp_path, version, "maybe", by="hand")  # type: ignore[arg-type]
    (tmp_path / "CANDIDATE").write_text("../../etc\n")
    with pytest.raises(CheckpointError):
        candidate_version(tmp_path)


def test_the_swapper_hands_over_an_undecided_candidate_once(tmp_path: Path) -> None:
    champion, challenger = _save(tmp_path, 0), _save(tmp_path, 1)
    promote(tmp_path, champion)
    swapper = ModelSwapper(tmp_path, champion, registry=CollectorRegistry(), promotion="shadow")
    swapper.check_now()
    assert swapper.challenger_if_ready() is None  # nothing proposed
    propose(tmp_path, challenger)
    swapper.check_now()
    loaded = swapper.challenger_if_ready()
    assert loaded is not None and loaded.version == challenger and swapper.on_trial == challenger
    swapper.check_now()
    assert swapper.challenger_if_ready() is None  # on trial: not handed again
    swapper.trial_ended(challenger, refused=True)
    swapper.check_now()
    assert swapper.challenger_if_ready() is None  # ended here: not tried again
    decided = _save(tmp_path, 2)
    decide(tmp_path, decided, "rejected", by="hand")
    propose(tmp_path, decided)
    fresh = ModelSwapper(tmp_path, champion, registry=CollectorRegistry(), promotion="shadow")
    fresh.check_now()
    assert fresh.challenger_if_ready() is None  # decided before: never on trial
    immediate = ModelSwapper(tmp_path, champion, registry=CollectorRegistry())
    propose(tmp_path, _save(tmp_path, 3))
    immediate.check_now()
    assert immediate.challenger_if_ready() is None  # immediate promotion ignores CANDIDATE


def _env(monkeypatch: pytest.MonkeyPatch, root: Path, promotion: str) -> None:
    for name, value in {
        "CHECKPOINTS__DIR": root,
        "CHECKPOINTS__PROMOTION": promotion,
        "MODEL__HIDDEN_SIZE": 4,
        "MODEL__NUM_LAYERS": 1,
        "MODEL__HORIZON": 2,
    }.items():
        monkeypatch.setenv(f"FORECASTER_{name}", str(value))


def test_in_shadow_the_trainer_proposes_and_the_cli_decides_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    data = synthetic_csv(tmp_path / "data.csv", n_series=2, n_values=120)
    root = tmp_path / "ck"
    _env(monkeypatch, root, "shadow")
    train = ["train", "--input", str(data), "--epochs", "1", "--no-progress", "--always-publish"]
    assert main(train) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["proposed"] is False and latest_version(root) == first["published"]  # no champion yet
    assert main(train) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["proposed"] is True and candidate_version(root) == second["published"]
    assert latest_version(root) == first["published"]  # the champion still serves
    assert main(["checkpoints", "candidate"]) == 0
    assert json.loads(capsys.readouterr().out) == {"candidate": second["published"], "decision": None}
    assert main(["checkpoints", "reject", first["published"]]) == 1  # the champion: refused
    assert main(["checkpoints", "reject", second["published"]]) == 0
    assert (
        candidate_version(root) is None and decision_of(root, second["published"])["decision"] == "rejected"
    )
    capsys.readouterr()
    assert main(["checkpoints", "list"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if second["published"] in line]
    assert rows and "rejected" in rows[0]
    assert main(["checkpoints", "promote", second["published"]]) == 0  # a change of mind, by hand
    assert latest_version(root) == second["published"]
    assert decision_of(root, second["published"])["decision"] == "promoted"
