"""Reliability: exact resume after SIGKILL, signals, non-finite losses, refusing another run's checkpoint."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_tsp.checkpoint import complete_checkpoints, load, read_manifest, step_dir
from dist_tsp.errors import UserError
from dist_tsp.train import plan
from tests.multiprocess import run_on_ranks
from tests.runs import (
    CPU3,
    DEEPSPEED,
    ENV,
    ROOT,
    TINY,
    command,
    kill_run,
    last_step,
    launch,
    process_state,
    rank_pid,
    snapshot,
    start,
    student_state,
    train_rows,
    wandb_runs,
)

pytestmark = pytest.mark.slow
STUDENTS = ("lenet", "alexnet", "mobilenet")
RESUMABLE = [*TINY, "train.max_steps=12", "train.checkpoint_every=2", "train.optimizer.schedule=cosine"]


def wait_for_step(run, process, step: int, timeout: float = 300, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    launch(["--config", "configs/demo.yaml", f"output_dir={run}", *RESUMABLE], processes=3)
    return run


def test_sigkill_at_a_random_step_then_rerun_ends_bitwise_equal(uninterrupted, tmp_path):
    """The killed run takes the graph-ready step (train.step=graph, without capture on the CPU): its static buffers,
    tensor learning rates and checkpoints end bitwise where the uninterrupted eager run does."""
    args = ["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *RESUMABLE,
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt", "train.step=graph"]
    kill_at = random.Random().randint(3, 9)
    process = start(args, processes=3)
    while (main := rank_pid(tmp_path, 0)) is None:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    wait_for_step(tmp_path, process, kill_at, poll_s=0.01)  # a step takes about 30 ms
    os.kill(main, signal.SIGSTOP)  # the other ranks then wait for it within a step (before, the run could end first)
    kill_run(process, tmp_path)
    assert last_step(tmp_path) < 12
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 99, "train/lenet/lo')  # as a kill in the middle of writing a row leaves it
    done = launch(args, processes=3)
    assert "resuming from" in done.stdout and "step: graph-ready, not captured" in done.stdout
    for name in STUDENTS:
        a, b = student_state(uninterrupted, 12, name), student_state(tmp_path, 12, name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert train_rows(tmp_path) == train_rows(uninterrupted), f"killed at step {kill_at}"
    results = [json.loads((r / "results.json").read_text())["students"] for r in (uninterrupted, tmp_path)]
    assert results[0] == results[1]


STEPS_PER_EPOCH = 8
LAYOUTS = {  # students, processes, training images (8 steps of 32 per epoch on every replica), the kill, the teacher
    "2 students per rank, all killed after the epoch's last step, the teacher's logits cached": (
        "[{name: lenet, model: lenet}, {name: alexnet, model: alexnet, args: {width: 0.25, hidden: 64}},"
        " {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}, {name: lenet2, model: lenet}]",
        2, 256, STEPS_PER_EPOCH, "group", ["teacher.mode=cached"], CPU3),
    "2 replicas, one rank killed after a checkpoint step inside the epoch": (
        "[{name: lenet, model: lenet}, {name: alexnet, model: alexnet, args: {width: 0.25, hidden: 64}}]",
        4, 512, 4, "rank 3", ["teacher.mode=fsdp"], CPU3),  # AlexNet's dropout draws from each replica's own random
    # state; the teacher's parameters sharded 1/4 over the ranks (FSDP2), gathered for each step's slice of the batch
    "3 replicas, one rank killed after a checkpoint step inside the epoch": (  # 3 sum in another order if DDP's
        "[{name: alexnet, model: alexnet, args: {width: 0.25, hidden: 64}}]", 3, 768, 4, "rank 2",  # buckets
        ["teacher.mode=deepspeed"], DEEPSPEED),  # the teacher's parameters partitioned by DeepSpeed's ZeRO-3
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigkill_then_rerun_ends_bitwise_equal_in_every_layout(uninterrupted, tmp_path, layout):
    """K = 2 students per rank (the teacher's logits from its cache), or R = 2 replicas (W = 4, N = 2: DDP over each
    student's pair of ranks, peer groups {0, 1} and {2, 3}; the teacher in FSDP), or R = 3 replicas of one student
    (the teacher in DeepSpeed's ZeRO-3), logging every 3 steps, a checkpoint every 4: SIGKILL to every process or to
    one rank right after a checkpoint (the main process pauses once it is complete); the rerun resumes from it and
    ends as if never killed, every student trained and reported, results.json whole (the cache's computed epochs
    too)."""
    students, processes, images, kill_after, victim, extra, accelerate_config = LAYOUTS[layout]
    args = ["--config", "configs/demo.yaml", *TINY, f"students={students}", f"data.max_train_samples={images}",
            "train.epochs=2", f"train.max_steps={2 * STEPS_PER_EPOCH}", "train.checkpoint_every=4",
            "train.log_every=3", "train.optimizer.schedule=cosine",
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt", *extra]
    reference, run = tmp_path / "uninterrupted", tmp_path / "killed"
    launch([*args, f"output_dir={reference}"], processes=processes, accelerate_config=accelerate_config)
    args.append(f"output_dir={run}")
    process = start(args, processes=processes, pause_after_checkpoint=step_dir(run, kill_after),
                    accelerate_config=accelerate_config)
    deadline = time.monotonic() + 300
    while process_state(main := rank_pid(run, 0) or 0) != "T":  # stopped
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"checkpoint {kill_after} not reached in 300 s"
        time.sleep(0.05)
    if victim == "group":
        kill_run(process, run)
    else:
        os.kill(rank_pid(run, int(victim.split()[1])), signal.SIGKILL)
        os.kill(main, signal.SIGCONT)  # it finds a rank gone at the next step's collectives
        assert process.wait(timeout=120) != 0
    assert [read_manifest(d)["step"] for d in complete_checkpoints(run)][-1] == kill_after
    done = launch(args, processes=processes, accelerate_config=accelerate_config)
    assert f"(step {kill_after})" in done.stdout, done.stdout[-2000:]
    names = re.findall(r"name: (\w+)", students)
    for name in names:
        a, b = (student_state(r, 2 * STEPS_PER_EPOCH, name) for r in (reference, run))
        assert a["model"].keys() == b["model"].keys(), name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys(), name
        for key, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][key][s]) for s, v in state.items()), name
    assert [r["step"] for r in train_rows(run)] == [3, 4, 6, 8, 9, 12, 15, 16]
    assert train_rows(run) == train_rows(reference)
    assert all(row[f"train/{name}/loss"] > 0 for row in train_rows(reference) for name in names)
    results = [json.loads((r / "results.json").read_text()) for r in (reference, run)]
    for result in results:  # each run's logit cache is in its own output_dir
        (result["teacher"]["cache"] or {}).pop("path", None)
    assert results[0] == results[1] and set(results[0]["students"]) == set(names)
    assert [f"teacher.mode={results[0]['teacher']['mode']}"] == extra


def test_a_fresh_start_sets_the_earlier_attempt_aside_and_another_configs_checkpoint_is_refused_unless_forced(
        uninterrupted, tmp_path):
    """A rerun after a kill before the first checkpoint starts from step 0 with fresh metrics and a new W&B run id,
    the dead attempt's in previous-1/; resume=off later sets the whole run aside in previous-2/."""
    args = ["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY, "train.max_steps=2",
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "dead attempt": true}\n')
    (tmp_path / "tracker_run_id").write_text("deadattempt\n")
    first = launch(args)
    assert "moved to" in first.stdout and "resuming from" not in first.stdout
    assert (tmp_path / "previous-1" / "metrics.jsonl").read_text() == '{"step": 1, "dead attempt": true}\n'
    assert (tmp_path / "previous-1" / "tracker_run_id").read_text() == "deadattempt\n"
    assert "dead attempt" not in (tmp_path / "metrics.jsonl").read_text()
    refused = launch([*args, "train.max_steps=4", "loss.gamma=0.5"], check=False)
    assert refused.returncode == 2
    assert "holds a checkpoint of a different run (config.loss.gamma: 0.1 -> 0.5)" in refused.stderr
    assert "resume=force" in refused.stderr
    forced = launch([*args, "train.max_steps=4", "loss.gamma=0.5", "resume=force"])
    assert "resuming from" in forced.stdout and last_step(tmp_path) == 4
    in_bf16 = subprocess.run(command([*args, "train.max_steps=4", "loss.gamma=0.5"]), cwd=ROOT, capture_output=True,
                             text=True, env={**ENV, "ACCELERATE_MIXED_PRECISION": "bf16"}, timeout=900)
    assert in_bf16.returncode == 2, in_bf16.stderr[-3000:]  # before: resumed, and went on in bf16
    assert "holds a checkpoint of a different run (mixed_precision: 'no' -> 'bf16')" in in_bf16.stderr
    with pytest.raises(UserError, match=r"checkpoint that cannot continue with these settings \(config.students: .*"
                                         r"students: \['lenet', 'alexnet', 'mobilenet'\] -> \['lenet'\]\): use "
                                         r"another output_dir, or resume=off to start again"):
        plan([*args, "students=[{name: lenet, model: lenet}]", "resume=force"], 1, 0)
    with pytest.raises(UserError, match=r"cannot continue with these settings \(config.train.optimizer.name: "
                                         r"'adam' -> 'sgd'\): use another output_dir, or resume=off"):
        plan([*args, "train.optimizer.name=sgd", "resume=force"], 1, 0)
    with pytest.raises(UserError, match=r"step_00000004 is at step 4, past this run's last step, 3 \(train.epochs=2, "
                                         r"train.max_steps=3\): give it at least 4 steps, or resume=off"):
        plan([*args, "train.max_steps=3", "loss.gamma=0.5"], 1, 0)
    shorter = launch([*args, "loss.gamma=0.5", "resume=force", "train.max_steps=null", "train.epochs=1",
                      "data.batch_size=1000"], check=False)  # 1 step per epoch: known once the data is
    assert shorter.returncode == 2, shorter.stderr
    assert "is at step 4, past this run's last step, 1 (train.epochs=1, train.max_steps=None)" in shorter.stderr
    finished = {name: (tmp_path / name).read_bytes() for name in ("results.json", "predictions.npz", "config.yaml")}
    fresh = launch([*args, "resume=off"])
    assert "moved to" in fresh.stdout and "resuming from" not in fresh.stdout
    previous = tmp_path / "previous-2"
    assert (previous / "checkpoints").is_dir() and (previous / "metrics.jsonl").is_file()
    assert {name: (previous / name).read_bytes() for name in finished} == finished  # its results with their config
    assert last_step(tmp_path) == 2 and last_step(previous) == 4


@pytest.fixture(scope="module")
def stopped_by_sigterm(uninterrupted, tmp_path_factory) -> tuple[Path, int, str, int | None,
                                                                 subprocess.CompletedProcess]:
    """One process logging to W&B offline: SIGTERM after step 2, then the same command to the end. The run, the
    stopped process's exit code and stderr, the step it stopped at, the rerun."""
    run = tmp_path_factory.mktemp("sigterm")
    args = ["--config", "configs/demo.yaml", f"output_dir={run}", *RESUMABLE, "train.checkpoint_every=100",
            "train.max_steps=40", "train.epochs=3", "tracking.report_to=wandb",
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt"]
    process = start(args)
    wait_for_step(run, process, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stopped_at = read_manifest(found[-1])["step"] if (found := complete_checkpoints(run)) else None
    return run, process.returncode, stderr, stopped_at, launch(args)


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_75(stopped_by_sigterm):
    run, code, stderr, stopped_at, done = stopped_by_sigterm
    assert code == 75, stderr[-2000:]
    assert "stopped by a signal at step" in stderr
    assert stopped_at is not None and 2 <= stopped_at < 40
    assert f"(step {stopped_at})" in done.stdout and last_step(run) == 40


def test_a_stopped_run_is_preempted_in_wandb_and_its_rerun_continues_it_to_the_end(stopped_by_sigterm):
    """W&B's exit-code contract: the stop, exit 75 and marked preempting (a sweep's agent requeues it), then the rerun
    in the same W&B run, exit 0 (before, the stop ended it as finished)."""
    run, _, _, stopped_at, _ = stopped_by_sigterm
    stopped, resumed = wandb_runs(run)
    assert stopped["id"] == resumed["id"] == (run / "tracker_run_id").read_text().strip()
    assert (stopped["preempting"], stopped["exit_code"]) == (True, 75)
    assert (resumed["preempting"], resumed["exit_code"]) == (False, 0)
    assert max(stopped["steps"]) <= stopped_at < min(resumed["steps"]) and max(resumed["steps"]) == 40


def test_nonfinite_loss_stops_naming_student_step_and_term(uninterrupted, tmp_path):
    args = ["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY, "train.max_steps=30",
            "train.checkpoint_every=1", "train.optimizer={name: sgd, lr: 1.0e+12}", "tracking.report_to=wandb",
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt"]
    done = launch(args, check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    assert [(r["preempting"], r["exit_code"]) for r in wandb_runs(tmp_path)] == [(False, 3)]  # failed, not finished
    message = done.stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"dist-tsp: non-finite \S+ loss for student \S+ at step (\d+): stopping; the last good "
                         r"checkpoint (\S+) is kept \(.*\)", message)
    assert found, message
    kept = complete_checkpoints(tmp_path)  # one per step before the blow-up, none at or after it
    assert kept and str(kept[-1]) == found[2] and read_manifest(kept[-1])["step"] == int(found[1]) - 1, message


def test_a_checkpoint_file_one_rank_finds_truncated_stops_every_rank_with_one_line_naming_it(uninterrupted, tmp_path):
    """Rank 1 alone reads alexnet's file: every rank exits 2 with rank 0's one line, and the run is left as it was
    (rank 0 read its own files well, and writes nothing: no W&B run is started or continued for a refused resume)."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    broken = run / "checkpoints" / "step_00000012" / "students" / "alexnet.pt"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    before = snapshot(run)
    done = launch(["--config", "configs/demo.yaml", f"output_dir={run}", *RESUMABLE, "tracking.report_to=wandb"],
                  processes=3, check=False, launcher="dist-tsp")
    assert done.returncode == 2, done.stderr[-3000:]
    line = rf"dist-tsp: error: rank 1: student alexnet checkpoint {broken} cannot be read \(.*\): it is truncated"
    assert re.fullmatch(line + r"[^\n]*\n", done.stderr), done.stderr[-3000:]
    assert snapshot(run) == before


def test_a_partial_checkpoint_directory_is_never_resumed(uninterrupted, tmp_path):
    (tmp_path / "checkpoints" / "step_00000099.partial" / "students").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000099.partial" / "students" / "lenet.pt").write_bytes(b"half")
    assert complete_checkpoints(tmp_path) == []
    assert [d.name for d in complete_checkpoints(uninterrupted)][-1] == "step_00000012"


def _resume_on_this_rank(run_dirs: list[Path]) -> int | str:
    """The step this rank's Checkpointer resumes from (with no students: where it stops is the choice), or what it
    says."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate import Accelerator

    from dist_tsp.checkpointer import Checkpointer
    from dist_tsp.config import load_config
    from dist_tsp.data import load_dataset
    from dist_tsp.graph import TeachingGraph
    from dist_tsp.placement import Placement
    from dist_tsp.shared_errors import SharedUserError
    from dist_tsp.tracking import Tracker

    rank = dist.get_rank()
    cfg = load_config("configs/demo.yaml", [f"output_dir={run_dirs[rank]}", *RESUMABLE])
    accelerator = Accelerator(cpu=True)
    checkpointer = Checkpointer(cfg, Placement(world_size=3, rank=rank, num_students=3), TeachingGraph.from_config(cfg),
                                None, None, Tracker(cfg, accelerator), accelerator,
                                load_dataset(cfg.data, cfg.seed).identity(), steps_per_epoch=8, total_steps=12)
    try:
        return checkpointer.resume([], SimpleNamespace())
    except SharedUserError as error:
        return str(error)


def test_ranks_that_find_another_latest_checkpoint_than_rank_0_are_refused_on_every_rank(uninterrupted, tmp_path):
    """A node whose output_dir is its own (not the shared one) finds no checkpoint, or an older one: it would start
    from another step than the others."""
    shared = shutil.copytree(uninterrupted, tmp_path / "shared")
    assert run_on_ranks(_resume_on_this_rank, 3, [shared] * 3) == [12] * 3
    older = shutil.copytree(shared, tmp_path / "older")
    shutil.rmtree(older / "checkpoints" / "step_00000012")
    said = run_on_ranks(_resume_on_this_rank, 3, [shared, tmp_path / "own", older])
    assert len(set(said)) == 1, said
    run_id = read_manifest(shared / "checkpoints" / "step_00000012")["tracker_run_id"]
    fix = "output_dir must be one directory every node sees, on a shared filesystem"
    assert said[0] == (f"ranks 1, 2 would resume from a checkpoint other than rank 0's (none; rank 0: step_00000012 of "
                       f"run {run_id}): {fix}")
    # another run's checkpoint of the same step and settings (a node's own output_dir left from an earlier run)
    another = shutil.copytree(shared, tmp_path / "another")
    manifest = another / "checkpoints" / "step_00000012" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tracker_run_id": "0123456789ab"}))
    said = run_on_ranks(_resume_on_this_rank, 3, [shared, shared, another])
    assert said == [f"rank 2 would resume from a checkpoint other than rank 0's (step_00000012 of run 0123456789ab; "
                    f"rank 0: step_00000012 of run {run_id}): {fix}"] * 3


WRITER = """
import sys, torch
from pathlib import Path
from dist_tsp.checkpoint import save_atomic
version = 0
while True:
    version += 1
    save_atomic({"model": {"w": torch.full((4_000_000,), float(version))}, "version": version}, Path(sys.argv[1]))
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "student.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.3, 1.5))  # lands inside a 16 MB write most of the time
    writer.kill()
    writer.wait()
    saved = load(path, "student")
    assert saved["version"] >= 1 and bool((saved["model"]["w"] == saved["version"]).all())


def test_a_second_run_in_the_output_dir_of_a_run_still_training_is_refused_in_one_line(uninterrupted, tmp_path):
    """A command started twice: before, both went on writing their checkpoints into the same folders."""
    run = tmp_path / "run"
    args = ["--config", "configs/demo.yaml", f"output_dir={run}", *RESUMABLE,
            f"teacher.checkpoint={uninterrupted}/teacher/model.pt"]
    first = start(args, pause_after_checkpoint=step_dir(run, 2))
    deadline = time.monotonic() + 300
    while process_state(first.pid) != "T":  # stopped once its checkpoint of step 2 is complete
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    before = snapshot(run)
    second = launch(args, check=False)
    kill_run(first, run)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"dist-tsp: error: output_dir {run} is in use by another run (its process holds the folder's lock): wait for "
        "that run to end, or give this one another output_dir")
    assert snapshot(run) == before
