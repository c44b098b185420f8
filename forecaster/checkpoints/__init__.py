"""Versioned checkpoints (weights + manifest), the one loader with its checks, and the hot swap."""

from forecaster.checkpoints.hotswap import ModelSwapper, initial_model
from forecaster.checkpoints.store import (
    CheckpointInfo,
    LoadedCheckpoint,
    latest_version,
    list_checkpoints,
    load_checkpoint,
    promote,
    save_checkpoint,
)

__all__ = [
    "CheckpointInfo",
    "LoadedCheckpoint",
    "ModelSwapper",
    "initial_model",
    "latest_version",
    "list_checkpoints",
    "load_checkpoint",
    "promote",
    "save_checkpoint",
]
