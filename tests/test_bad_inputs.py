"""Every bad input gets one line naming what is wrong and the fix, before work starts, and touches nothing."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_tsp import check_data, protocol, shards, sweep
from dist_tsp.errors import SharedUserError, UserError
from dist_tsp.models import build_model
from dist_tsp.shared_errors import on_every_rank
from dist_tsp.train import plan
from tests.multiprocess import run_on_ranks
from tests.runs import CPU3, ENV, ROOT, TINY, TRAIN, command, launch, snapshot, two_at_a_time

DEMO = str(ROOT / "configs" / "demo.yaml")

# (overrides after --config configs/demo.yaml, world size, expected message)
BEFORE_ANY_PROCESS_GROUP = [
    (["students.0.model=resnet9000"], 1, r"unknown model 'resnet9000': choose one of lenet"),
    (["teacher.model=bogusnet"], 1, r"'teacher.model': unknown model 'bogusnet'"),
    (["data.name=mnist"], 1,
     r"'data.name': Input should be 'digits', 'fashion_mnist', 'cifar10', 'npz', 'image_folder' or 'arrow'"),
    (["loss.beta=-0.1"], 1, r"'loss.beta': Input should be greater than or equal to 0"),
    (["loss.alpha=0", "loss.beta=0", "loss.gamma=0"], 1, r"all 0: set at least one"),
    (["loss.temperature=-1"], 1, r"'loss.temperature': Input should be greater than 0"),
    ([], 2, r"2 processes cannot hold 3 students: launch a number of processes that divides or is a multiple of 3"),
    ([], 4, r"4 processes cannot hold 3 students"),
    (["students.1.name=lenet"], 1, r"duplicate student names \['lenet'\]: give every student a unique name"),
    (["students.1.name=teacher"], 1, r"student name 'teacher' names the teacher in the teaching graph and "
                                     r"predictions.npz: rename the student"),
    (["students.0.name=labels"], 1, r"student name 'labels' names the true labels in the teaching graph"),
    (["train.epoch=3"], 1, r"unknown config key 'train.epoch': allowed keys here are epochs, max_steps"),
    (["train.epochs=three"], 1, r"'train.epochs': Input should be a valid integer"),
    (["train.epochs"], 1, r"override 'train.epochs' is not key=value"),
    (["output_dir="], 1, r"'output_dir': is empty: give a directory"),  # before: "Input is not a valid path"
    (["students.²=x"], 1, r"override key students.²: use a list index from 0 to 2"),  # before: int()'s ValueError
    (["teacher.args={? [a] : 1}"], 1,  # before: a TypeError's traceback
     r"override 'teacher.args=\{\? \[a\] : 1\}' has a value that is not valid YAML \(found unhashable key\)$"),
    (["students=[{name: a, name: b, model: lenet}]"], 1,  # before: the reason left out
     r"has a value that is not valid YAML \(key 'name' is given twice: keep one\)$"),
    (["students.7.model=lenet"], 1, r"override key students.7: use a list index from 0 to 2"),
    (["loss.peer_reduction=max"], 1, r"'loss.peer_reduction': Input should be 'sum' or 'mean'"),
    (["data.val_fraction=1.5"], 1, r"'data.val_fraction': Input should be less than 1"),
    (["data.batch_size=0"], 1, r"'data.batch_size': Input should be greater than 0"),
    (["data.name=image_folder"], 1, r"data.root is required for data.name=image_folder"),
    (["resume=maybe"], 1, r"'resume': Input should be 'auto', 'force' or 'off'"),
    (["train.checkpoint_every=0"], 1, r"'train.checkpoint_every': Input should be greater than 0"),
    (["output_dir=/etc/hostname"], 1, r"output_dir /etc/hostname: /etc/hostname is a file, not a directory"),
    (["output_dir=/etc/hostname/run"], 1, r"/etc/hostname is a file, not a directory; choose another path"),
    (["teacher.checkpoint=/etc/hostname/teacher.pt"], 1,  # a teacher to train first, and save where none can
     r"teacher checkpoint /etc/hostname/teacher.pt: /etc/hostname is a file, not a directory; choose another path"),
    (["teacher.checkpoint=/etc"], 1,  # before: trained, then an IsADirectoryError and a stray temporary file
     r"teacher.checkpoint /etc is a directory: point it to the teacher's file \(model.pt\), or to a path where it is "
     r"to be saved"),
    (["teacher.checkpoint=/dev/null"], 1,  # before, as root: a teacher trained, then saved over the device
     r"teacher.checkpoint /dev/null is not a regular file: point it to the teacher's file \(model.pt\)"),
    (["teacher.mode=cached", "teacher.cache_dir=/etc/hostname"], 1,  # before: a traceback once the teacher trained
     r"teacher.cache_dir /etc/hostname: /etc/hostname is a file, not a directory; choose another path"),
    (["students=[]"], 1, r"'students': List should have at least 1 item"),
    (["output_dir=/proc/run"], 1,  # before, as root (whom permission bits allow): the teacher trained, then a traceback
     r"output_dir /proc/run: /proc is not writable \(.*\); choose a path you can write"),
    (["seed=-1"], 1, r"'seed': Input should be greater than or equal to 0"),  # before: numpy's traceback, each rank's
    (["seed=4294967296"], 1, r"'seed': Input should be less than 4294967296"),
    (["train.collective_timeout_s=1e300"], 1,  # before: an OverflowError's traceback once the data was loaded
     r"'train.collective_timeout_s': Input should be less than or equal to 604800"),
    (["--confg"], 1, r"unrecognized arguments: --confg: see --help"),
]


def case_id(overrides: list[str], world: int) -> str:
    return " ".join(overrides) or f"world={world}"


@pytest.mark.parametrize("overrides, world, message", BEFORE_ANY_PROCESS_GROUP,
                         ids=[case_id(o, w) for o, w, _ in BEFORE_ANY_PROCESS_GROUP])
def test_rejected_before_any_process_group(overrides, world, message):
    with pytest.raises(UserError, match=message) as info:
        plan(["--config", DEMO, *overrides], world, 0)
    assert "\n" not in str(info.value)


def test_a_logit_cache_folder_that_exists_is_read_where_this_run_cannot_write_and_a_new_one_must_be_writable(
        tmp_path, monkeypatch):
    """Runs that share a cache made by others read it from a read-only place (logit_cache: such a folder is only
    read); only a folder still to be made must be creatable."""
    shared = tmp_path / "read-only"
    (shared / "cache").mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not Path(path).is_relative_to(shared))
    options = ["--config", DEMO, f"output_dir={tmp_path / 'run'}", "teacher.mode=cached"]
    plan([*options, f"teacher.cache_dir={shared / 'cache'}"], 1, 0)
    with pytest.raises(UserError, match=rf"teacher.cache_dir {shared / 'new'}: {shared} is not writable"):
        plan([*options, f"teacher.cache_dir={shared / 'new'}"], 1, 0)


def test_an_output_dir_on_a_read_only_file_system_is_refused_though_its_permission_bits_allow_writing(
        small_file_system):
    """Root, whom the bits always allow, met it once the teacher had trained (a container's read-only volume)."""
    (small_file_system / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_file_system)], check=True)
    for run in ("run", "run/new"):  # the folder itself, and one to be made inside it
        with pytest.raises(UserError, match=rf"output_dir {small_file_system / run}: {small_file_system / 'run'} is "
                                            r"not writable \(Read-only file system\)"):
            plan(["--config", DEMO, f"output_dir={small_file_system / run}"], 1, 0)


