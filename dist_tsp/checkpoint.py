"""Checkpoint files: written atomically (temporary name, then rename), read with weights_only=True (nothing in a
file runs) and a one-line error."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import psutil
import torch

from dist_tsp.config import RunConfig
from dist_tsp.errors import OutOfSpace, UserError, not_a_file, space_ran_out


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or not ours."""


# the fix where ranks see different output_dirs: each writes its own files of every checkpoint there
SHARED_OUTPUT_DIR = "output_dir must be one directory every node sees, on a shared filesystem"


def check_writable(folder: Path, what: str) -> None:
    """`folder` must be a directory this process can write into, or creatable (`what` names the setting that chose
    it). A folder to be made is tried by making one beside it, as the permission bits do not tell root (a read-only
    or special file system); one that exists is not written to here (a refused run leaves it as it was)."""
    try:
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    except OSError as error:  # a folder on the way this user may not enter
        raise UserError(f"{what}: {error.filename} cannot be reached ({error.strerror}); choose a path you can "
                        "write") from None
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a directory; choose another path")
    why = None
    if existing != folder.absolute():
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dist-tsp-", dir=existing))
        except OSError as error:
            why = error.strerror
    elif os.statvfs(existing).f_flag & os.ST_RDONLY:
        why = os.strerror(errno.EROFS)
    if why or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {existing} is not writable{f' ({why})' if why else ''}; choose a path you can "
                        "write")


