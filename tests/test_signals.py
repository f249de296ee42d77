"""Signals as a cluster sends them, on 3 ranks through dist-tsp-launch: SIGTERM or SIGUSR1 to the workers only, to the
launcher only, or to every process of the run (Slurm's preemption). Every form ends with a complete checkpoint before
the launcher returns, exit 75 and one line, within 30 s of the signal even with no log step in sight, and a rerun
that ends bitwise equal to a run that was never stopped."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from dist_tsp import train
from dist_tsp.checkpoint import complete_checkpoints, read_manifest
from dist_tsp.errors import INTERRUPTED, INTERRUPTED_EXIT_CODE
from dist_tsp.launch import TERM_GRACE_S
from dist_tsp.placement import Groups, Placement
from dist_tsp.run_control import StopRequest, StopVote
from dist_tsp.side_by_side import port_of_its_own
from tests.multiprocess import run_on_ranks
from tests.runs import (
    CPU3,
    ENV,
    ROOT,
    TINY,
    launch,
    rank_pid,
    start,
    student_state,
    tensorboard_scalars,
    train_rows,
    wandb_runs,
)

pytestmark = pytest.mark.slow
STEPS = 40  # inside the first epoch (44 steps of digits): no epoch end before the last step
ARGS = ["--config", "configs/demo.yaml", *TINY, f"train.max_steps={STEPS}", "train.log_every=1000",
        "train.optimizer.schedule=cosine"]  # one log step, the last: a signal never waits for one
STUDENTS = ("lenet", "alexnet", "mobilenet")
PROGRESS = re.compile(rf"students:.*\b(\d+)/{STEPS}\b")
TEACHER_PROGRESS = re.compile(r"teacher:.*\b(\d+)/\d+\b")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    launch([*ARGS, f"output_dir={run}"], processes=3, launcher="dist-tsp")
    return run


class Watched:
    """A dist-tsp-launch run on 3 ranks, its output read as it comes (rank 0's progress bar tells the step)."""

    def __init__(self, run, args: list[str]):
        self.run = run
        self.process = start([*args, f"output_dir={run}"], processes=3, launcher="dist-tsp")
        self.stdout, self.stderr = [], []
        self.readers = [threading.Thread(target=lines.extend, args=(stream,), daemon=True)
                        for lines, stream in ((self.stdout, self.process.stdout), (self.stderr, self.process.stderr))]
        for reader in self.readers:
            reader.start()

    @classmethod
    def students(cls, run, reference, *overrides: str) -> "Watched":
        """The students' run of ARGS, with the reference's teacher."""
        return cls(run, [*ARGS, f"teacher.checkpoint={reference}/teacher/model.pt", *overrides])

    def step(self, progress: re.Pattern = PROGRESS) -> int:
        return max((int(m[1]) for line in list(self.stderr) if (m := progress.search(line))), default=0)

    def wait_until(self, ready, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process.poll() is None, "".join(self.stderr)[-3000:]
            assert time.monotonic() < deadline, f"not ready within {timeout} s"
            time.sleep(0.05)

    def workers(self) -> list[int]:
        return [pid for rank in range(3) if (pid := rank_pid(self.run, rank)) is not None]

    def wait(self) -> tuple[int, float, str]:
        """Exit code, seconds since this call, stderr."""
        started = time.monotonic()
        code = self.process.wait(timeout=120)
        took = time.monotonic() - started
        for reader in self.readers:
            reader.join(10)
        return code, took, "".join(self.stderr)


def deliver(watched: Watched, form: str, signum: signal.Signals) -> None:
    """To the workers, to the launcher, or to all: the launcher's process group (it and torchrun's agent) and every
    worker, as Slurm does; torchrun starts each worker in a session of its own."""
    if form == "launcher":
        watched.process.send_signal(signum)
    if form == "all":
        os.killpg(watched.process.pid, signum)
    if form in ("workers", "all"):
        for pid in watched.workers():
            os.kill(pid, signum)


def assert_stopped_in_one_line(code: int, stderr: str, step: int) -> None:
    assert code == 75, stderr[-3000:]
    message = f"dist-tsp: stopped by a signal at step {step}; checkpoint written: rerun the same command to resume"
    assert stderr.strip().splitlines()[-1] == message, stderr[-3000:]
    assert "Traceback" not in stderr and "Root Cause" not in stderr and stderr.count("dist-tsp:") == 1


def assert_bitwise_equal(run, reference) -> None:
    for name in STUDENTS:
        a, b = student_state(reference, STEPS, name), student_state(run, STEPS, name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
        for key, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][key][k]) for k, v in state.items()), name
    assert train_rows(run) == train_rows(reference)
    results = [json.loads((r / "results.json").read_text())["students"] for r in (reference, run)]
    assert results[0] == results[1]


