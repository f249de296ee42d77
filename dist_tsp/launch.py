"""`dist-tsp-launch` (`python -m dist_tsp.launch`): `accelerate launch` with the same arguments, for runs that a
scheduler stops with SIGTERM or SIGUSR1.

Under plain `accelerate launch`, torchrun's agent turns SIGTERM into a traceback and kills its workers 30 s later
whatever they are doing, and SIGUSR1 kills it. Here the agent ignores both, and this process passes them on to the
workers, which torchrun starts in sessions of their own (a signal to the launcher's process group misses them). They
stop together after their next step with a checkpoint. A deliberate stop (`RunStopped`: that one, or a non-finite loss)
reaches this process through a file, so the workers end with 0, torchrun reports no failure, and this process prints
the stop's one line and exits with its code (75: rerun to resume). A worker that exits once its error is said in one
line (bad input, exit 2; a lost loader worker or a collective's timeout, exit 1), by itself or by the rank that met
it, leaves a note beside that file: when every failed worker did, torchrun's failure report, which would follow as a
traceback, is left out, and this process exits with the first failure's code; otherwise the report names only the
workers whose failure no line said (a crash, a rank killed), without the agent's own traceback, and it exits 1. When
a signal ends the agent itself (the out-of-memory killer), its workers, which would train on without it, are stopped
as after SIGTERM, and this process exits 128 + N.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from dist_tsp.errors import Preempted, RunStopped, UserError, bad_option, not_a_file

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun --signals-to-handle: its default but SIGTERM (Ctrl-C stops at once)
STOP_FILE = "DIST_TSP_STOP_FILE"  # environment variable: where a worker leaves a deliberate stop for this launcher
SAID = "said-"  # beside it, said-<pid> holds the exit code of a worker whose error was said in one line
TERM_GRACE_S = 25  # after SIGTERM, the workers' time to checkpoint: inside Slurm's default KillWait (30 s)


HELP = ("dist-tsp-launch: accelerate launch, where SIGTERM or SIGUSR1 stops every worker after its next step with a "
        "checkpoint (exit 75: rerun the same command to resume); exit 2: bad input, said in one line; exit 3: a "
        "non-finite loss. The table under 'Launching' in README.md has every exit code. Its options are accelerate "
        "launch's:\n")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(HELP, flush=True)
    sys.exit(launch(args))


def launch(args: list[str]) -> int:
    """Run `accelerate launch ARGS` to its end; return its exit code, or the code of the workers' deliberate stop."""
    received: dict[int, float] = {}  # signal -> when it first came
    agent: subprocess.Popen | None = None

    def pass_on(signum: int, _frame: object) -> None:
        received.setdefault(signum, time.monotonic())
        if agent is not None:
            _send(_workers(stop_file, agent), signum)

    with tempfile.TemporaryDirectory(prefix="dist-tsp-launch-") as tmp:
        stop_file = Path(tmp) / "stop.json"
        for signum in STOP_SIGNALS:
            signal.signal(signum, pass_on)
        env = {**os.environ, STOP_FILE: str(stop_file), "PET_SIGNALS_TO_HANDLE": AGENT_SIGNALS}
        agent = subprocess.Popen([sys.executable, "-c", "from dist_tsp.launch import agent; agent()", *args],
                                 env=env, preexec_fn=_ignore_stop_signals)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent as well: it stops the workers
        code = _wait(agent, received, stop_file)
        if code is None:
            print(f"dist-tsp: SIGTERM: no checkpoint within {TERM_GRACE_S} s (still loading the data or the teacher?),"
                  " so the workers were stopped: rerun the same command to resume from the last checkpoint",
                  file=sys.stderr)
            return Preempted.exit_code
        if code == 0 and stop_file.is_file():
            stopped = json.loads(stop_file.read_text())
            print(f"dist-tsp: {stopped['message']}", file=sys.stderr)
            return stopped["exit_code"]
        return code