def test_missing_or_broken_config_file_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"^no config given: pass --config FILE \(e.g. --config configs/demo.yaml\)"):
        plan([], 1, 0)
    with pytest.raises(UserError, match=r"config file .*nope.yaml does not exist"):
        plan(["--config", str(tmp_path / "nope.yaml")], 1, 0)
    # before, both "does not exist"
    for given, what in ((tmp_path, "is a directory"), ("/dev/null", "is not a regular file")):
        with pytest.raises(UserError, match=rf"^config file {given} {what}: pass an existing YAML file to --config$"):
            plan(["--config", str(given)], 1, 0)
    (tmp_path / "bad.yaml").write_text("students: [\n")
    with pytest.raises(UserError, match=r"is not valid YAML"):
        plan(["--config", str(tmp_path / "bad.yaml")], 1, 0)


# One case of each kind of check through the real command, `python dist_tsp/train.py --config ... output_dir=RUN ...`
# (a process costs seconds of imports; the messages are all pinned above), where RUN is a copy of a run directory
# that the real command wrote (checkpoint, metrics, config, teacher). A case with world size W runs as torchrun starts
# rank 0 (RANK, WORLD_SIZE, ...; the check comes before any process group exists); one more runs another rank of the
# same launch, which exits 2 in silence: the line is said once, by rank 0.
EXISTING_RUN = Path(__file__).parent / "fixtures" / "checkpoint_7b9954e" / "run"
COMMAND_KINDS = ("--confg", "train.epochs", "train.epoch=3", "loss.beta=-0.1", "loss.alpha=0 loss.beta=0 loss.gamma=0",
                 "students.0.model=resnet9000", "output_dir=/etc/hostname/run", "world=2")
