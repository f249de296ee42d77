"""Loading a checkpoint never runs code from it: every file is read with weights_only=True, anything else is
refused in one line, and checkpoints written before that (tests/fixtures/checkpoint_7b9954e) still resume."""

import errno
import json
import os
import random
import re
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from dist_tsp.checkpoint import (
    MANIFEST,
    CheckpointError,
    check_writable,
    complete_checkpoints,
    differences,
    file_sha256,
    finalize,
    read,
    read_manifest,
    restore_rng_state,
    rng_state,
    save_atomic,
    set_aside,
    step_dir,
    write_atomic,
    write_text_atomic,
)
from dist_tsp.checkpoint import load as load_checkpoint
from dist_tsp.checkpointer import Checkpointer
from dist_tsp.config import load_config
from dist_tsp.data import load_dataset
from dist_tsp.errors import OutOfSpace, UserError
from dist_tsp.graph import TeachingGraph
from dist_tsp.placement import Groups, Placement
from dist_tsp.run_control import RunControl, StopRequest
from dist_tsp.students import build_local_students
from dist_tsp.tracking import Tracker, persistent_run_id
from dist_tsp.train import plan
from tests.runs import ROOT, TINY, launch, student_state, two_at_a_time

OLD = Path(__file__).parent / "fixtures" / "checkpoint_7b9954e" / "run"
OLD_STEP = OLD / "checkpoints" / "step_00000002"
TEACHER = OLD / "teacher" / "model.pt"
ALEXNET = "{name: alexnet, model: alexnet, args: {width: 0.0625, hidden: 16}"
REFUSED = "holds objects other than tensors and plain containers"


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def copy_old_run(target: Path) -> list[str]:
    """Copy the fixture's run directory to `target`; return the arguments that resume it."""
    shutil.copytree(OLD, target)
    return ["--config", str(target / "config.yaml"), f"output_dir={target}"]


def fresh_run(target: Path) -> list[str]:
    """The fixture's tiny settings in a new output_dir."""
    return ["--config", str(OLD / "config.yaml"), f"output_dir={target}"]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The run must have exited 2 with exactly one line on stderr, which is returned."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-tsp: error: "), done.stderr[-3000:]
    return lines[0]


def _as_teacher(evil, tmp):
    return [*fresh_run(tmp / "run"), f"teacher.checkpoint={evil}"], evil


def _as_teacher_weights(evil, tmp):
    return [*fresh_run(tmp / "run"), f"teacher.weights={evil}"], evil


def _as_student_init(evil, tmp):
    return [*fresh_run(tmp / "run"), f"teacher.checkpoint={TEACHER}", f"students=[{ALEXNET}, init: {evil}}}]"], evil


def _as_resumed_student(evil, tmp):
    args = copy_old_run(tmp / "run")
    return args, shutil.copy(evil, tmp / "run" / "checkpoints" / "step_00000002" / "students" / "alexnet.pt")


def _as_resumed_rng(evil, tmp):
    args = copy_old_run(tmp / "run")
    return args, shutil.copy(evil, tmp / "run" / "checkpoints" / "step_00000002" / "rng" / "alexnet.replica0.pt")


MALICIOUS_AS = {"teacher.checkpoint": _as_teacher, "teacher.weights": _as_teacher_weights,
                "student init": _as_student_init, "resumed student file": _as_resumed_student,
                "resumed RNG file": _as_resumed_rng}


