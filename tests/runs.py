"""Launching dist_tsp/train.py from tests: one process with python, or W CPU processes with `accelerate launch` or
dist-tsp-launch (`launcher="dist-tsp"`)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from dist_tsp.side_by_side import port_of_its_own

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "dist_tsp" / "train.py")
CPU3 = str(ROOT / "configs" / "accelerate" / "cpu.yaml")
DEEPSPEED = str(ROOT / "configs" / "accelerate" / "deepspeed.yaml")
TINY = [
    "students=[{name: lenet, model: lenet}, {name: alexnet, model: alexnet, args: {width: 0.25, hidden: 64}},"
    " {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}]",
    "data.batch_size=32", "teacher.args={depth: 8, width: 8}", "teacher.epochs=1",
    "train.epochs=2", "train.max_steps=6", "train.log_every=1",
]


# PYTHONPATH: the launched runs import this checkout's dist_tsp, whichever one pip installed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@contextmanager
def one_thread() -> Iterator[None]:
    """The launched runs' and the test ranks' thread count (one), so that a computation here adds in their order:
    train-mode BatchNorm turns the last bits of another summation order into 1e-4 relative differences."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


LAUNCHERS = {"accelerate": "accelerate.commands.launch", "dist-tsp": "dist_tsp.launch"}


def command(args: list[str], processes: int | None = None, accelerate_config: str = CPU3,
            launcher: str = "accelerate") -> list[str]:
    """`python dist_tsp/train.py ARGS`, or `accelerate launch --num_processes W ... ARGS` (or dist-tsp-launch)."""
    if processes is None:
        return [sys.executable, TRAIN, *args]
    return [sys.executable, "-m", LAUNCHERS[launcher], "--config_file", accelerate_config,
            "--num_processes", str(processes), *port_of_its_own(), TRAIN, *args]


def start(args: list[str], processes: int | None = None, launcher: str = "accelerate",
          pause_after_checkpoint: Path | None = None, accelerate_config: str = CPU3) -> subprocess.Popen:
    """Start a run in its own process group. With `pause_after_checkpoint` (a checkpoint directory), the process
    that completes that checkpoint stops itself right after (tests/pause_after_checkpoint)."""
    env = ENV
    if pause_after_checkpoint is not None:
        env = {**ENV, "PAUSE_AFTER_CHECKPOINT": str(pause_after_checkpoint),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "pause_after_checkpoint"), ENV["PYTHONPATH"]])}
    return subprocess.Popen(command(args, processes, accelerate_config, launcher), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def launch(args: list[str], processes: int | None = None, check: bool = True, accelerate_config: str = CPU3,
           launcher: str = "accelerate") -> subprocess.CompletedProcess:
    """Run to the end; raise with the output tails unless it exits 0 (when `check`)."""
    done = subprocess.run(command(args, processes, accelerate_config, launcher), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def two_at_a_time(request, tmp_path_factory, test: Callable, run_case: Callable[[str, Path], object]) -> dict:
    """`run_case(case, folder)` for each case of the parametrized `test` that this session selected, each in a fresh
    folder, two at a time (a one-process run keeps one of two cores busy): {case: future}, for a module fixture."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == test.__name__]
    folders = {case: tmp_path_factory.mktemp("case") for case in selected}
    pool = ThreadPoolExecutor(2)
    futures = {case: pool.submit(run_case, case, folders[case]) for case in selected}
    pool.shutdown(wait=False)
    return futures


def said_lines(stderr: str) -> list[str]:
    """The lines dist-tsp said on stderr, each on a line of its own (one that follows a progress bar, which ends
    without a newline while it is drawn, is not one of them)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("dist-tsp")]


def no_room(mount: Path, then: str = "rerun the same command to resume from the last complete checkpoint") -> str:
    """What a write that finds no room on the file system at `mount` says."""
    return (f"no room left on the file system at {mount} (No space left on device): free space there (or raise this "
            f"user's quota), then {then}")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file's bytes, mode and mtime, and every folder's entries, mode and mtime, under `root`."""
    state = {}
    for folder, _, files in os.walk(root):
        stat = os.stat(folder)
        state[os.path.relpath(folder, root)] = (sorted(os.listdir(folder)), stat.st_mode, stat.st_mtime_ns)
        for name in files:
            path = Path(folder, name)
            stat = path.stat()
            state[str(path.relative_to(root))] = (path.read_bytes(), stat.st_mode, stat.st_mtime_ns)
    return state


def tensorboard_scalars(folder: Path) -> dict[str, set[int]]:
    """Each scalar tag in the TensorBoard event files below `folder`, with the steps it was written at."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, set[int]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, set()).update(event.step for event in accumulator.Scalars(tag))
    return scalars


WANDB_HEADER = b":W&B\xe1\xbe\x00"  # a .wandb file's first bytes: its name, magic number and version
WANDB_BLOCK = 32768  # then LevelDB's log layout: blocks of chunks, each after a 7-byte header
WHOLE, LAST = 1, 4  # chunk types: a whole record, or the last part of one (2 and 3: its first and middle parts)


def wandb_records(path: Path) -> Iterator:
    """The records (protobuf messages) of an offline W&B run's .wandb file, which wandb has no Python reader for. A
    chunk's header: checksum, length, type; a block's last bytes, too few for a header, are padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(WANDB_HEADER), f"{path} is not a .wandb file"
    position, record = len(WANDB_HEADER), b""
    while position + 7 <= len(data):
        if (left := WANDB_BLOCK - position % WANDB_BLOCK) < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        record += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (WHOLE, LAST):
            yield Record.FromString(record)
            record = b""


def wandb_runs(run: Path) -> list[dict]:
    """Each offline W&B run in run/wandb, oldest first: its id, the steps in its history, whether it was marked
    preempting, and its exit code (None: never finished)."""
    runs = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        log = next(folder.glob("run-*.wandb"))  # run-<id>.wandb (a folder started in the same second ends in "-1")
        records = list(wandb_records(log))
        exits = [r.exit.exit_code for r in records if r.HasField("exit")]
        runs.append({"id": log.stem.removeprefix("run-"),
                     "steps": {r.history.step.num for r in records if r.HasField("history")},
                     "preempting": any(r.HasField("preempting") for r in records),
                     "exit_code": exits[-1] if exits else None})
    return runs


def train_rows(run: Path) -> list[dict]:
    """metrics.jsonl's training rows (those with a student's training loss)."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if any(key.startswith("train/") and key.endswith("/loss") for key in r)]


def last_step(run: Path) -> int:
    """The highest step logged so far (0 before the first row)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()), default=0)


def worker_pids(run: Path) -> dict[int, int]:
    """{rank: pid} of the worker processes training into `run`."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(run).encode() not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")]
        if ranks:
            pids[ranks[0]] = int(proc.name)
    return pids


def rank_pid(run: Path, rank: int) -> int | None:
    """The worker process with RANK=<rank> training into `run`."""
    return worker_pids(run).get(rank)


def process_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (R running, S sleeping, T stopped, Z zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def kill_run(process: subprocess.Popen, run: Path, timeout: float = 60) -> None:
    """SIGKILL a launched run: the launcher's process group and every worker, which torchrun starts in sessions of
    their own (a signal to the launcher's group misses them); return once none is left."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + timeout
    while pids := list(worker_pids(run).values()):
        assert time.monotonic() < deadline, f"workers {pids} outlived SIGKILL"
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def student_state(run: Path, step: int, name: str) -> dict:
    import torch

    from dist_tsp.checkpoint import step_dir, student_file

    return torch.load(student_file(step_dir(run, step), name), weights_only=True)
