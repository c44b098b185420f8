"""Checkpoints: atomic writes, LATEST, the one loader and every way a file can be refused."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest
import torch
from checkpoint_faults import (
    CORRUPTIONS,
    CodeRunningPayload,
    _manifest,
    _replace_weights,
    _saved_state,
    _torch_bytes,
    _write_manifest,
    missing_manifest,
    nan_weights,
)

from forecaster.checkpoints import store as ck
from forecaster.checkpoints.store import (
    LATEST_FILE,
    MANIFEST_FILE,
    VERSION_PATTERN,
    WEIGHTS_FILE,
    latest_version,
    list_checkpoints,
    load_checkpoint,
    promote,
    save_checkpoint,
)
from forecaster.errors import CheckpointError, ForecasterError
from forecaster.model import CELLS, RecurrentForecaster
from forecaster.scaling import Scaling


def tiny_model(cell: str = "gru", seed: int = 0, **kwargs) -> RecurrentForecaster:
    torch.manual_seed(seed)
    options = dict(hidden_size=6, num_layers=2, horizon=3)
    options.update(kwargs)
    return RecurrentForecaster(cell, **options).eval()


# ---- ways to spoil a saved checkpoint: each takes the checkpoint folder ------------------------------


def saved(root: Path, cell: str = "gru", **kwargs) -> tuple[str, RecurrentForecaster]:
    model = tiny_model(cell, **kwargs)
    return save_checkpoint(
        root, model, Scaling(halflife=12.0), data={"kind": "test"}, metrics={"mae": 1.5}
    ), model


# ---- writing and loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_round_trip_gives_the_same_forecasts(tmp_path: Path, cell: str) -> None:
    version, model = saved(tmp_path, cell)
    loaded = load_checkpoint(tmp_path / version)
    x = torch.randn(3, 7, 1)
    assert loaded.version == version
    assert loaded.model.config == model.config
    assert torch.equal(loaded.model(x)[0], model(x)[0])
    assert loaded.scaling == Scaling(halflife=12.0)
    assert not loaded.model.training


def test_manifest_is_complete(tmp_path: Path) -> None:
    version, model = saved(tmp_path)
    manifest = _manifest(tmp_path / version)
    weights = (tmp_path / version / WEIGHTS_FILE).read_bytes()
    assert manifest["format_version"] == ck.FORMAT_VERSION
    assert manifest["version"] == version
    assert manifest["model"] == model.config.model_dump()
    assert manifest["scaling"] == Scaling(halflife=12.0).settings
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["weights"]["bytes"] == len(weights)
    assert manifest["data"] == {"kind": "test"} and manifest["metrics"] == {"mae": 1.5}
    assert manifest["parent"] is None
    assert re.match(r"^\d{4}-\d\d-\d\dT", manifest["created_at"])


def test_versions_are_unique_and_sort_by_creation(tmp_path: Path) -> None:
    versions = [saved(tmp_path)[0] for _ in range(5)]
    assert len(set(versions)) == 5
    assert all(VERSION_PATTERN.match(v) for v in versions)
    created = [_manifest(tmp_path / v)["created_at"] for v in sorted(versions)]
    assert created == sorted(created)


def test_save_does_not_touch_latest_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    version, _ = saved(tmp_path)
    assert latest_version(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [version]
    assert sorted(p.name for p in (tmp_path / version).iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ck._write_file

    def failing(path: Path, data: bytes) -> None:
        if path.name == MANIFEST_FILE:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ck, "_write_file", failing)
    with pytest.raises(OSError):
        saved(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_promote_points_latest_and_rolls_back(tmp_path: Path) -> None:
    first, _ = saved(tmp_path)
    second, _ = saved(tmp_path, seed=1)
    promote(tmp_path, first)
    assert latest_version(tmp_path) == first
    promote(tmp_path, second)
    assert load_checkpoint(tmp_path).version == second  # a checkpoint root loads what LATEST names
    promote(tmp_path, first)
    assert latest_version(tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_promote_refuses_unknown_and_bad_versions(tmp_path: Path) -> None:
    good, _ = saved(tmp_path)
    bad, _ = saved(tmp_path, seed=1)
    nan_weights(tmp_path / bad)
    promote(tmp_path, good)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        promote(tmp_path, "20990101T000000000Z-abcdef")
    with pytest.raises(CheckpointError, match="NaN"):
        promote(tmp_path, bad)
    with pytest.raises(CheckpointError, match="not a valid"):
        promote(tmp_path, "../elsewhere")
    assert latest_version(tmp_path) == good


def test_latest_naming_a_path_outside_is_refused(tmp_path: Path) -> None:
    (tmp_path / LATEST_FILE).write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="not a valid"):
        latest_version(tmp_path)


def test_list_shows_every_checkpoint_and_marks_latest(tmp_path: Path) -> None:
    first, _ = saved(tmp_path)
    second, _ = saved(tmp_path, seed=1)
    missing_manifest(tmp_path / first)
    promote(tmp_path, second)
    infos = list_checkpoints(tmp_path)
    assert [i.version for i in infos] == sorted([first, second])
    by_version = {i.version: i for i in infos}
    assert by_version[second].latest and not by_version[first].latest
    assert by_version[first].problem and "manifest" in by_version[first].problem
    assert by_version[second].manifest["metrics"] == {"mae": 1.5}
    assert list_checkpoints(tmp_path / "nothing-here") == []


# ---- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_spoiled_checkpoint_is_refused_with_a_reason(tmp_path: Path, name: str) -> None:
    version, _ = saved(tmp_path)
    spoil, words = CORRUPTIONS[name]
    spoil(tmp_path / version)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path / version)
    assert isinstance(raised.value, ForecasterError)
    assert words in str(raised.value)


@pytest.mark.parametrize("wrap", ["torch zip", "bare pickle"])
def test_a_pickle_payload_never_runs(tmp_path: Path, wrap: str) -> None:
    version, _ = saved(tmp_path)
    marker = tmp_path / "payload-ran"
    state = dict(_saved_state(tmp_path / version))
    state["head.bias"] = CodeRunningPayload(marker)
    data = _torch_bytes(state) if wrap == "torch zip" else pickle.dumps(state, protocol=2)
    # The payload is real: plain unpickling runs it (checked on a different marker).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CodeRunningPayload(probe)))
    assert probe.exists()
    _replace_weights(tmp_path / version, data)  # with a matching hash: only weights_only stands in the way
    with pytest.raises(CheckpointError, match="cannot be read as tensors"):
        load_checkpoint(tmp_path / version)
    assert not marker.exists()


def test_loading_onto_a_device_keeps_the_checks(tmp_path: Path) -> None:
    version, _ = saved(tmp_path, "lstm")
    loaded = load_checkpoint(tmp_path / version, device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert loaded.model.cell == "lstm"


# ---- models that forecast over a seasonal baseline ----------------------------------------------------------


def test_a_residual_model_round_trips(tmp_path: Path) -> None:
    version, model = saved(tmp_path, season=4, base_seasons=2)
    with torch.no_grad():
        model.head.bias.fill_(0.5)
    version = save_checkpoint(tmp_path, model, Scaling(halflife=12.0))
    loaded = load_checkpoint(tmp_path / version)
    assert (loaded.model.season, loaded.model.base_seasons) == (4, 2)
    x = torch.randn(2, 9, 1)
    assert torch.equal(loaded.model(x)[0], model(x)[0])


def test_a_manifest_from_before_the_baseline_loads_as_a_plain_model(tmp_path: Path) -> None:
    version, model = saved(tmp_path)
    manifest = _manifest(tmp_path / version)
    for name in ("season", "base_seasons"):
        del manifest["model"][name]
    _write_manifest(tmp_path / version, manifest)
    loaded = load_checkpoint(tmp_path / version)
    assert (loaded.model.season, loaded.model.base_seasons, loaded.model.context) == (1, 0, 0)
    x = torch.randn(2, 5, 1)
    assert torch.equal(loaded.model(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("season", 0, "season=0"),
        ("base_seasons", -1, "base_seasons=-1"),
        ("base_seasons", 99, "base_seasons=99"),
        ("season", "12", "season='12'"),
        ("colour", "red", "model.colour='red': Extra inputs are not permitted"),
    ],
)
def test_bad_baseline_build_args_are_refused(tmp_path: Path, field: str, value, words: str) -> None:
    version, _ = saved(tmp_path)
    manifest = _manifest(tmp_path / version)
    manifest["model"][field] = value
    _write_manifest(tmp_path / version, manifest)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        load_checkpoint(tmp_path / version)