def _launch_malicious(role: str, folder: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A checkpoint whose unpickling writes a marker file, given as `role`: the run, the marker, the file named."""
    marker = folder / "pwned.txt"
    torch.save({"model": Payload(f"echo PWNED > {marker}")}, folder / "evil.pt")
    args, named = MALICIOUS_AS[role](folder / "evil.pt", folder)
    return launch(args, check=False), marker, named


@pytest.fixture(scope="module")
def malicious(request, tmp_path_factory) -> dict:
    return two_at_a_time(request, tmp_path_factory,
                         test_a_checkpoint_that_would_run_code_is_refused_in_one_line_without_running_it,
                         _launch_malicious)


@pytest.mark.slow
@pytest.mark.parametrize("case", MALICIOUS_AS)
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_without_running_it(malicious, case):
    done, marker, named = malicious[case].result()
    assert not marker.exists()
    line = one_line_error(done)
    assert f" {named} {REFUSED} (posix.system)" in line and "re-save it as a plain state dict" in line, line


WRONG_MODEL = {  # what the 'model' entry of a teacher checkpoint becomes, and the message expected
    "a dict of strings": (lambda state: dict.fromkeys(state, "weights"), r"expected torch.Tensor .* <class 'str'>"),
    "a tensor of the wrong shape": (lambda state: {**state, next(iter(state)): torch.zeros(7, 7)},
                                    r"size mismatch for .*torch.Size\(\[7, 7\]\)"),
    "a tensor, not a state dict": (lambda state: torch.zeros(3), r"holds a Tensor under 'model', not a state dict"),
    # before: a non-finite loss at the first log step, advising a lower learning rate or temperature
    "NaN weights": (lambda state: {k: v.float().fill_(float("nan")) for k, v in state.items()},
                    r"holds NaN or infinite values \(\S+ and \d+ more\): the training that wrote it diverged; point "
                    "to another file$"),
}


def _launch_wrong_model(case: str, folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """A fresh run whose teacher checkpoint's 'model' entry is changed as the case says: the run, the file."""
    bad = folder / "bad.pt"
    torch.save({"model": WRONG_MODEL[case][0](torch.load(TEACHER, weights_only=True)["model"]), "num_classes": 10}, bad)
    return launch([*fresh_run(folder / "run"), f"teacher.checkpoint={bad}"], check=False), bad


@pytest.fixture(scope="module")
def wrong_models(request, tmp_path_factory) -> dict:
    return two_at_a_time(request, tmp_path_factory, test_a_model_entry_of_the_wrong_type_or_shape_is_one_line,
                         _launch_wrong_model)


@pytest.mark.slow
@pytest.mark.parametrize("case", WRONG_MODEL)
def test_a_model_entry_of_the_wrong_type_or_shape_is_one_line(wrong_models, case):
    done, bad = wrong_models[case].result()
    line = one_line_error(done)
    assert f"teacher checkpoint {bad}" in line, line
    assert re.search(WRONG_MODEL[case][1], line), line


def test_rng_state_round_trips_exactly_through_a_weights_only_file(tmp_path):
    random.random(), np.random.normal(), torch.rand(1)  # numpy now holds a cached gaussian as well
    save_atomic(rng_state(), tmp_path / "rng.pt")
    drawn = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    assert drawn[:3] == again[:3] and torch.equal(drawn[3], again[3])


def test_an_rng_file_written_before_the_fix_restores_numpys_state():
    saved = read(OLD_STEP / "rng" / "alexnet.replica0.pt", "student alexnet RNG checkpoint")
    name, key, *position = saved["rng"]["numpy"]
    assert isinstance(key, np.ndarray)  # the old format, allowed only for this
    restore_rng_state(saved["rng"])
    now_name, now_key, *now_position = np.random.get_state()
    assert (now_name, now_position) == (name, position) and np.array_equal(now_key, key)


def losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["train/alexnet/loss"] for row in rows if "train/alexnet/loss" in row}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The fixture's step-2 checkpoint, written by 7b9954e, resumed to step 4 by this code."""
    run = tmp_path_factory.mktemp("old") / "run"
    done = launch(copy_old_run(run))
    return run, done


@pytest.mark.slow
def test_a_checkpoint_written_before_the_fix_resumes_to_the_end_as_the_old_run_went_on(resumed):
    run, done = resumed
    assert "resuming from" in done.stdout and "(step 2)" in done.stdout
    old, new = losses(OLD), losses(run)
    assert sorted(new) == [1, 2, 3, 4]
    for step in (3, 4):  # dropout draws from the restored student generator: other states give other losses
        assert new[step] == pytest.approx(old[step], rel=1e-5)
    assert json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_the_files_save_writes_load_with_weights_only_and_no_allow_list(resumed):
    run, _ = resumed
    files = sorted((run / "checkpoints" / "step_00000004").rglob("*.pt"))
    assert [f.parent.name for f in files] == ["rng", "students"]
    assert all(torch.serialization.get_unsafe_globals_in_checkpoint(f) == [] for f in files)
    assert set(student_state(run, 4, "alexnet")) >= {"model", "optimizer", "scheduler"}
    assert torch.load(files[0], weights_only=True)["rng"]["numpy"][1].dtype == torch.int64