VOTE_TIMEOUT_S = 3


def _votes(requesting_rank: int) -> tuple[str, list[bool], float | None]:
    """Four steps' stop votes on this rank, `requesting_rank` asked to stop in the middle of the second; then a fifth
    vote that rank 2 never casts: after how many seconds the others' raised (None on rank 2). The groups are made with
    a start-up timeout and set to the students' one, as a run does."""
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=3)
    groups = Groups.from_mesh(placement.build_mesh("cpu"), timedelta(minutes=30))
    groups.set_timeout(timedelta(seconds=VOTE_TIMEOUT_S))
    requested = StopRequest()
    vote, agreed = StopVote(requested, groups.control), []
    for step in range(4):
        vote.start()
        if step == 1 and dist.get_rank() == requesting_rank:
            requested.set()
        agreed.append(vote.result())
    if dist.get_rank() == 2:
        time.sleep(VOTE_TIMEOUT_S + 5)  # alive and silent, as a stuck rank
        return dist.get_backend(groups.control), agreed, None
    vote.start()
    started = time.monotonic()
    try:
        vote.result()
    except RuntimeError:
        return dist.get_backend(groups.control), agreed, time.monotonic() - started
    return dist.get_backend(groups.control), agreed, None


@pytest.fixture(scope="module")
def votes():
    return run_on_ranks(_votes, 3, 2)


NESTED_SIGNALS = """
import os, signal, sys
from dist_tsp.train import stop_on_signals

depth, sent = 0, 0

def tracer(frame, event, arg):
    global sent
    if event == "line" and depth > 0 and sent < 50:  # inside the handler: one more signal at every line it runs
        sent += 1
        os.kill(os.getpid(), signal.SIGUSR1)
    return tracer

with stop_on_signals() as requested:
    handler = signal.getsignal(signal.SIGUSR1)

    def counted(*args):
        global depth
        depth += 1
        try:
            handler(*args)
        finally:
            depth -= 1

    signal.signal(signal.SIGUSR1, counted)
    sys.settrace(tracer)
    os.kill(os.getpid(), signal.SIGUSR1)
    for _ in range(1000):
        pass
    sys.settrace(None)
print(f"{sent} nested; stop requested: {requested.is_set()}")
"""


