"""The sbatch templates in slurm/ on a real Slurm cluster brought up on this machine (two emulated nodes).

CPU config and the embedded digits dataset; one teacher, trained by slurm/teacher.sh, serves every job.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from dist_tsp.checkpoint import complete_checkpoints
from dist_tsp.config import load_config
from tests.runs import ENV, ROOT, TINY, last_step, train_rows
from tests.slurm_cluster import LocalSlurm, unavailable
from tests.test_bad_inputs import image_folder

WHY_NOT = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]
STEPS = 30  # long enough to signal a run between two steps
RUNNING = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


@pytest.fixture(scope="module")
def cluster():
    slurm = LocalSlurm(nodes=2)
    slurm.start()
    yield slurm
    slurm.stop()
    assert all(daemon.poll() is not None for daemon in slurm.daemons.values())


class Job:
    """`sbatch --wait` of a template, from the repository root, logging to `log_dir`."""

    def __init__(self, cluster: LocalSlurm, log_dir: Path, script: str, *args: str, options: tuple[str, ...] = (),
                 processes_per_node: int = 3, path: Path | None = None):
        """`path`: a folder whose programs come first on the job's PATH."""
        self.cluster, self.log_dir = cluster, log_dir
        command = ["sbatch", "--wait", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1",
                   f"--output={log_dir}/slurm-%A_%a.out", *options, f"slurm/{script}", *args]
        env = {**ENV, **cluster.env, "PROCESSES_PER_NODE": str(processes_per_node)}
        if path is not None:
            env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.id = self.process.stdout.readline().strip()
        assert self.id.isdigit(), f"sbatch refused the job: {self.process.communicate()[1]}"

    def wait(self, timeout: float = 300) -> int:
        """sbatch --wait's exit code: the batch script's (the highest over an array's tasks)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run("scancel", self.id, check=False)
            raise AssertionError(f"job {self.id} still running after {timeout} s\n{self!r}") from None

    def __repr__(self) -> str:
        """For failed assertions: sbatch's answer, the job log's tail and what the daemons said about the job."""
        stderr = self.process.stderr.read() if self.process.poll() is not None else ""
        return (f"job {self.id}: sbatch exit {self.process.returncode} {stderr.strip()}\n{self.log()[-3000:]}\n"
                f"{self.cluster.job_log_lines(self.id)[-3000:]}")

    def state_when(self, done, timeout: float = 300) -> dict[str, str]:
        """Poll `scontrol show job` until `done(state)`; return that state."""
        deadline = time.monotonic() + timeout
        while not done(state := self.cluster.job(self.id)):
            assert time.monotonic() < deadline, f"job {self.id} is {state['JobState']} after {timeout} s\n{self!r}"
            time.sleep(0.2)
        return state

    def release(self, deadline: float) -> None:
        """Start a requeued job now, not after Slurm's 2-minute hold, once its new run cannot be taken for the first:
        the first run's processes are gone and the clock is past the second of the requeue (SubmitTime). slurmd
        refuses a launch credential stamped, in whole seconds, no later than the first run's kill request ("Job N
        already killed, do not launch batch job"); slurmctld made that request before it set SubmitTime."""
        while job_processes(self.id):
            assert time.monotonic() < deadline, job_processes(self.id)
            time.sleep(0.2)
        requeued = datetime.fromisoformat(self.cluster.job(self.id)["SubmitTime"]).timestamp()
        while time.time() < requeued + 1:
            time.sleep(0.05)
        self.cluster.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob(f"slurm-{self.id}_*.out")))


def run_args(teacher: Path, *extra: str) -> list[str]:
    """peer.sh's arguments: the demo config, TINY, STEPS steps, the shared teacher."""
    return ["configs/demo.yaml", *TINY, f"train.max_steps={STEPS}", f"teacher.checkpoint={teacher}", *extra]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def teacher(cluster, tmp_path_factory):
    """slurm/teacher.sh on one node: the teacher every other job loads."""
    where = tmp_path_factory.mktemp("teacher")
    job = Job(cluster, where, "teacher.sh", *run_args(where / "teacher.pt"), processes_per_node=1)
    assert job.wait() == 0, job
    return where / "teacher.pt", job


@pytest.fixture(scope="module")
def one_node(cluster, teacher, tmp_path_factory):
    """slurm/peer.sh on one node, one process (all three students), submitted without waiting: it runs beside the
    preemption test's job, whose uninterrupted reference it is."""
    where = tmp_path_factory.mktemp("one_node")
    return where / "run", Job(cluster, where, "peer.sh", *run_args(teacher[0], f"output_dir={where / 'run'}"),
                              processes_per_node=1)