def test_a_refused_resumes_differences_name_the_changed_key_of_a_list_item_and_cut_long_values_short():
    """A change of one student's model printed every student's whole config on one line."""
    saved = {"students": [{"name": "a", "model": "lenet", "args": {}}, {"name": "b", "model": "lenet", "args": {}}],
             "note": "x" * 300}
    current = {"students": [{"name": "a", "model": "lenet", "args": {}}, {"name": "b", "model": "alexnet", "args": {}}],
               "note": "y"}
    assert differences(saved, current) == [f"note: {repr('x' * 300)[:96]} ... -> 'y'",
                                           "students.1.model: 'lenet' -> 'alexnet'"]


def test_long_lists_of_two_lengths_differ_by_the_items_one_has_and_the_other_not():
    """Before: both whole lists, each cut short before the item that differed (a protocol's overrides)."""
    overrides = [f"students.{i}.args={{width: 0.25, hidden: 64}}" for i in range(3)]
    assert differences({"overrides": overrides}, {"overrides": [*overrides, "loss.temperature=2"]}) == [
        "overrides: with ['loss.temperature=2']"]
    assert differences({"o": [*overrides, "a=1"]}, {"o": [overrides[0], "b=2"]}) == [
        f"o: without {overrides[1:] + ['a=1']!r} and with ['b=2']"]
    assert differences({"s": ["lenet", "alexnet"]}, {"s": ["lenet"]}) == ["s: ['lenet', 'alexnet'] -> ['lenet']"]


def test_an_empty_tracker_run_id_file_gets_a_new_id_written_whole(tmp_path):
    """An empty file, as a kill while it was written left one before, is no id: W&B would get an empty one."""
    path = tmp_path / "tracker_run_id"
    path.write_text("")
    run_id = persistent_run_id(path)
    assert len(run_id) == 12 and path.read_text() == run_id + "\n" and persistent_run_id(path) == run_id


def test_a_fresh_start_sets_aside_the_earlier_attempts_tensorboard_logs_and_leaves_other_folders(tmp_path):
    """Before: TensorBoard showed the earlier attempt's curves and the new one's as one run."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    events = tmp_path / "dist-tsp" / "events.out.tfevents.1.host"
    events.parent.mkdir()
    events.write_bytes(b"curves")
    (tmp_path / "mine").mkdir()
    previous = set_aside(tmp_path, tmp_path / "dist-tsp")
    assert (previous / "dist-tsp" / events.name).read_bytes() == b"curves" and not events.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "previous-1"]
    assert set_aside(tmp_path, tmp_path / "mine") is None  # no event files: not TensorBoard's


def test_a_folder_named_previous_with_other_digits_than_ascii_ones_is_left_alone(tmp_path):
    """Before: int() of a superscript two, which str.isdigit() accepts, raised a ValueError."""
    (tmp_path / "previous-\u00b2").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert set_aside(tmp_path, tmp_path / "dist-tsp") == tmp_path / "previous-1"


def manifest_of(step: int, epoch_end: bool = False) -> dict:
    """The least manifest read_manifest takes for a checkpoint at `step`."""
    return {"step": step, "epoch_end": epoch_end, "students": ["lenet"], "replicas": 1, "teacher": None,
            "config": {}}


DAMAGED_MANIFESTS = {
    "not UTF-8": b"\xff\xfe{", "not JSON": b"{", "not a mapping": b"[1, 2]", "without a step": b'{"epoch": 1}',
    # before: AttributeError tracebacks (in plan(), or once the teacher was loaded)
    "a config that is no mapping": json.dumps({**manifest_of(4), "config": "x"}).encode(),
    "a teacher that is no mapping": json.dumps({**manifest_of(4), "teacher": "x"}).encode(),
    # before: resumed at step -3 (its metrics rows dropped), or at step 1 with step 4's weights
    "a negative step": json.dumps(manifest_of(-3)).encode(),
    "a step that is a bool": json.dumps({**manifest_of(4), "step": True}).encode(),
    "another folder's step": json.dumps(manifest_of(2)).encode(),
}


@pytest.mark.parametrize("case", DAMAGED_MANIFESTS)
def test_a_damaged_manifest_is_one_line_naming_it_and_the_folder_to_delete(tmp_path, case):
    """Before, on every rank: a UnicodeDecodeError, AttributeError or KeyError traceback, or a nonsense step."""
    directory = step_dir(tmp_path, 4)
    directory.mkdir(parents=True)
    (directory / MANIFEST).write_bytes(DAMAGED_MANIFESTS[case])
    with pytest.raises(CheckpointError, match=rf"^checkpoint manifest {directory / MANIFEST} is damaged \(.+\): "
                                              rf"delete {directory} to resume from the checkpoint before it$"):
        read_manifest(directory)


def test_a_checkpoint_this_user_may_not_read_is_not_called_damaged(tmp_path, monkeypatch):
    """Before: "it is truncated or not a dist-tsp checkpoint; ... delete it" about an intact file of another user."""
    path = tmp_path / "alexnet.pt"
    torch.save({"model": {}}, path)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))  # what open() raises (the tests run as root)

    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(CheckpointError, match=rf"^student checkpoint {path} cannot be opened \(Permission denied\): "
                                              "give this user read access to it$"):
        load_checkpoint(path, "student")


def test_a_manifest_this_user_may_not_read_is_not_called_damaged(tmp_path, monkeypatch):
    """Before: "is damaged ([Errno 13] ...): delete ..." about another user's intact checkpoint."""
    directory = tmp_path / "checkpoints" / "step_00000004"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{}")
    read_text = Path.read_text

    def refused(path, *args, **kwargs):
        if path.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(path))  # what open() raises (the tests run as root)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(CheckpointError, match=rf"^checkpoint manifest {directory / 'manifest.json'} cannot be opened "
                                              r"\(Permission denied\): give this user read access to it$"):
        read_manifest(directory)