def test_a_stop_signal_arriving_while_the_handler_runs_neither_hangs_nor_recurses():
    """Another SIGUSR1 at every line the handler runs. With threading.Event.set as the handler, the nested call
    waited forever on the lock the outer call held, every further signal nesting one more handler (a RecursionError
    after minutes in a Slurm job, where the launcher repeats the signal every second)."""
    done = subprocess.run([sys.executable, "-c", NESTED_SIGNALS], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and re.fullmatch(r"[1-9]\d* nested; stop requested: True", done.stdout.strip()), \
        done.stderr[-2000:]


def test_every_rank_agrees_to_stop_after_the_step_that_follows_a_signal_to_one_of_them(votes):
    assert [(backend, agreed) for backend, agreed, _ in votes] == [("gloo", [False, False, True, True])] * 3


def test_a_rank_that_stops_voting_makes_the_others_raise_after_the_collective_timeout(votes):
    raised_after = [seconds for _, _, seconds in votes[:2]]
    assert all(seconds is not None and VOTE_TIMEOUT_S - 0.5 < seconds < VOTE_TIMEOUT_S + 3 for seconds in raised_after)


def test_a_stop_signal_during_the_last_step_lets_the_run_end_as_if_none_had_come(reference, tmp_path):
    """Nothing is left to resume: the run writes its results and ends well (not exit 75, a requeue for nothing)."""
    metrics, answered = tmp_path / "metrics.jsonl", []

    class DuringTheLastStep(StopRequest):  # as the last step starts (its vote is cast): the run logs every step
        def is_set(self) -> bool:
            answered.append(metrics.is_file() and '"step": 3,' in metrics.read_text())
            return answered[-1]

    train.main([*ARGS, "train.max_steps=4", "train.log_every=1", f"output_dir={tmp_path}",
                f"teacher.checkpoint={reference}/teacher/model.pt"], DuringTheLastStep())
    assert answered[-1]
    assert json.loads((tmp_path / "results.json").read_text())["students"].keys() == set(STUDENTS)
    assert [read_manifest(d)["step"] for d in complete_checkpoints(tmp_path)] == [4]


FORMS = {"workers": signal.SIGTERM, "launcher": signal.SIGUSR1, "all": signal.SIGTERM}


@pytest.fixture(scope="module")
def stopped(reference, tmp_path_factory) -> tuple[Path, dict[str, dict], subprocess.CompletedProcess]:
    """One run stopped four times, each rerun resuming from the stop before: by SIGUSR1 to the launcher while its
    workers start, then by each form of signal at least 3 steps after the last stop; then run to its end. The run,
    each stop's record and the last rerun."""
    run = tmp_path_factory.mktemp("stopped")
    stops, stopped_at = {}, 0
    for form in ("before the student phase", *FORMS):
        watched = Watched.students(run, reference)
        if form in FORMS:
            watched.wait_until(lambda: watched.step() >= stopped_at + 3)
            at = watched.step()
            deliver(watched, form, FORMS[form])
        else:
            watched.wait_until(lambda: len(watched.workers()) == 3)  # starting: they ignore it, and hear it later
            at = 0
            watched.process.send_signal(signal.SIGUSR1)
        code, took, stderr = watched.wait()
        stopped_at = read_manifest(complete_checkpoints(run)[-1])["step"]  # complete when the launcher returned
        stops[form] = {"code": code, "took": took, "stderr": stderr, "at": at, "stopped_at": stopped_at,
                       "workers left": watched.workers()}
    rerun = launch([*ARGS, f"output_dir={run}", f"teacher.checkpoint={reference}/teacher/model.pt"],
                   processes=3, launcher="dist-tsp")
    return run, stops, rerun


def test_a_signal_before_the_student_phase_stops_it_after_its_first_step(stopped):
    stop = stopped[1]["before the student phase"]
    assert_stopped_in_one_line(stop["code"], stop["stderr"], 1)


@pytest.mark.parametrize("form", FORMS)
def test_each_form_stops_every_rank_within_30_s_with_a_checkpoint(stopped, form):
    stop = stopped[1][form]
    assert stop["workers left"] == []  # none left to finish it later
    assert_stopped_in_one_line(stop["code"], stop["stderr"], stop["stopped_at"])
    assert stop["at"] < stop["stopped_at"] < STEPS and stop["took"] < 30, stop


def test_the_reruns_of_a_run_stopped_four_times_end_bitwise_equal_to_the_run_never_stopped(stopped, reference):
    run, stops, rerun = stopped
    assert f"(step {stops['all']['stopped_at']})" in rerun.stdout
    assert_bitwise_equal(run, reference)


def test_a_signal_after_a_nonfinite_loss_between_log_steps_stops_with_exit_3_and_no_checkpoint(reference, tmp_path):
    watched = Watched.students(tmp_path, reference, "train.optimizer={name: sgd, lr: 1.0e+12}")
    watched.wait_until(lambda: watched.step() >= 3)
    watched.process.send_signal(signal.SIGUSR1)
    code, _, stderr = watched.wait()
    assert code == 3, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("dist-tsp: non-finite ") and "Traceback" not in stderr
    assert complete_checkpoints(tmp_path) == []  # the signal's checkpoint would have kept the damage


def test_a_signal_while_the_teacher_trains_stops_every_rank_after_the_next_step_with_nothing_saved(tmp_path):
    """--teacher-only (the protocol's teacher run) on 3 ranks: the stop vote runs beside the teacher's steps too, so
    the launcher returns with 75 within seconds, before its grace for workers that never answer (before: they
    trained the teacher to its end, or were killed after the grace)."""
    watched = Watched(tmp_path, ["--teacher-only", *ARGS, "teacher.epochs=100"])
    watched.wait_until(lambda: watched.step(TEACHER_PROGRESS) >= 3)
    deliver(watched, "all", signal.SIGTERM)
    code, took, stderr = watched.wait()
    assert code == 75 and took < TERM_GRACE_S, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"dist-tsp: stopped by a signal at step \d+ of \d+ of the teacher's training, before it was "
                        r"saved: rerun the same command to train it again", last), stderr[-3000:]
    assert "Traceback" not in stderr and watched.workers() == []
    assert not (tmp_path / "teacher" / "model.pt").exists()