def write_atomic(path: Path, write: Callable[[BinaryIO], Any], *, replace: bool = True) -> bool:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`: a reader sees the old
    file or the complete new one, and concurrent writers (other processes, other nodes) never clash. With
    `replace=False` a file already at `path` (another process's) is kept, and False returned."""
    with written_into(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(path)
        tmp = _temporary(path, os.getpid())
        try:
            with open(tmp, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:  # a writer that fails (or is interrupted) leaves no partial file behind
            with contextlib.suppress(OSError):  # where it could not be written (read-only), its own error is said
                tmp.unlink(missing_ok=True)
            raise
        if not replace:
            try:
                os.link(tmp, path)  # unlike a rename, fails where a file is there already
            except FileExistsError:
                tmp.unlink()
                return False
            except OSError:  # a file system without hard links: renamed below, as when replacing
                pass
            else:
                tmp.unlink()
                return True
        os.replace(tmp, path)
        return True


@contextlib.contextmanager
def written_into(directory: Path, then: str = "rerun the same command to resume from the last complete checkpoint"
                 ) -> Iterator[None]:
    """A write into `directory` that fails for lack of space (or quota) raises OutOfSpace, naming the file system
    and what to do `then`: one line that every rank says alike, whichever of its folders each was writing."""
    try:
        yield
    except Exception as error:
        if full := space_ran_out(error):
            raise OutOfSpace(f"no room left on the file system at {_mount_point(directory)} ({full.strerror}): free "
                             f"space there (or raise this user's quota), then {then}") from error
        raise


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds (or would hold) `path`."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{pid}.tmp")


def remove_orphaned_temporaries(path: Path) -> None:
    """Remove the temporary files of `path` that writers on this host left when they were killed (SIGKILL, out of
    memory): a preempted epoch of ImageNet's logit cache leaves gigabytes."""
    prefix = _temporary(path, 0).name.removesuffix("0.tmp")
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name.removeprefix(prefix).removesuffix(".tmp")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def try_lock(file: int | BinaryIO) -> bool:
    """Take the exclusive lock of `file` (an open file or folder) unless another process holds it. On a file system
    without locks (Lustre mounted without `flock`) every caller goes ahead, as if alone."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no locks here
        pass
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (see write_atomic)."""
    write_atomic(path, lambda file: file.write(text.encode()))


def save_atomic(payload: Any, path: Path, *, replace: bool = True) -> bool:
    """torch.save to `path` atomically (see write_atomic, also for `replace`)."""
    return write_atomic(path, lambda file: torch.save(payload, file), replace=replace)


# What RNG files written before issue 13 hold besides tensors and plain containers: numpy's random state, a
# uint32 numpy array (rebuilt by numpy.core... in numpy 1, numpy._core... in numpy 2). Allowed only while reading.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
OLD_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                   *((_RECONSTRUCT, f"{package}.multiarray._reconstruct") for package in ("numpy.core", "numpy._core"))]


def read(path: Path, what: str, fix: str | None = None) -> Any:
    """torch.load on the CPU with weights_only=True: tensors and plain containers only, nothing in the file runs.
    Any failure becomes one line naming the file (`what` names its role, e.g. "teacher checkpoint") and, for one
    that is missing or damaged, the `fix` (default: for a file the user gave)."""
    require_file(path, what, fix)
    with torch.serialization.safe_globals(OLD_RNG_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except PermissionError as error:  # intact, another user's: deleting it would lose it
            raise CheckpointError(f"{what} {path} cannot be opened ({error.strerror}): give this user read access "
                                  "to it") from None
        except Exception as error:  # torch raises many types for a damaged file
            if unsafe := _unsafe_globals(path):
                raise CheckpointError(
                    f"{what} {path} holds objects other than tensors and plain containers ({', '.join(unsafe[:3])}), "
                    "so it was not loaded and none of its code ran: if you trust it, re-save it as a plain state "
                    "dict, torch.save({'model': model.state_dict()}, path)") from None
            raise CheckpointError(f"{what} {path} cannot be read ({type(error).__name__}): it is truncated or not a "
                                  "dist-tsp checkpoint; " + (fix or "point to another file (or delete it, if it is a "
                                                                    "damaged checkpoint of this run)")) from None


def require_file(path: Path, what: str, fix: str | None = None) -> None:
    """One line naming `path` (`what` is its role) and the `fix` (default: for a file the user gave) when it is no
    file."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} {not_a_file(path)}: {fix or 'check the path'}")


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a torch.save file would import that weights_only refuses (read, never run)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save zip file: nothing to list
        return []


def load(path: Path, what: str) -> dict[str, Any]:
    """Load a checkpoint dict safely (see read) and check it has its 'model' entry."""
    payload = read(path, f"{what} checkpoint")
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{what} checkpoint {path} has no 'model' entry: not a dist-tsp checkpoint")
    return payload


def load_weights(model: torch.nn.Module, state: Any, path: Path, what: str,
                 fix: str = "point to another file") -> None:
    """load_state_dict with a one-line error when the entry is no state dict, does not fit the architecture, or holds
    NaN or infinite values (which would stop the run at its first log step as a non-finite loss); `fix` for the
    last."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} checkpoint {path} holds a {type(state).__name__} under 'model', not a state "
                              "dict: save it as torch.save({'model': model.state_dict()}, path)")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        problems = textwrap.shorten(str(error), 300, placeholder=" ...")
        raise CheckpointError(f"{what} checkpoint {path} does not fit the configured model: {problems}") from None
    parameters = dict(model.named_parameters())  # a buffer may hold infinities by design (a mask), never NaN
    if diverged := [name for name, value in state.items() if torch.is_tensor(value) and value.is_floating_point()
                    and (value.isnan().any() or name in parameters and not value.isfinite().all())]:
        more = f" and {len(diverged) - 1} more" if len(diverged) > 1 else ""
        raise CheckpointError(f"{what} checkpoint {path} holds NaN or infinite values ({diverged[0]}{more}): the "
                              f"training that wrote it diverged; {fix}")


def rng_state() -> dict[str, Any]:
    """Every random number generator the run uses, as tensors and plain containers (weights_only-safe)."""
    name, key, *position = np.random.get_state()  # key: an array of 624 uint32, kept as an int64 tensor
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), *position),
             "torch": torch.get_rng_state()}
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


def file_roles(directory: Path, cfg: RunConfig, replicas: int) -> dict[Path, str]:
    """Every file the ranks write into the checkpoint in `directory`, with its role as errors name it: each learning
    student's model, optimizer and schedule, and every student's random state on each of its `replicas`."""
    roles = {}
    for student in cfg.students:
        if not student.frozen:
            roles[student_file(directory, student.name)] = f"student {student.name} checkpoint"
        for replica in range(replicas):
            roles[rng_file(directory, student.name, replica)] = f"student {student.name} RNG checkpoint"
    return roles


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories whose manifest was written (the last thing written), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if is_complete(d))


def is_complete(directory: Path) -> bool:
    """Whether the checkpoint directory's manifest, the last thing written into it, is there."""
    return directory.is_dir() and (directory / MANIFEST).is_file()


def finalize(directory: Path, manifest: dict[str, Any], keep_last: int) -> Path:
    """Main process, once every rank has written its files: manifest, atomic rename, pruning."""
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
    final = directory.with_name(directory.name.removesuffix(".partial"))
    if final.is_dir():  # what a pruning that was killed left of it (its manifest goes first): in the way of the rename
        shutil.rmtree(final)
    os.replace(directory, final)
    for old in [d for d in complete_checkpoints(final.parent.parent) if _prunable(d)][:-keep_last]:
        (old / MANIFEST).unlink(missing_ok=True)  # first: what a kill leaves is never taken for a checkpoint
        shutil.rmtree(old, ignore_errors=True)
    return final


def _prunable(directory: Path) -> bool:
    """Whether pruning may delete the checkpoint: a step's, not an epoch end's. One whose manifest is damaged is
    kept: what it is cannot be told, and the run resumes from the newest, which is not it."""
    try:
        return not read_manifest(directory)["epoch_end"]
    except CheckpointError:
        return False


# what resuming reads from a manifest, with its type (a bool is no int here); manifests written before the entries
# ADDED_LATER lack them (tests/fixtures/checkpoint_7b9954e)
MANIFEST_ENTRIES = {"step": int, "epoch_end": bool, "students": list, "replicas": int, "teacher": dict | None,
                    "config": dict, "steps_since_log": int, "teacher_summary": dict | None}
ADDED_LATER = ("steps_since_log", "teacher_summary")


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the checkpoint in `directory`, whose entries have their types and whose step is the
    folder's."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except PermissionError as error:  # intact, another user's: deleting it would lose it
        raise CheckpointError(f"checkpoint manifest {directory / MANIFEST} cannot be opened ({error.strerror}): give "
                              "this user read access to it") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        problem = str(error)
    else:
        if not (problem := _manifest_problem(manifest, directory)):
            return manifest
    raise CheckpointError(f"checkpoint manifest {directory / MANIFEST} is damaged ({problem}): "
                          f"{resume_fix(directory)}")


def _manifest_problem(manifest: Any, directory: Path) -> str | None:
    """What is wrong with `manifest`, read from `directory` (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"a {type(manifest).__name__}, not a mapping"
    for key, kind in MANIFEST_ENTRIES.items():
        if key not in manifest:
            if key not in ADDED_LATER:
                return f"no {key!r}"
        elif not isinstance(value := manifest[key], kind) or isinstance(value, bool) and kind is int:
            return f"{key!r} is {_shortened(repr(value), 40)}"
    if step_dir(directory, manifest["step"]).name != directory.name.removesuffix(".partial"):
        return f"'step' is {manifest['step']}, not its folder's ({directory.name})"
    return None


def resume_fix(directory: Path) -> str:
    """What to do about the checkpoint in `directory`, the newest, when it cannot be resumed."""
    return f"delete {directory} to resume from the checkpoint before it"


@contextlib.contextmanager
def restoring(directory: Path, path: Path, what: str) -> Iterator[Any]:
    """The file `path` of the checkpoint in `directory` (`what` names it), loaded (see read), for the block to
    restore: a file that is missing, damaged, or holds other entries, types or sizes than dist-tsp writes is one
    line saying to delete the checkpoint."""
    fix = resume_fix(directory)
    try:
        yield read(path, what, fix)
    except (CheckpointError, torch.OutOfMemoryError):
        raise
    except (LookupError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        problem = textwrap.shorten(f"{type(error).__name__}: {error}", 200, placeholder=" ...")
        raise CheckpointError(f"{what} {path} is not as dist-tsp writes it ({problem}): {fix}") from None


SHORT = 100  # characters of a value a difference shows


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Human-readable `key: old -> new` lines between two JSON-like trees (lists of one length item by item, long
    lists of two lengths by the items one has and the other not, long values cut short)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(saved.keys() | current.keys())
                for line in differences(saved.get(key), current.get(key), f"{where}.{key}" if where else key)]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [line for index, (old, new) in enumerate(zip(saved, current))
                for line in differences(old, new, f"{where}.{index}")]
    if saved == current:
        return []
    old, new = (repr(value) for value in (saved, current))
    if isinstance(saved, list) and isinstance(current, list) and max(len(old), len(new)) > SHORT:
        removed, added = ([item for item in one if item not in other] for one, other in ((saved, current),
                                                                                          (current, saved)))
        if removed or added:
            return [f"{where}: " + " and ".join(f"{change} {_shortened(repr(items))}" for change, items in
                                                (("without", removed), ("with", added)) if items)]
    return [f"{where}: {_shortened(old)} -> {_shortened(new)}"]


def _shortened(text: str, limit: int = SHORT) -> str:
    return text if len(text) <= limit else f"{text[:limit - 4]} ..."


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# what a checkpoint's state cannot be carried over to, even with resume=force: other students (their weights),
# another replica count (their random streams), another optimizer (its per-parameter state)
FATAL_DIFFERENCES = ("students", "replicas", "config.students", "config.train.optimizer.name")


def resumable(cfg: RunConfig, replicas: int, teacher_sha: str | None = None, total_steps: int | None = None,
              started: dict[str, Any] | None = None) -> Path | None:
    """The checkpoint directory a run resumes from (None: start at step 0).

    Refuses, with the differences, a checkpoint of another run: FATAL_DIFFERENCES (always), other settings or
    another teacher file (unless resume=force). The teacher is compared only when `teacher_sha` is given (by a run
    whose students learn from the teacher), the run's length (one past `total_steps` cannot be undone) only
    when that is, and what only a started run knows (`started`: its mixed precision, its data, its frozen mentors'
    files) where the manifest records it too. A checkpoint missing a file its ranks wrote is refused too, before any
    data loads.
    """
    found = complete_checkpoints(cfg.output_dir)
    if cfg.resume == "off" or not found:
        return None
    manifest = read_manifest(found[-1])
    saved = {key: manifest[key] for key in ("students", "replicas", "config")}
    if isinstance(saved["config"].get("teacher"), dict):
        teacher = saved["config"]["teacher"]
        teacher["checkpoint"] = cfg.teacher_checkpoint_identity(teacher.get("checkpoint"))
    current = {"students": cfg.student_names, "replicas": replicas, "config": cfg.identity()}
    if teacher_sha is not None:
        saved["teacher_sha256"] = (manifest["teacher"] or {}).get("sha256")
        current["teacher_sha256"] = teacher_sha
    for key, value in (started or {}).items():
        if key in manifest:  # checkpoints written before it was recorded are not compared on it
            saved[key], current[key] = manifest[key], value
    differ = differences(saved, current)
    fatal = [line for line in differ if line.startswith(FATAL_DIFFERENCES)]
    if fatal:
        raise UserError(f"{cfg.output_dir} holds a checkpoint that cannot continue with these settings "
                        f"({'; '.join(fatal[:4])}): use another output_dir, or resume=off to start again")
    if differ and cfg.resume != "force":
        raise UserError(f"{cfg.output_dir} holds a checkpoint of a different run ({'; '.join(differ[:4])}): "
                        "use another output_dir, or resume=force to continue with the new settings")
    if total_steps is not None and manifest["step"] > total_steps:
        raise UserError(f"{found[-1]} is at step {manifest['step']}, past this run's last step, {total_steps} "
                        f"(train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}): give it at least "
                        f"{manifest['step']} steps, or resume=off to start again")
    for path, what in file_roles(found[-1], cfg, replicas).items():  # found before the data loads
        require_file(path, what, resume_fix(found[-1]))
    return found[-1]


def set_aside(output_dir: Path, tensorboard: Path) -> Path | None:
    """Move an earlier attempt's checkpoints, metrics, results, predictions, config, profiles, W&B run id and
    TensorBoard logs (the folder `tensorboard`, where it is inside output_dir and holds event files) into
    output_dir/previous-N/; return it (None: there were none)."""
    names = ("checkpoints", "metrics.jsonl", "results.json", "results.md", "predictions.npz", "config.yaml", "profile",
             "tracker_run_id")
    present = [output_dir / n for n in names if (output_dir / n).exists()]
    if output_dir.resolve() in tensorboard.resolve().parents and next(tensorboard.glob("**/events.out.tfevents.*"),
                                                                        None) is not None:
        present.append(tensorboard)
    if not present:
        return None
    earlier = (re.fullmatch(r"previous-(\d+)", p.name, re.ASCII) for p in output_dir.glob("previous-*"))
    number = 1 + max((int(m[1]) for m in earlier if m), default=0)
    target = output_dir / f"previous-{number}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo rng_state(): the global generators as they were when the checkpoint was written."""
    random.setstate(state["python"])
    name, key, *position = state["numpy"]  # key: a tensor, or a numpy array in files written before issue 13
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *position))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # as set_rng_state_all, for the devices this node has
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