def test_a_folder_on_the_way_this_user_may_not_enter_is_one_line(tmp_path, monkeypatch):
    """Before: pathlib's PermissionError from exists(), a traceback (root enters every folder, so it is played)."""
    locked = tmp_path / "locked"
    exists = Path.exists

    def refused(path, *args, **kwargs):
        if path.is_relative_to(locked) and path != locked:
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(UserError, match=rf"^output_dir: {locked / 'run'} cannot be reached \(Permission denied\); "
                                        "choose a path you can write$"):
        check_writable(locked / "run", "output_dir")


def test_pruning_keeps_the_last_step_checkpoints_and_every_epoch_end(tmp_path):
    """keep_last=2 over step checkpoints at 2, 4, 6, 10 and epoch ends at 8 and 12."""
    for step in (2, 4, 6, 8, 10, 12):
        partial = step_dir(tmp_path, step, partial=True)
        partial.mkdir(parents=True)
        save_atomic({"model": {}}, partial / "lenet.pt")
        finalize(partial, manifest_of(step, epoch_end=step % 4 == 0 and step >= 8), keep_last=2)
    assert [d.name for d in complete_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in (6, 8, 10, 12)]


def test_pruning_keeps_an_older_checkpoint_whose_manifest_is_damaged_and_goes_on(tmp_path):
    """Before: the run stopped after its steps, at its next checkpoint, saying to delete that older checkpoint "to
    resume from the one before" (a resume takes the newest); what it is cannot be told, so it is kept."""
    for step in (2, 4, 6):
        partial = step_dir(tmp_path, step, partial=True)
        partial.mkdir(parents=True)
        finalize(partial, manifest_of(step), keep_last=1)
        if step == 2:
            (step_dir(tmp_path, 2) / MANIFEST).write_text("garbage")
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000006"]


def test_a_checkpoint_written_again_over_what_a_killed_pruning_left_of_it_completes(tmp_path):
    """A pruning killed after removing a manifest leaves its folder; a resume from an earlier checkpoint writes that
    step again. Before: os.replace's 'Directory not empty', a traceback on every rerun."""
    left = step_dir(tmp_path, 4)
    left.mkdir(parents=True)
    (left / "lenet.pt").write_bytes(b"half removed")
    partial = step_dir(tmp_path, 4, partial=True)
    partial.mkdir()
    save_atomic({"model": {}}, partial / "lenet.pt")
    finalize(partial, manifest_of(4), keep_last=2)
    assert complete_checkpoints(tmp_path) == [left] and read_manifest(left)["step"] == 4
    assert torch.load(left / "lenet.pt") == {"model": {}}


