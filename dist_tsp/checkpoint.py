"""Checkpoint files: written atomically (temporary name, then rename), read with a clear error."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
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


MANIFEST = "manifest.json"


def step_dir(output_dir: Path, step: int, *, partial: bool = False) -> Path:
    """checkpoints/step_NNNNNNNN (complete) or .../step_NNNNNNNN.partial (being written)."""
    return output_dir / "checkpoints" / (f"step_{step:08d}" + (".partial" if partial else ""))


def student_file(directory: Path, name: str) -> Path:
    return directory / "students" / f"{name}.pt"


def rng_file(directory: Path, name: str, replica: int) -> Path:
    return directory / "rng" / f"{name}.replica{replica}.pt"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories whose manifest was written (the last thing written), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if d.is_dir() and (d / MANIFEST).is_file())


def finalize(directory: Path, manifest: dict[str, Any], keep_last: int) -> Path:
    """Main process, once every rank has written its files: manifest, atomic rename, pruning."""
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)
    final = directory.with_name(directory.name.removesuffix(".partial"))
    os.replace(directory, final)
    step_checkpoints = [d for d in complete_checkpoints(final.parent.parent) if not read_manifest(d)["epoch_end"]]
    for old in step_checkpoints[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint manifest {directory / MANIFEST} cannot be read ({error}): "
                              f"delete {directory} to resume from the one before") from None


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Human-readable `key: old -> new` lines between two JSON-like trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(saved.keys() | current.keys())
                for line in differences(saved.get(key), current.get(key), f"{where}.{key}" if where else key)]
    return [] if saved == current else [f"{where}: {saved!r} -> {current!r}"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