CACHE_PROGRESS = re.compile(r"teacher logits, epoch 0:.*\b(\d+)/\d+\b")


def test_a_signal_while_the_teachers_logits_are_cached_stops_every_rank_after_the_next_batch_leaving_no_file(
        reference, tmp_path):
    """teacher.mode=cached computes an epoch's logits before its first step (at ImageNet size, longer than a
    scheduler's grace): before, the workers went on until the launcher's grace ran out and stopped them, and the
    killed writer's temporary file stayed in the cache folder."""
    cache = tmp_path / "cache"
    watched = Watched.students(tmp_path / "run", reference, "teacher.mode=cached", f"teacher.cache_dir={cache}",
                               "data.eval_batch_size=2")
    watched.wait_until(lambda: watched.step(CACHE_PROGRESS) >= 3)
    deliver(watched, "all", signal.SIGTERM)
    code, took, stderr = watched.wait()
    assert code == 75 and took < TERM_GRACE_S, stderr[-3000:]
    assert re.fullmatch(r"dist-tsp: stopped by a signal at batch \d+ of \d+ of the teacher's logits for epoch 0, "
                        r"before they were saved: rerun the same command to resume from the last checkpoint",
                        stderr.strip().splitlines()[-1]), stderr[-3000:]
    assert "Traceback" not in stderr and watched.workers() == []
    assert [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith((".lock", "key.json"))] == []


TRACKED_STEPS = {"tensorboard": lambda run: tensorboard_scalars(run).get("train/lenet/loss", set()),
                 "wandb": lambda run: wandb_runs(run)[0]["steps"]}