def test_writing_a_file_removes_the_temporaries_of_its_killed_writers_on_this_host_only(tmp_path):
    """A writer killed mid-write (SIGKILL, out of memory) leaves its temporary file: at ImageNet size a logit cache
    epoch of gigabytes, once per preemption. The next write of the same file removes those of dead processes here."""
    path, host = tmp_path / "epoch_0000.npy", socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with subprocess.Popen(["sleep", "30"]) as alive:
        left = {name: tmp_path / f".epoch_0000.npy.{name}.tmp" for name in
                (f"{host}.{dead.pid}", f"{host}.{alive.pid}", f"other-node.{dead.pid}", f"{host}.{dead.pid}.x")}
        for file in left.values():
            file.write_bytes(b"partial")
        write_text_atomic(path, "whole")
        alive.kill()
    assert path.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir() if p != path) == sorted(
        left[name].name for name in (f"{host}.{alive.pid}", f"other-node.{dead.pid}", f"{host}.{dead.pid}.x"))


def test_a_rewrite_leaves_the_old_file_whole_while_it_writes_and_after_it_fails(tmp_path):
    path = tmp_path / "model.pt"
    write_text_atomic(path, "old")

    def fails_midway(file):
        file.write(b"part of the new one")
        assert path.read_text() == "old"  # what a reader (a resume, another node) sees meanwhile
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="^the writer failed$"):
        write_atomic(path, fails_midway)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_a_teacher_another_run_saved_while_this_one_trained_it_is_kept_and_taught_by(tmp_path, monkeypatch, capsys):
    """Runs that share teacher.checkpoint and start before it exists (a sweep's trials without the teacher job)
    each train one; before, the last to finish replaced the file, and the earlier runs' checkpoints recorded a
    teacher that was no longer there (a resume then refused them as another run's)."""
    from dist_tsp import teacher

    path = tmp_path / "teacher.pt"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"output_dir={tmp_path}", f"teacher.checkpoint={path}"])
    data = load_dataset(cfg.data, cfg.seed)
    fit, theirs = teacher._fit, {}

    def another_run_saves_meanwhile(model, *args):
        fit(model, *args)
        other = teacher.build_teacher(cfg, data.num_classes, pretrained=False)
        save_atomic({"model": other.state_dict(), "num_classes": data.num_classes}, path)
        theirs["sha256"] = file_sha256(path)

    monkeypatch.setattr(teacher, "_fit", another_run_saves_meanwhile)
    _, info, _ = teacher.prepare_teacher(cfg, data, Accelerator(cpu=True), Groups.world_only())
    assert file_sha256(path) == info.sha256 == theirs["sha256"] and not list(tmp_path.glob(".*.tmp"))
    assert f"but another run saved {path} meanwhile: every run that shares it learns from that one" in \
        capsys.readouterr().out