def agent() -> None:
    """The agent's process: `accelerate launch` with this process's arguments. When every worker that failed said
    why in one line (or another rank said it for them, see said_in_one_line), it exits with the first failure's code,
    without torchrun's report."""
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        check_launch(sys.argv[1:])
    except UserError as error:
        print(f"dist-tsp: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    for torchrun in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(torchrun).addFilter(_quiet)
    try:
        accelerate_launch()
    except ChildFailedError as failed:  # several workers (torchrun)
        said = _said()
        unsaid = {rank: failure for rank, failure in failed.failures.items()
                  if said.get(failure.pid) != failure.exitcode}
        if not unsaid:
            sys.exit(failed.get_first_failure()[1].exitcode)
        # torchrun's report of the failures no line has said (a crash, a rank killed), without the agent's traceback
        print(ChildFailedError(failed.name, unsaid).format_msg(), file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as failed:  # one worker, run without torchrun: its pid is not known
        if failed.returncode not in _said().values():
            raise
        sys.exit(failed.returncode)
    except SignalException as ended:  # Ctrl-C: torchrun's agent stopped the workers (accelerate >= 1.16 says so too)
        sys.exit(128 + ended.sigval)


def check_launch(args: list[str]) -> None:
    """UserError for launch arguments accelerate would meet with its usage, a traceback, or every worker with its own
    line: an option it does not know, an accelerate config file that is not there, fewer than 1 process, a port out
    of range, a mixed precision other than dist-tsp's, a script that is not there."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.error = bad_option  # one line, as dist-tsp's own options
    launch = parser.parse_args(args)
    if launch.config_file is not None:
        check_accelerate_config(Path(launch.config_file))
    if launch.num_processes is not None and launch.num_processes < 1:
        raise UserError(f"--num_processes {launch.num_processes}: give at least 1")
    if launch.main_process_port is not None and not 0 < launch.main_process_port < 2**16:
        raise UserError(f"--main_process_port {launch.main_process_port}: give a port from 1 to 65535")
    if launch.mixed_precision not in (None, "no", "bf16"):
        raise UserError(f"--mixed_precision {launch.mixed_precision}: dist-tsp trains in no (fp32) or bf16")
    script = Path(launch.training_script)
    if not (launch.module or launch.no_python) and not script.is_file():
        raise UserError(f"{script} {not_a_file(script)}: give the script to "
                        "launch, e.g. dist_tsp/train.py")


def check_accelerate_config(path: Path, option: str = "--config_file") -> None:
    """UserError unless `path`, given as `option`, is an accelerate config file that accelerate reads (as `accelerate
    launch` does)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.is_file():
        raise UserError(f"{option} {path} {not_a_file(path)}: give an "
                        "accelerate config, e.g. configs/accelerate/cpu.yaml or gpu.yaml")
    try:
        load_config_from_file(str(path))
    except Exception as error:  # yaml's, a decoding error, or accelerate's for settings it does not know
        why = " ".join(str(error).split())[:200]
        raise UserError(f"{option} {path} is not an accelerate config ({type(error).__name__}: {why}): give one "
                        "that `accelerate config` writes, e.g. configs/accelerate/cpu.yaml (a run's own config is "
                        "given with --config)") from None


def _quiet(record: logging.LogRecord) -> bool:
    """torchrun's log lines but those that a worker failed after its one line was said, that the others are closed
    after a failure (its report names every failure that was not said), and that Ctrl-C stops the workers (rank 0
    says it)."""
    message = record.getMessage()
    failed = re.match(r"failed \(exitcode: (-?\d+)\) local_rank: \d+ \(pid: (\d+)\)", message)
    return not ((failed and _said().get(int(failed[2])) == int(failed[1])) or
                (message.startswith("Sending process") and "closing signal" in message) or
                re.match(r"Received (2|Signals\.SIGINT|SIGINT) death signal", message))


def said_in_one_line(exit_code: int) -> None:
    """In a worker of dist-tsp-launch, about to exit with `exit_code` once its error was said in one line, by this
    rank or by the one that met it: a note for the agent, which leaves this worker out of torchrun's report."""
    from dist_tsp.checkpoint import write_text_atomic  # torch: in the worker only, never in the agent

    if path := os.environ.get(STOP_FILE):  # whole or absent: the agent reads the notes as the workers write them
        with contextlib.suppress(OSError):  # a full disk: the report names this worker too
            write_text_atomic(Path(path).parent / f"{SAID}{os.getpid()}", str(exit_code))


def _said() -> dict[int, int]:
    """In the agent: {pid: exit code} of the workers that said_in_one_line."""
    notes = Path(os.environ[STOP_FILE]).parent.glob(f"{SAID}*")
    return {int(note.name.removeprefix(SAID)): int(note.read_text()) for note in notes}


def hand_over(stopped: RunStopped) -> bool:
    """In a worker of dist-tsp-launch: leave a deliberate stop to the launcher, which reports it once with its exit
    code (True); False under any other launcher."""
    path = os.environ.get(STOP_FILE)
    if not path:
        return False
    from dist_tsp.checkpoint import write_text_atomic  # not at the top: the launcher itself never imports torch

    # every rank of the node writes the same record, atomically
    write_text_atomic(Path(path), json.dumps({"exit_code": stopped.exit_code, "message": str(stopped)}))
    return True


def _ignore_stop_signals() -> None:
    """In the agent, before it starts: SIGTERM and SIGUSR1 are this launcher's to pass on (its workers inherit the
    disposition until train.py installs its handlers, and the launcher says it again until they have)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _wait(agent: subprocess.Popen, received: dict[int, float], stop_file: Path) -> int | None:
    """The agent's exit code (128 + N when signal N ended it, its workers then stopped), passing every stop signal
    received on to the workers once a second until then; None when they were still running TERM_GRACE_S after
    SIGTERM and were killed."""
    while True:
        try:
            code = agent.wait(timeout=1)
            if code < 0:
                _stop_orphaned(_workers(stop_file, agent), signal.Signals(-code).name)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        terminated = received.get(signal.SIGTERM)
        if terminated is not None and time.monotonic() - terminated > TERM_GRACE_S:
            _kill(agent, stop_file)
            return None
        for signum in list(received):
            _send(_workers(stop_file, agent), signum)


def _workers(stop_file: Path, agent: subprocess.Popen) -> list[psutil.Process]:
    """The workers of this launch, the agent's children while it runs and orphans once it has gone: the processes but
    the agent whose environment holds this launch's stop file, and not their own children (loader workers, compile
    workers, which their worker stops)."""
    launched = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != agent.pid and process.environ().get(STOP_FILE) == str(stop_file):
                launched[process.pid] = process
    workers = []
    for process in launched.values():
        with contextlib.suppress(psutil.Error):
            if process.ppid() not in launched:
                workers.append(process)
    return workers


def _send(processes: list[psutil.Process], signum: int) -> None:
    """Signal each of `processes` that is still there."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def _kill_all(processes: list[psutil.Process]) -> None:
    _send(processes, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)


def _stop_orphaned(workers: list[psutil.Process], ended_by: str) -> None:
    """Stop the workers of an agent that a signal ended (they would train on without it, and nothing would stop them):
    SIGTERM once a second, so that they stop after their next step with a checkpoint, and SIGKILL after TERM_GRACE_S;
    then say so in one line."""
    deadline = time.monotonic() + TERM_GRACE_S
    while (alive := [w for w in workers if _running(w)]) and time.monotonic() < deadline:
        _send(alive, signal.SIGTERM)
        psutil.wait_procs(alive, timeout=1)
    _kill_all(alive)
    likely = " (most often the kernel's out-of-memory killer)" if ended_by == "SIGKILL" else ""
    killed = f" (killed: no checkpoint within {TERM_GRACE_S} s)" if alive else ""
    stopped = f", so its workers were stopped{killed}" if workers else ""
    print(f"dist-tsp: torchrun's agent was ended by {ended_by}{likely}{stopped}: rerun the same command to resume from "
          "the last checkpoint", file=sys.stderr)


def _running(process: psutil.Process) -> bool:
    """Whether `process` still runs (an exited orphan may wait as a zombie for a parent that never reaps it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(agent: subprocess.Popen, stop_file: Path) -> None:
    """SIGKILL the agent, then its workers: the agent first, so that it reports nothing."""
    workers = _workers(stop_file, agent)
    agent.kill()
    agent.wait()
    _kill_all(workers)


if __name__ == "__main__":
    main()