@pytest.mark.parametrize("report_to", TRACKED_STEPS)
def test_ctrl_c_stops_every_rank_at_once_with_one_line_and_exit_130_its_logged_steps_in_the_tracker(reference,
                                                                                                   tmp_path, report_to):
    """Ctrl-C reaches the launcher's process group (it and torchrun's agent, which passes it to the workers): before,
    every rank's KeyboardInterrupt traceback (about 100 lines), TensorBoard's event file lacked the steps its writer
    still held (it writes every 2 minutes), and W&B's run ended as finished."""
    watched = Watched.students(tmp_path, reference, "train.log_every=1", f"tracking.report_to={report_to}")
    watched.wait_until(lambda: watched.step() >= 2)
    os.killpg(watched.process.pid, signal.SIGINT)
    code, took, stderr = watched.wait()
    assert code == INTERRUPTED_EXIT_CODE == 130 and took < 30, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"dist-tsp: {INTERRUPTED}", stderr[-3000:]
    assert "Traceback" not in stderr and "death signal" not in stderr and stderr.count("dist-tsp:") == 1
    assert watched.workers() == []
    logged = [row["step"] for row in train_rows(tmp_path)]
    shown = TRACKED_STEPS[report_to](tmp_path)
    assert len(logged) >= 2 and set(logged[:-1]) <= shown, (logged, shown)  # the last: Ctrl-C may come between
    if report_to == "wandb":
        assert [(r["preempting"], r["exit_code"]) for r in wandb_runs(tmp_path)] == [(False, 130)]


SLEEPER = "import time\ntime.sleep(600)\n"  # a worker that never answers a stop signal


@contextlib.contextmanager
def sleeping_launch(tmp_path, sleeper: str = SLEEPER) -> Iterator[tuple[psutil.Popen, list[psutil.Process]]]:
    """dist-tsp-launch of 2 workers that sleep, once its agent and both workers run: the launcher and those three;
    each killed at the end, if still there."""
    script = tmp_path / "sleeper.py"
    script.write_text(sleeper)
    launcher = psutil.Popen([sys.executable, "-m", "dist_tsp.launch", "--config_file", CPU3, "--num_processes", "2",
                             *port_of_its_own(), str(script)], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(started := processes_running(launcher, script)) < 3:  # the agent and its two workers
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        yield launcher, started
    finally:  # torchrun starts every worker in a session of its own
        for process in (launcher, *started):
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_sigterm_unanswered_by_the_workers_ends_the_launcher_within_30_seconds(tmp_path):
    with sleeping_launch(tmp_path) as (launcher, started):
        launcher.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        assert TERM_GRACE_S <= time.monotonic() - signalled < 30
        assert launcher.returncode == 75
        assert stderr.strip().splitlines()[-1].startswith(f"dist-tsp: SIGTERM: no checkpoint within {TERM_GRACE_S} s")
        assert "Traceback" not in stderr
        assert not still_running(started)


@pytest.mark.parametrize("answering", [True, False], ids=["workers that stop", "workers that never answer"])
def test_when_a_signal_ends_the_agent_its_workers_are_stopped_and_the_launcher_exits_128_plus_n(tmp_path, answering):
    """They would train on without it (torchrun starts them in sessions of their own): SIGTERM, as for a stop, then
    SIGKILL after the grace time. Exit 137 for SIGKILL (the kernel's out-of-memory killer most often), as a shell
    reports a process that a signal ended."""
    sleeper = f"import signal\nsignal.signal(signal.SIGTERM, signal.SIG_DFL)\n{SLEEPER}" if answering else SLEEPER
    with sleeping_launch(tmp_path, sleeper) as (launcher, started):
        (agent,) = launcher.children()
        agent.kill()
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        assert launcher.returncode == 128 + signal.SIGKILL
        assert (time.monotonic() - killed < 10) if answering else (TERM_GRACE_S <= time.monotonic() - killed < 40)
        assert not still_running(started)
        assert stderr.strip().splitlines()[-1] == (
            "dist-tsp: torchrun's agent was ended by SIGKILL (most often the kernel's out-of-memory killer), "
            f"so its workers were stopped{'' if answering else f' (killed: no checkpoint within {TERM_GRACE_S} s)'}: "
            "rerun the same command to resume from the last checkpoint")


def processes_running(launcher: psutil.Popen, script) -> list[psutil.Process]:
    """The launcher's descendants whose command line names `script`."""
    found = []
    for process in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(script) in process.cmdline():
                found.append(process)
    return found


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that still run (an ended one may wait as a zombie for its parent, gone too)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # reaped meanwhile
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running