def test_a_write_that_finds_no_room_is_one_line_whatever_the_writer_raised_and_leaves_no_part(tmp_path):
    """The file's own OSError, or torch.save's RuntimeError raised in its context (as on a full disk): one line
    naming the file system and what to do (the tmpfs tests in test_fail_fast fill a real one, where mounting is
    allowed)."""
    def no_room(file):
        file.write(b"part of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torch_save(file):
        try:
            no_room(file)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    for writer in (no_room, torch_save):
        with pytest.raises(OutOfSpace, match=r"^no room left on the file system at /\S* \(No space left on device\): "
                                             r"free space there \(or raise this user's quota\), then rerun the same "
                                             r"command to resume from the last complete checkpoint$"):
            write_atomic(tmp_path / "run" / "model.pt", writer)
        assert list((tmp_path / "run").iterdir()) == []
    def another_error(file):
        raise RuntimeError("another")

    with pytest.raises(RuntimeError, match="^another$"):  # left as it is
        write_atomic(tmp_path / "run" / "model.pt", another_error)


SHORT = ["--config", "configs/demo.yaml", *TINY, "train.max_steps=4", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A short real run: complete checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("written") / "run"
    launch([*SHORT, f"output_dir={run}"])
    return run


def resume_in_process(run: Path) -> int:
    """The step Checkpointer.resume finds in `run` for the run that wrote it, its students loaded on one CPU
    process."""
    cfg = load_config(SHORT[1], [*SHORT[2:], f"output_dir={run}"])
    placement, cpu = Placement(world_size=1, rank=0, num_students=3), torch.device("cpu")
    accelerator = Accelerator(cpu=True)
    data = load_dataset(cfg.data, cfg.seed)
    students = build_local_students(cfg, placement, SimpleNamespace(replica=None), cpu, data.num_classes, 4)
    control = RunControl(cfg.student_names, cfg.student_names, replicas=1, world=None, control=None,
                         stop_requested=StopRequest(), device=cpu, output_dir=run)
    return Checkpointer(cfg, placement, TeachingGraph.from_config(cfg), None, None, Tracker(cfg, accelerator),
                        accelerator, data.identity(), steps_per_epoch=45, total_steps=4).resume(students, control)


def _saved_as(file: str, change) -> callable:
    """Damage: `file` in the newest checkpoint re-saved as `change(its contents, that folder)` returns it."""
    def damage(directory: Path) -> None:
        save_atomic(change(torch.load(directory / file, weights_only=True), directory), directory / file)
    return damage


DAMAGED_FILES = {  # how the step-4 checkpoint's files are damaged, and the file named; before: the traceback
    "a student file with its model only (KeyError)": (
        _saved_as("students/lenet.pt", lambda state, _: {"model": state["model"]}), "students/lenet.pt"),
    "another student's optimizer state (ValueError)": (
        _saved_as("students/lenet.pt", lambda state, directory: {
            **state, "optimizer": torch.load(directory / "students/alexnet.pt", weights_only=True)["optimizer"]}),
        "students/lenet.pt"),
    "a schedule that is a list (TypeError)": (
        _saved_as("students/lenet.pt", lambda state, _: {**state, "scheduler": [1, 2]}), "students/lenet.pt"),
    "an RNG file without random states (KeyError)": (
        _saved_as("rng/lenet.replica0.pt", lambda *_: {"student_rng": {}, "rng": {}}), "rng/lenet.replica0.pt"),
    "weights a diverging training left (NaN)": (
        _saved_as("students/lenet.pt", lambda state, _: {
            **state, "model": {k: v.float().fill_(float("nan")) for k, v in state["model"].items()}}),
        "students/lenet.pt"),
    "a missing student file (check the path)": (
        lambda directory: (directory / "students/lenet.pt").unlink(), "students/lenet.pt"),
    "a missing RNG file (check the path)": (
        lambda directory: (directory / "rng/lenet.replica0.pt").unlink(), "rng/lenet.replica0.pt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_resumed_file_missing_or_not_as_dist_tsp_writes_it_is_one_line_naming_it_and_the_folder_to_delete(
        written, tmp_path, case):
    run = shutil.copytree(written, tmp_path / "run")
    newest = step_dir(run, 4)
    damage, file = DAMAGED_FILES[case]
    damage(newest)
    what = "student lenet RNG checkpoint" if file.startswith("rng") else "student lenet checkpoint"
    said = (r"does not exist:|is not as dist-tsp writes it \(.+\):|holds NaN or infinite values \(.+\): the training "
            r"that wrote it diverged;")
    with pytest.raises(CheckpointError, match=rf"^{what} {newest / file} ({said}) delete {newest} to resume from the "
                                              r"checkpoint before it$"):
        resume_in_process(run)


@pytest.mark.slow
@pytest.mark.parametrize("file", ["students/alexnet.pt", "rng/mobilenet.replica0.pt"])
def test_a_checkpoint_missing_a_file_is_refused_before_any_data_loads(written, tmp_path, file):
    run = shutil.copytree(written, tmp_path / "run")
    newest = step_dir(run, 4)
    (newest / file).unlink()
    with pytest.raises(CheckpointError, match=rf"^student \w+ (RNG )?checkpoint {newest / file} does not exist: "
                                              rf"delete {newest} to resume from the checkpoint before it$"):
        plan([*SHORT, f"output_dir={run}"], 1, 0)


@pytest.mark.slow
def test_an_undamaged_checkpoint_records_what_the_config_does_not_say_and_resumes_in_process(written, tmp_path):
    """The manifest records the data's identity and the mixed precision (a resume compares them with its own)."""
    cfg = load_config(SHORT[1], SHORT[2:])
    manifest = read_manifest(complete_checkpoints(written)[-1])
    assert (manifest["data"], manifest["mixed_precision"]) == (load_dataset(cfg.data, cfg.seed).identity(), "no")
    assert resume_in_process(shutil.copytree(written, tmp_path / "run")) == 4


@pytest.mark.slow
def test_a_manifest_of_another_shape_is_refused_before_any_process_group(written, tmp_path):
    """Before: plan() raised an AttributeError traceback on every rank."""
    run = shutil.copytree(written, tmp_path / "run")
    manifest = step_dir(run, 4) / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "config": "x"}))
    with pytest.raises(CheckpointError, match=rf"^checkpoint manifest {manifest} is damaged \('config' is 'x'\)"):
        plan([*SHORT, f"output_dir={run}", "train.max_steps=8"], 1, 0)