def peer_job_at_step_2(cluster, teacher, tmp_path) -> tuple[Path, list[str], Job, float]:
    """A one-process-per-node peer.sh job once it has logged step 2: its run, its arguments, the job, a deadline."""
    run = tmp_path / "run"
    args = run_args(teacher[0], f"output_dir={run}")
    job = Job(cluster, tmp_path, "peer.sh", *args, processes_per_node=1)
    deadline = time.monotonic() + 180
    while last_step(run) < 2:
        assert job.process.poll() is None and time.monotonic() < deadline, job
        time.sleep(0.1)
    return run, args, job, deadline


@pytest.mark.parametrize("to", ["the batch shell", "the workers alone"])
def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_results(cluster, teacher, one_node, tmp_path, to):
    run, _, job, deadline = peer_job_at_step_2(cluster, teacher, tmp_path)
    if to == "the batch shell":
        cluster.run("scancel", "--batch", "--signal=USR1", job.id)  # what #SBATCH --signal=B:USR1@N sends
    else:
        for pid, cmdline, _ in job_processes(job.id):
            if b"dist_tsp/train.py" in cmdline:
                os.kill(pid, signal.SIGUSR1)
    requeued = job.state_when(lambda state: state["JobState"] not in ("RUNNING", "COMPLETING"))
    assert (requeued["JobState"], requeued["Restarts"]) == ("PENDING", "1"), job
    stopped_at = json.loads((complete_checkpoints(run)[-1] / "manifest.json").read_text())["step"]
    job.release(deadline)
    # Followed with scontrol: Slurm 22.05's sbatch --wait may return 1 while a job requeues itself.
    final = job.state_when(lambda state: state["JobState"] not in RUNNING)
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), job
    job.process.wait(30)
    log = job.log()
    assert ("USR1: checkpointing after the next step, then requeueing" in log) == (to == "the batch shell")
    assert "restart 1:" in log
    assert re.search(rf"resuming from \S+ \(step {stopped_at}\)", log) and 2 <= stopped_at < STEPS
    reference, reference_job = one_node
    assert reference_job.wait() == 0, reference_job
    assert results(run)["students"] == results(reference)["students"]
    assert train_rows(run) == train_rows(reference)


def test_scancel_checkpoints_without_a_requeue_and_the_same_command_resumes(cluster, teacher, one_node, tmp_path):
    run, args, job, deadline = peer_job_at_step_2(cluster, teacher, tmp_path)
    cluster.run("scancel", job.id)  # as preemption does: SIGTERM to the batch shell and every step, SIGKILL later
    job.wait()  # as soon as the job is cancelled, with 0: its processes are still stopping
    while job_processes(job.id):
        assert time.monotonic() < deadline, job_processes(job.id)
        time.sleep(0.2)
    assert cluster.job(job.id)["Restarts"] == "0", job  # scancel is not undone by a requeue
    stopped_at = json.loads((complete_checkpoints(run)[-1] / "manifest.json").read_text())["step"]
    log = job.log()
    assert "dist-tsp: TERM: the workers stopped (exit 75): rerun the same command to resume" in log, job
    assert "Traceback" not in log and "Killed" not in log and 2 <= stopped_at < STEPS
    again = Job(cluster, tmp_path, "peer.sh", *args, processes_per_node=1)
    assert again.wait() == 0, again
    assert re.search(rf"resuming from \S+ \(step {stopped_at}\)", again.log())
    reference, reference_job = one_node
    assert reference_job.wait() == 0, reference_job
    assert results(run)["students"] == results(reference)["students"]
    assert train_rows(run) == train_rows(reference)


def test_term_to_the_batch_shell_alone_checkpoints_and_the_job_exits_75(cluster, teacher, tmp_path):
    run, _, job, _ = peer_job_at_step_2(cluster, teacher, tmp_path)
    cluster.run("scancel", "--batch", "--signal=TERM", job.id)  # srun, had it been passed TERM, would kill the step
    assert job.wait() == 75, job
    stopped_at = json.loads((complete_checkpoints(run)[-1] / "manifest.json").read_text())["step"]
    log = job.log()
    assert f"dist-tsp: stopped by a signal at step {stopped_at}; checkpoint written" in log, job
    assert "Killed" not in log and "restart 1:" not in log


def test_one_node_job_writes_complete_results(one_node):
    run, job = one_node
    assert job.wait() == 0, job
    assert set(results(run)["students"]) == {"lenet", "alexnet", "mobilenet"}
    assert last_step(run) == STEPS
    assert "1 node(s) x 1 processes" in job.log()


def test_teacher_job_trains_the_teacher_once_for_every_student_job(teacher, one_node):
    path, job = teacher
    assert path.is_file() and "teacher resnet_cifar: test accuracy" in job.log()
    assert one_node[1].wait() == 0 and f"teacher: loading {path}" in one_node[1].log()


