"""Publishing checkpoints: a version folder is visible only together with LATEST, a failure at any write step
(injected, and a real full tmpfs when this runs as root) leaves nothing a service would pick up, a rollback
survives a restart whose LATEST is broken, and ``forecaster train`` says "no space left" in one line."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forecaster.checkpoints.store as ck
from forecaster.checkpoints.hotswap import initial_model
from forecaster.checkpoints.store import (
    HISTORY_FILE,
    LATEST_FILE,
    chosen_versions,
    latest_version,
    list_checkpoints,
    promote,
    save_checkpoint,
)
from forecaster.cli import main
from forecaster.config import Settings
from forecaster.errors import CheckpointError
from forecaster.model import RecurrentForecaster
from forecaster.scaling import Scaling

ROOT = Path(__file__).resolve().parents[2]
SCALING = Scaling(halflife=12.0)
SHAPE = {"hidden_size": 6, "num_layers": 1, "horizon": 3}


def model_of(seed: int, hidden_size: int = 6) -> RecurrentForecaster:
    torch.manual_seed(seed)
    return RecurrentForecaster("gru", **{**SHAPE, "hidden_size": hidden_size})


def settings_for(root: Path) -> Settings:
    return Settings(model={**SHAPE, "seed": 7}, scaling=SCALING.settings, checkpoints={"dir": root})


def served(root: Path) -> str:
    """The version a service starting now would serve."""
    return initial_model(settings_for(root), "cpu")[1]


def break_folder(path: Path) -> None:
    (path / ck.WEIGHTS_FILE).write_bytes(b"not weights")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """What a starting service reads: the visible entries and the pointer files' bytes."""
    return {
        "entries": "\n".join(sorted(p.name for p in root.iterdir())).encode(),
        "latest": (root / LATEST_FILE).read_bytes() if (root / LATEST_FILE).exists() else None,
        "history": (root / HISTORY_FILE).read_bytes() if (root / HISTORY_FILE).exists() else None,
    }


# ---- publish and history ----------------------------------------------------------------------------


def test_publish_shows_the_folder_with_latest_and_records_it_in_history(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True)
    second = save_checkpoint(tmp_path, model_of(2), SCALING, publish=True)
    assert latest_version(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, second, LATEST_FILE, HISTORY_FILE])
    promote(tmp_path, first)  # a rollback
    assert chosen_versions(tmp_path) == [first, second]
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [first, second, first]
    assert [line.split("\t")[2] for line in lines] == ["publish", "publish", "promote"]


def test_a_rollback_survives_a_restart_whose_latest_is_broken(tmp_path: Path) -> None:
    v0 = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True)
    v1 = save_checkpoint(tmp_path, model_of(2), SCALING, publish=True)  # promote V1 ...
    promote(tmp_path, v0)  # ... roll back to V0
    v2 = save_checkpoint(tmp_path, model_of(3), SCALING)
    break_folder(tmp_path / v2)
    (tmp_path / LATEST_FILE).write_text(v2 + "\n")  # LATEST names a broken version
    assert served(tmp_path) == v0 != v1  # not the newest valid folder: the one last chosen
    (tmp_path / LATEST_FILE).write_text("garbage/../\n")  # or LATEST itself is garbage
    assert served(tmp_path) == v0
    (tmp_path / LATEST_FILE).unlink()
    assert served(tmp_path) == v0


def test_a_rollback_survives_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    v0 = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True)
    v1 = save_checkpoint(tmp_path, model_of(2), SCALING, publish=True)
    monkeypatch.setenv("FORECASTER_CHECKPOINTS__DIR", str(tmp_path))
    assert main(["checkpoints", "promote", v0]) == 0
    assert main(["checkpoints", "promote", v1]) == 0
    assert main(["checkpoints", "promote", v0]) == 0
    break_folder(tmp_path / v0)  # what LATEST names breaks: the choice before it serves
    assert served(tmp_path) == v1
    capsys.readouterr()
    assert main(["checkpoints", "history"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == [v0, v1, v0, v1, v0]


def test_a_folder_without_history_starts_one_from_latest(tmp_path: Path) -> None:
    old = save_checkpoint(tmp_path, model_of(1), SCALING)
    (tmp_path / LATEST_FILE).write_text(old + "\n")  # as written before HISTORY existed
    newest = save_checkpoint(tmp_path, model_of(2), SCALING)
    assert chosen_versions(tmp_path) is None
    break_folder(tmp_path / old)
    assert served(tmp_path) == newest  # no HISTORY: the newest valid one stands in, as before
    (tmp_path / old / ck.WEIGHTS_FILE).unlink()
    old2 = save_checkpoint(tmp_path, model_of(4), SCALING)
    (tmp_path / LATEST_FILE).write_text(old2 + "\n")
    promote(tmp_path, newest)
    assert chosen_versions(tmp_path) == [newest, old2]  # the LATEST found first, then the promotion
    break_folder(tmp_path / newest)
    assert served(tmp_path) == old2


def test_an_unpublished_folder_is_never_served_once_there_is_a_history(tmp_path: Path) -> None:
    chosen = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True)
    save_checkpoint(tmp_path, model_of(2), SCALING)  # complete, never published
    (tmp_path / LATEST_FILE).write_text("broken\n")
    assert served(tmp_path) == chosen


def test_abandoned_staging_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / f".staging-20260101T000000000Z-abcdef-{pid}" / "x").mkdir(parents=True)
    (tmp_path / f".LATEST.tmp-{pid}").write_text("x")
    alive = tmp_path / f".staging-20260101T000000000Z-abcdef-{os.getppid()}"
    alive.mkdir()
    version = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, version, LATEST_FILE, HISTORY_FILE]
    )
    assert [i.version for i in list_checkpoints(tmp_path)] == [version]  # dot names are never versions