# case -> (overrides, world size, rank, expected line or None for no line)
COMMAND_CASES = {
    **{case_id(o, w): (o, w, 0, m) for o, w, m in BEFORE_ANY_PROCESS_GROUP if case_id(o, w) in COMMAND_KINDS},
    "world=4 rank 3": ([], 4, 3, None),
}


def _run_case(case: str, folder: Path) -> dict:
    """One case's command against a fresh copy of the existing run: what it printed, and the run before and after."""
    overrides, world, rank, _ = COMMAND_CASES[case]
    run = folder / "run"
    shutil.copytree(EXISTING_RUN, run)
    argv = command(["--config", DEMO, f"output_dir={run}", *overrides])
    env = ENV if world == 1 else {**ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": "29599", "TORCHELASTIC_RUN_ID": "bad-inputs"}
    before = snapshot(run)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return {"done": done, "before": before, "after": snapshot(run)}


@pytest.fixture(scope="module")
def commands(request, tmp_path_factory) -> dict:
    return two_at_a_time(request, tmp_path_factory, test_the_command_exits_2_with_one_line_touching_nothing, _run_case)


@pytest.mark.slow
@pytest.mark.parametrize("case", COMMAND_CASES)
def test_the_command_exits_2_with_one_line_touching_nothing(commands, case):
    result = commands[case].result()
    done, (_, world, rank, message) = result["done"], COMMAND_CASES[case]
    output = (f"rank {rank} of {world}: exit {done.returncode}\nstdout:\n{done.stdout[-2000:]}\n"
              f"stderr:\n{done.stderr[-3000:]}")
    assert done.returncode == 2, output
    assert done.stdout == "", output
    if message is None:
        assert done.stderr == "", output
    else:
        assert done.stderr.endswith("\n") and len(done.stderr.splitlines()) == 1, output
        assert done.stderr.startswith("dist-tsp: error: ") and re.search(message, done.stderr), output
    before, after = result["before"], result["after"]
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"changed in the existing run directory: {changed}"


# (processes, overrides given the test's folder, the one line): through dist-tsp-launch, as a cluster job runs
THROUGH_THE_LAUNCHER = {
    "a misspelled key, one process": (1, lambda t: ["loss.temprature=3"], r"unknown config key 'loss.temprature'"),
    "a launch shape that cannot hold the students": (2, lambda t: [], r"2 processes cannot hold 3 students"),
    "data the main rank cannot load while the others wait": (
        3, lambda t: ["data.name=cifar10", f"data.root={t}/none", "data.download=false"],
        r"CIFAR-10 not found in .*none and data.download is false"),
    "an image folder with a class missing from test/": (
        3, lambda t: ["data.name=image_folder", f"data.root={_removed(image_folder(t / 'imgs', 3) / 'test' / 'c1')}"],
        r"imgs: class 'c1' is in train/ but not test/: both splits need the same classes"),
    "a teacher file every rank finds truncated": (
        3, lambda t: [f"teacher.checkpoint={_write(t / 'cut.pt', b'PK-half')}"],
        r"teacher checkpoint .*cut.pt cannot be read \(.*\): it is truncated"),
    "a student init file one of several ranks finds truncated": (  # rank 0 reads lenet's well, rank 1 alexnet's
        3, lambda t: ["loss.beta=0", f"students.0.init={teacher_file(t / 'lenet.pt', 'lenet')}",
                      f"students.1.init={_write(t / 'cut.pt', b'PK-half')}"],
        r"^dist-tsp: error: rank 1: student alexnet's init checkpoint .*cut.pt cannot be read \(.*\): it is truncated"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", THROUGH_THE_LAUNCHER)
def test_dist_tsp_launch_exits_2_with_the_one_line_and_no_torchrun_report(case, tmp_path):
    processes, overrides, message = THROUGH_THE_LAUNCHER[case]
    done = launch(["--config", DEMO, f"output_dir={tmp_path / 'run'}", *TINY, *overrides(tmp_path)],
                  processes=processes, check=False, launcher="dist-tsp")
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("dist-tsp: error: "), done.stderr[-3000:]
    assert re.search(message, done.stderr), done.stderr


# What rank 1 alone meets, as on a node of its own (Python run in rank 1 before train.py's command), and the one line
MET_BY_RANK_1 = {
    "an output_dir it cannot write (its node's copy of the parent read-only)": (
        'sys.argv = [a if not a.startswith("output_dir=") else "output_dir=/proc/run" for a in sys.argv]',
        r"^dist-tsp: error: rank 1: output_dir /proc/run: /proc is not writable \(.*\); choose a path you can write$"),
    "an output_dir of its own (its node's local disk)": (  # before: checkpoints without its files, found on resume
        'sys.argv = [a + "-own" if a.startswith("output_dir=") else a for a in sys.argv]',
        r"^dist-tsp: error: rank 1: output_dir .*/run-own is not the main process's here \(it lacks "
        r"\.dist-tsp-shared-[0-9a-f]{16}, which the main process just made there\): output_dir must be one directory "
        r"every node sees, on a shared filesystem$"),
    "a mixed precision of its own (its node's accelerate config)": (
        'os.environ["ACCELERATE_MIXED_PRECISION"] = "fp16"',
        r"^dist-tsp: error: rank 1: mixed_precision=fp16 is not supported: use bf16 or no$"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MET_BY_RANK_1)
def test_bad_input_one_rank_meets_at_start_up_stops_every_rank_in_one_line_naming_it(case, tmp_path):
    """Before: rank 1 exited 2 without a word, and the others waited for it (in the process group's rendezvous, or
    blamed its death on the out-of-memory killer) until torchrun killed them."""
    on_rank_1, message = MET_BY_RANK_1[case]
    program = tmp_path / "train_with_rank_1_elsewhere.py"
    program.write_text(f"import os, sys\nif os.environ['RANK'] == '1':\n    {on_rank_1}\n"
                       "from dist_tsp.train import command\ncommand()\n")
    argv = [str(program) if word == TRAIN else word for word in
            command(["--config", DEMO, f"output_dir={tmp_path / 'run'}", *TINY], 3, launcher="dist-tsp")]
    done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(message, done.stderr), done.stderr[-3000:]
    assert not list(tmp_path.glob("run*/**/*"))  # nothing written, nor left (no teacher trained)


def teacher_file(path: Path, model: str = "resnet_cifar", num_classes: int = 10, **args) -> Path:
    torch.save({"model": build_model(model, num_classes, **args).state_dict(), "num_classes": num_classes}, path)
    return path


def image_folder(root: Path, classes: int, per_class: int = 4) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * c, 9 * i, 0)).save(root / split / f"c{c}" / f"{i}.png")
    return root


BATCH_LARGER_THAN_THE_DATA = "batch larger than the data"
BAD_MODEL_ARGUMENT = "bad model argument"
STUDENT_INIT_OF_ANOTHER_MODEL = "a student init file of another model"
# found before a teacher to train is trained (before: once it had trained and been saved)
BEFORE_THE_TEACHER = (BATCH_LARGER_THAN_THE_DATA, BAD_MODEL_ARGUMENT, STUDENT_INIT_OF_ANOTHER_MODEL)
AFTER_START = {
    "cifar10 absent offline": (lambda t: ["data.name=cifar10", f"data.root={t}/none", "data.download=false"],
                               r"CIFAR-10 not found in .*none and data.download is false: put cifar-10-batches-py/"),
    "fashion-mnist files missing": (lambda t: ["data.name=fashion_mnist", f"data.root={t}"],
                                    r"Fashion-MNIST file train-images-idx3-ubyte\[.gz\] not found"),
    "truncated teacher checkpoint, resume=off": (
        lambda t: [f"teacher.checkpoint={_write(t / 'cut.pt', b'PK-half')}", "resume=off"],
        r"teacher checkpoint .*cut.pt cannot be read \(.*\): it is truncated"),
    "teacher of another architecture": (
        lambda t: [f"teacher.checkpoint={teacher_file(t / 'lenet.pt', 'lenet')}", "teacher.args={depth: 8}"],
        r"teacher checkpoint .*lenet.pt does not fit the configured model: Error\(s\) in loading state_dict"),
    "teacher trained on other classes": (
        lambda t: [f"teacher.checkpoint={teacher_file(t / 't.pt', depth=8)}", "teacher.args={depth: 8}",
                   "data.name=image_folder", f"data.root={image_folder(t / 'imgs', 2)}", "data.batch_size=4"],
        r"predicts 10 classes but image_folder has 2: point teacher.checkpoint to a teacher trained on this"),
    BAD_MODEL_ARGUMENT: (lambda t: ["students.0.args={bogus: 1}"],
                         r"cannot build model 'lenet' with args \{'bogus': 1\}"),
    STUDENT_INIT_OF_ANOTHER_MODEL: (lambda t: [f"students.2.init={teacher_file(t / 'alexnet.pt', 'alexnet')}"],
                                    r"student mobilenet's init checkpoint .*alexnet.pt does not fit the configured "
                                    r"model: Error\(s\) in loading state_dict"),
    BATCH_LARGER_THAN_THE_DATA: (lambda t: ["data.batch_size=5000"],
                                 r"do not fill one batch of 5000: lower data.batch_size"),
}


def _removed(folder: Path) -> Path:
    """The folder's split root, once the folder (split/<class>) is gone."""
    shutil.rmtree(folder)
    return folder.parents[1]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _launch_after_start(case: str, folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The case's run into a run directory that holds an earlier run's metrics and config."""
    overrides, _ = AFTER_START[case]
    run = folder / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").write_text("earlier run\n")
    return launch(["--config", DEMO, f"output_dir={run}", *TINY, *overrides(folder)], check=False), run


@pytest.fixture(scope="module")
def after_start(request, tmp_path_factory) -> dict:
    return two_at_a_time(request, tmp_path_factory, test_rejected_before_training_without_touching_outputs,
                         _launch_after_start)


@pytest.mark.slow
@pytest.mark.parametrize("case", AFTER_START, ids=list(AFTER_START))
def test_rejected_before_training_without_touching_outputs(after_start, case):
    done, run = after_start[case].result()
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-tsp: error: ")
    assert re.search(AFTER_START[case][1], last), last
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "config.yaml").read_text() == "earlier run\n"
    assert not list(run.glob("previous-*"))  # nor set aside (resume=off) before the input was found bad
    if case in BEFORE_THE_TEACHER:
        assert not (run / "teacher").exists()


# rank -> the bad input it meets (none: its work returns the rank)
MET_ON_RANKS = {
    "none": ({}, None),
    "every rank, the same": ({0: "cut.pt is truncated", 1: "cut.pt is truncated", 2: "cut.pt is truncated"},
                             "cut.pt is truncated"),
    "one rank": ({1: "lenet.pt is truncated"}, "rank 1: lenet.pt is truncated"),
    "two ranks, the same": ({0: "x.pt is truncated", 2: "x.pt is truncated"}, "ranks 0, 2: x.pt is truncated"),
    "two ranks, each its own": ({2: "b.pt is truncated", 1: "a.pt is truncated"},
                                "rank 1: a.pt is truncated; rank 2: b.pt is truncated"),
}


def _met_on_every_rank() -> dict[str, str]:
    """Each case's work on every rank: what on_every_rank returned or raised (SharedUserError's message)."""
    import torch.distributed as dist

    def work(met: dict[int, str]) -> str:
        if dist.get_rank() in met:
            raise UserError(met[dist.get_rank()])
        return f"rank {dist.get_rank()}"

    outcomes = {}
    for case, (met, _) in MET_ON_RANKS.items():
        try:
            outcomes[case] = on_every_rank(lambda met=met: work(met))
        except SharedUserError as error:
            outcomes[case] = f"raised: {error}"
    return outcomes


@pytest.fixture(scope="module")
def met_on_every_rank() -> list[dict[str, str]]:
    return run_on_ranks(_met_on_every_rank, 3)


@pytest.mark.parametrize("case", MET_ON_RANKS)
def test_bad_input_met_on_some_ranks_stops_every_rank_with_one_message_naming_them(met_on_every_rank, case):
    expected = MET_ON_RANKS[case][1]
    assert [ranks[case] for ranks in met_on_every_rank] == (
        [f"rank {rank}" for rank in range(3)] if expected is None else [f"raised: {expected}"] * 3)


# launcher arguments, and the one line: before, accelerate's traceback, torch's AssertionError, or one line per rank
BAD_LAUNCHES = {
    "an accelerate config that is not there": (["--config_file", "configs/accelerate/cpux.yaml", TRAIN],
                                               r"--config_file configs/accelerate/cpux.yaml does not exist: give an "
                                               r"accelerate config"),
    "no process": (["--config_file", CPU3, "--num_processes", "0", TRAIN], r"--num_processes 0: give at least 1"),
    "a script that is not there": (["--config_file", CPU3, "dist_tsp/trian.py"],
                                   r"dist_tsp/trian.py does not exist: give the script to launch"),
    "a folder as the script": (["--config_file", CPU3, "dist_tsp"], r"dist_tsp is a directory: give the script"),
    # before, accelerate's traceback: the run's config given as the accelerate config, a mix-up the line explains
    "the run's config as the accelerate config": (
        ["--config_file", DEMO, TRAIN], rf"--config_file {DEMO} is not an accelerate config \(ValueError: A "
                                        r"`distributed_type` must be specified in the config file.\): give one that "
                                        r"`accelerate config` writes, .* \(a run's own config is given with "
                                        r"--config\)"),
    "an accelerate config that is no YAML": (["--config_file", "README.md", TRAIN],
                                             r"--config_file README.md is not an accelerate config \(\w+Error: "),
    # before, accelerate's usage (112 lines) and its error
    "an option accelerate does not know": (["--config_file", CPU3, "--bogus", TRAIN],
                                           r"unrecognized arguments: --bogus: see --help$"),
    # before, tracebacks: an OverflowError as the rendezvous connects, accelerate's FP8 RuntimeError
    "a port out of range": (["--config_file", CPU3, "--main_process_port", "99999", TRAIN],
                            r"--main_process_port 99999: give a port from 1 to 65535$"),
    "a mixed precision dist-tsp does not train in": (["--config_file", CPU3, "--mixed_precision", "fp8", TRAIN],
                                                     r"--mixed_precision fp8: dist-tsp trains in no \(fp32\) or bf16$"),
}


@pytest.mark.parametrize("case", BAD_LAUNCHES)
def test_dist_tsp_launch_refuses_bad_launcher_arguments_in_one_line(case):
    arguments, message = BAD_LAUNCHES[case]
    done = subprocess.run([sys.executable, "-m", "dist_tsp.launch", *arguments, "--config", DEMO], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
    assert re.match(f"dist-tsp: error: {message}", done.stderr), done.stderr


# dist-tsp's other commands: arguments, and the one line (before: argparse's usage, then its error)
BAD_OPTIONS = {
    "protocol without --config": (protocol.main, ["--out", "x"],
                                  "dist-tsp protocol: error: the following arguments are required: --config: see "
                                  "--help"),
    "protocol with an empty --out (an unset variable)": (  # before: the runs wrote into the current directory
        protocol.main, ["--config", DEMO, "--out", ""],
        "dist-tsp protocol: error: argument --out: is empty: give a folder: see --help"),
    "a sweep into an empty DIR": (sweep.main, ["run", "trials.txt", "", DEMO],
                                  "dist-tsp: error: argument DIR: is empty: give a folder: see --help"),
    "a sweep trial number that is no number": (sweep.main, ["trial", "trials.txt", "d", "x"],
                                               "dist-tsp: error: argument N: invalid int value: 'x': see --help"),
    "shards without its folders": (shards.main, [], "dist-tsp shards: error: the following arguments are required: "
                                                    "folder, out: see --help"),
    "check_data with an option it does not know": (check_data.main, ["--bogus"], "dist-tsp check_data: error: "
                                                                                  "unrecognized arguments: --bogus: "
                                                                                  "see --help"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_bad_option_of_every_command_is_one_line_and_exit_2(case, capsys, tmp_path, monkeypatch):
    command, argv, line = BAD_OPTIONS[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        command(argv)
    assert (stop.value.code, capsys.readouterr().err) == (2, line + "\n")
    assert not list(tmp_path.iterdir())