def test_two_node_job_places_one_replica_of_every_student_on_each_node(cluster, teacher, tmp_path):
    """Streaming an image folder, which each node's first rank lists for the node's others: a node is the ranks
    that torchrun's GROUP_RANK says are one launcher's."""
    images = image_folder(tmp_path / "images", 10, per_class=8)
    args = run_args(teacher[0], "train.max_steps=4", f"output_dir={tmp_path / 'run'}", "data.name=image_folder",
                    f"data.root={images}")
    job = Job(cluster, tmp_path, "peer.sh", *args, options=("--nodes=2",))
    placement = {}
    while job.process.poll() is None:  # which node each rank's process runs on, read from the live processes
        placement.update(ranks_by_node(job.id))
        time.sleep(0.3)
    assert job.wait() == 0, job
    assert placement == {0: ("node1", b"0"), 1: ("node1", b"0"), 2: ("node1", b"0"), 3: ("node2", b"1"),
                         4: ("node2", b"1"), 5: ("node2", b"1")}, placement
    assert "node node2 is machine rank 1" in job.log()
    assert set(results(tmp_path / "run")["students"]) == {"lenet", "alexnet", "mobilenet"}


def ranks_by_node(job_id: str) -> dict[int, tuple[str, bytes | None]]:
    """{RANK: (SLURMD_NODENAME, GROUP_RANK)} of the training workers of `job_id` running now."""
    return {int(env[b"RANK"]): (env[b"SLURMD_NODENAME"].decode(), env.get(b"GROUP_RANK"))
            for _, cmdline, env in job_processes(job_id) if b"RANK" in env and b"dist_tsp/train.py" in cmdline}


def job_processes(job_id: str) -> list[tuple[int, bytes, dict[bytes, bytes]]]:
    """(pid, command line, environment) of every live process of a job: its slurmstepds and all they started."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() or cmdline.startswith(f"slurmstepd: [{job_id}.".encode()):
            found.append((int(proc.name), cmdline, env))
    return found


def test_array_sweep_collects_every_trial_into_one_table(cluster, teacher, tmp_path):
    sweep = tmp_path / "sweep"
    job = Job(cluster, tmp_path, "sweep.sh", "slurm/seeds.txt", str(sweep),
              *run_args(teacher[0], "train.max_steps=4"), options=("--array=1-3",),
              processes_per_node=1)
    assert job.wait() == 0, job
    with (sweep / "sweep.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [row["seed"] for row in rows] == ["0", "1", "2"]
    for number, row in enumerate(rows, 1):
        students = results(sweep / f"trial_{number}")["students"]
        tracking = load_config(sweep / f"trial_{number}" / "config.yaml").tracking  # W&B's run and group
        assert (tracking.run_name, tracking.group) == (f"trial_{number}", "sweep")
        assert {name: float(row[f"{name} test %"]) for name in students} == pytest.approx(
            {name: 100 * s["test_acc"] for name, s in students.items()})
    assert (sweep / "sweep.md").read_text().count("\n") == 2 + 3 and "| -" not in (sweep / "sweep.md").read_text()


def test_a_failing_task_fails_the_job_without_hanging(cluster, teacher, tmp_path):
    started = time.monotonic()
    # b fails its first step on rank 1: BatchNorm on one value per channel (1x1, one image)
    args = run_args(teacher[0], f"output_dir={tmp_path / 'run'}",
                    "students=[{name: a, model: lenet}, {name: b, model: resnet18}]", "data.batch_size=1")
    job = Job(cluster, tmp_path, "peer.sh", *args, options=("--nodes=2",), processes_per_node=1)
    assert job.wait() != 0
    assert time.monotonic() - started < 120  # nothing waited for train.collective_timeout_s (600 s)
    log = job.log()
    # its own exit, or srun's kill when the other node's task, whose rank saw it go, exits first (--kill-on-bad-exit)
    assert re.search(r"node2: task 1: (Exited with exit code 1|Terminated)", log), log[-3000:]
    assert "ValueError: Expected more than 1 value per channel when training" in log


def test_a_node_whose_task_fails_before_the_rendezvous_ends_the_job_at_once(cluster, teacher, tmp_path):
    """srun --kill-on-bad-exit=1 kills the other node's task, which waits for it in torchrun's rendezvous (without
    it, the job waits there until the rendezvous times out)."""
    broken = tmp_path / "bin" / "python3"  # node 1's Python cannot start (a node's broken environment)
    broken.parent.mkdir()
    broken.write_text('#!/bin/sh\nif [ "$SLURM_NODEID" = 1 ]; then echo "python3: broken on this node" >&2; exit 1\n'
                      f'fi\nexec {sys.executable} "$@"\n')
    broken.chmod(0o755)
    job = Job(cluster, tmp_path, "peer.sh", *run_args(teacher[0], f"output_dir={tmp_path / 'run'}"),
              options=("--nodes=2",), processes_per_node=1, path=broken.parent)
    assert job.wait(timeout=120) != 0  # seconds here; without --kill-on-bad-exit=1 it ran on past 240 s
    log = job.log()
    assert "python3: broken on this node" in log and "node2: task 1: Exited with exit code 1" in log, job
    assert re.search(r"node1: task 0: (Terminated|Killed)", log), job
