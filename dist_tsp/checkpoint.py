"""Checkpoint files: written atomically (temporary name, then rename), read with a clear error."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_tsp.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or not ours."""


def save_atomic(payload: Any, path: Path) -> None:
    """torch.save to `path` so that a reader sees either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path, what: str) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; any failure becomes one line naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {path} does not exist: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"{what} checkpoint {path} cannot be read ({type(error).__name__}): "
                              "it is truncated or not a dist-tsp checkpoint; delete it or point to another") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{what} checkpoint {path} has no 'model' entry: not a dist-tsp checkpoint")
    return payload


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """load_state_dict with a one-line error when the architecture does not match."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{what} checkpoint {path} does not fit the configured model: {first}") from None


def rng_state() -> dict[str, Any]:
    """Every random number generator the run uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