# ---- a failure at every write step ------------------------------------------------------------------


class FailAt:
    """Every write the store makes (files opened for writing, folders, renames, links) counted; the
    ``at``-th raises ENOSPC as the system call would."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.failed_on = at, 0, None

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch):
        real = {"replace": os.replace, "link": os.link, "mkdir": Path.mkdir, "write": open}

        def counted(name):
            def call(*args, **kwargs):
                self.calls += 1
                if self.calls == self.at:
                    self.failed_on = f"{name} {args[0]}"
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real[name](*args, **kwargs)

            return call

        with monkeypatch.context() as patch:
            patch.setattr(ck.os, "replace", counted("replace"))
            patch.setattr(ck.os, "link", counted("link"))
            patch.setattr(Path, "mkdir", counted("mkdir"))
            patch.setattr(ck, "open", counted("write"), raising=False)  # the store's own open()
            yield


@pytest.mark.parametrize("first", ["publish", "none"])
def test_a_failure_at_any_write_step_leaves_nothing_a_service_picks_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    before = save_checkpoint(tmp_path, model_of(1), SCALING, publish=True) if first == "publish" else None
    failed_on = []
    for at in range(1, 30):
        state = snapshot(tmp_path) if tmp_path.exists() else None
        fail = FailAt(at)
        with fail.installed(monkeypatch):
            try:
                version = save_checkpoint(tmp_path, model_of(2), SCALING, publish=True)
            except CheckpointError as exc:
                assert "No space left on device" in str(exc) and "nothing was published" in str(exc)
                failed_on.append(fail.failed_on)
            else:
                break
        assert state is None or snapshot(tmp_path) == state, f"failing {fail.failed_on} changed the folder"
        assert served(tmp_path) == (before or "init")
        assert [i.version for i in list_checkpoints(tmp_path)] == ([before] if before else [])
    else:
        pytest.fail("publish never succeeded")
    steps = {step.split()[0] for step in failed_on}
    assert steps == {"mkdir", "write", "replace"} | ({"link"} if before else set()), failed_on
    assert len(failed_on) >= (9 if before else 8)
    assert served(tmp_path) == version == latest_version(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- a real full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 512 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_full_disk_at_any_point_leaves_nothing_a_service_picks_up(small_disk: Path) -> None:
    root = small_disk / "checkpoints"
    before = save_checkpoint(root, model_of(1), SCALING, publish=True)
    failures = 0
    for pages in range(0, 64):
        fill(small_disk, pages * 4096)
        state = snapshot(root)
        try:
            version = save_checkpoint(root, model_of(2, hidden_size=24), SCALING, publish=True)
        except CheckpointError as exc:
            assert "No space left on device" in str(exc), exc
            failures += 1
            assert snapshot(root) == state
            assert served(root) == before and latest_version(root) == before
            assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
            continue
        break
    else:
        pytest.fail("publish never succeeded")
    assert failures >= 3  # the disk was full at more than one step of the write
    assert served(root) == version == latest_version(root)


def test_train_says_no_space_left_in_one_line(small_disk: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    rows = ["series,ts,value"] + [
        f"s{i % 2},{1_700_000_000_000 + 60_000 * (i // 2)},{i % 7}" for i in range(200)
    ]
    data.write_text("\n".join(rows) + "\n")
    root = small_disk / "checkpoints"
    root.mkdir()
    fill(small_disk, 0)
    env = {
        **os.environ,
        "FORECASTER_CHECKPOINTS__DIR": str(root),
        "FORECASTER_MODEL__HIDDEN_SIZE": "4",
        "FORECASTER_MODEL__NUM_LAYERS": "1",
        "FORECASTER_MODEL__HORIZON": "2",
        "FORECASTER_LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "forecaster", "train", "--input", str(data), "--epochs", "1", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("forecaster train: ") and "No space left on device" in lines[0]
    assert sorted(p.name for p in root.iterdir()) == []
