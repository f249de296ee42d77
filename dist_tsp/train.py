"""Entry point: `dist-tsp-launch dist_tsp/train.py --config FILE [key=value ...]` (accelerate launch's arguments,
and clean stops on SIGTERM/SIGUSR1); plain `accelerate launch` or `python` work too."""

from __future__ import annotations

import argparse
import functools
import os
import re
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from torch.distributed.elastic.multiprocessing.errors import record

from dist_tsp import checkpoint, shared_errors
from dist_tsp.config import RunConfig, load_config, save_config
from dist_tsp.cuda_graph import choose_step
from dist_tsp.data import Dataset, check_fills_a_batch, listed_from_disk, load_dataset
from dist_tsp.errors import (
    INTERRUPTED,
    INTERRUPTED_EXIT_CODE,
    ArgumentParser,
    OutOfSpace,
    Preempted,
    RunStopped,
    SharedUserError,
    UserError,
    not_a_file,
)
from dist_tsp.graph import TeachingGraph
from dist_tsp.launch import STOP_SIGNALS, hand_over, said_in_one_line
from dist_tsp.loop import StudentTrainer
from dist_tsp.placement import Groups, Placement
from dist_tsp.report import RESULTS_LINE, build_results, results_table, write_predictions, write_results
from dist_tsp.run_control import StopRequest
from dist_tsp.streaming import loader_failed, stop_loader_workers
from dist_tsp.students import check_local_students
from dist_tsp.teacher import cache_folder, prepare_teacher, teacher_file_found, teacher_logits
from dist_tsp.teacher_modes import deepspeed_zero_settings, quiet_deepspeed
from dist_tsp.tracking import Tracker, tensorboard_folder, tracker_settings

STARTUP_TIMEOUT = timedelta(minutes=30)  # torch's default for gloo groups
INTERRUPT_GRACE_S = 1.0  # torchrun passes Ctrl-C to the workers one after the other
# A rank that ends because another rank did leaves this long after: torchrun's report names as its root cause the
# failure it saw first, timed in whole seconds (a tie names rank 0), and so names that other rank.
AFTER_ANOTHER_RANK_S = 1.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    parser.add_argument("--teacher-only", action="store_true",
                        help="the teacher stage alone: train (or load) and evaluate the teacher, save it to "
                             "teacher.checkpoint, and stop; any number of processes")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. train.epochs=3 students.0.model=lenet")
    return parser.parse_intermixed_args(argv)  # an override may come before --config


def plan(argv: list[str] | None, world_size: int, rank: int) -> tuple[RunConfig, Placement | None]:
    """Everything that can be checked before a process group or a dataset is touched (no placement for
    --teacher-only)."""
    args = parse_args(argv)
    if args.config is None and not args.overrides:
        raise UserError("no config given: pass --config FILE (e.g. --config configs/demo.yaml), key=value overrides "
                        "or both (see --help)")
    cfg = load_config(args.config, args.overrides)
    checkpoint.check_writable(cfg.output_dir, f"output_dir {cfg.output_dir}")
    check_teacher_launch(cfg)
    if cfg.teacher_file.exists() and not cfg.teacher_file.is_file():  # a device would be replaced by the teacher
        raise UserError(f"teacher.checkpoint {cfg.teacher_file} {not_a_file(cfg.teacher_file)}: point it to the "
                        "teacher's file (model.pt), or to a path where it is to be saved")
    uses_teacher = TeachingGraph.from_config(cfg).uses_teacher
    if args.teacher_only or (uses_teacher and not cfg.teacher_file.is_file()):
        # the teacher is made and saved there (teacher.train_teacher): its folder is refused now, not once trained
        checkpoint.check_writable(cfg.teacher_file.parent, f"teacher checkpoint {cfg.teacher_file}")
    if args.teacher_only:
        return cfg, None
    if cfg.teacher.mode == "cached" and uses_teacher and not cache_folder(cfg).is_dir():
        # its logits are written there; a folder other runs made is only read, even where this one cannot write
        checkpoint.check_writable(cache_folder(cfg), f"teacher.cache_dir {cache_folder(cfg)}")
    placement = Placement(world_size=world_size, rank=rank, num_students=len(cfg.students))
    checkpoint.resumable(cfg, placement.replicas, total_steps=cfg.train.max_steps)  # another run's: refused here
    # a step train.step=graph cannot capture is refused here too (the device is the one start() will choose)
    choose_step(cfg, placement.replicas, uses_teacher, "cuda" if torch.cuda.is_available() else "cpu")
    return cfg, placement


def check_teacher_launch(cfg: RunConfig) -> None:
    """A DeepSpeed accelerate config is for teacher.mode=deepspeed, whose ZeRO settings it must allow."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and cfg.teacher.mode != "deepspeed":
        raise UserError(f"launched with a DeepSpeed accelerate config but teacher.mode={cfg.teacher.mode}: add "
                        "teacher.mode=deepspeed, or launch with configs/accelerate/cpu.yaml or gpu.yaml")
    if cfg.teacher.mode == "deepspeed":
        deepspeed_zero_settings()
        quiet_deepspeed()


@contextmanager
def stop_on_signals(requested: StopRequest | None = None) -> Iterator[StopRequest]:
    """Inside, SIGTERM/SIGUSR1 ask for a checkpoint, then exit code 75 (requeue me): the student phase stops after the
    step that follows the signal, the teacher's training too (unsaved: a rerun trains it again), and a signal that
    comes before either (data, a teacher loading) is kept until the first step.
    After, the handlers from before are back: in a worker of dist-tsp-launch they ignore them (its agent's, inherited),
    as the launcher repeats them until its workers have exited; in the protocol or a sweep running runs in its own
    process, a signal between runs does what it did before the first. `requested`: one that a signal before these
    handlers may have set already (the protocol's or a sweep's)."""
    requested = StopRequest() if requested is None else requested
    before = {signum: signal.signal(signum, lambda *_: requested.set()) for signum in STOP_SIGNALS}
    try:
        yield requested
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def start(cfg: RunConfig, trackers: bool) -> tuple[Accelerator, Dataset, str]:
    """The process group (through accelerate), the seed, the dataset on this rank's device and its identity (the
    same on every rank)."""
    # A DeepSpeed accelerate config's ZeRO settings serve the teacher (teacher_modes.py); the students stay on DDP.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    timeout = InitProcessGroupKwargs(timeout=startup_timeout(cfg))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=tracker_settings(cfg) if trackers else None,
                              project_dir=str(cfg.output_dir), kwargs_handlers=[timeout])
    shared_errors.on_every_rank(functools.partial(check_mixed_precision, accelerator))
    set_seed(cfg.seed)
    torch.backends.cudnn.deterministic = cfg.train.deterministic
    load = functools.partial(load_dataset, cfg.data, cfg.seed)
    data = shared_errors.once_per_node(load, startup_timeout(cfg)) if listed_from_disk(cfg.data) else \
        shared_errors.main_process_first(accelerator, load)
    identity = data.identity()
    shared_errors.check_same_on_every_rank("loaded a dataset", lambda: identity,
                                           "every node needs the same data (a node's own copy of data.root may differ)")
    return accelerator, data.to(accelerator.device), identity


def check_mixed_precision(accelerator: Accelerator) -> None:
    """UserError for a mixed precision dist-tsp does not train in (set by this node's accelerate config)."""
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise UserError(f"mixed_precision={accelerator.mixed_precision} is not supported: use bf16 or no")


def startup_timeout(cfg: RunConfig) -> timedelta:
    """How long a collective may wait before the student steps: ranks part there for as long as one of them reads
    its data or a checkpoint, however short train.collective_timeout_s (which the steps keep)."""
    return max(STARTUP_TIMEOUT, timedelta(seconds=cfg.train.collective_timeout_s))


def run_teacher_stage(cfg: RunConfig, stop_requested: StopRequest) -> None:
    """--teacher-only: the teacher trained (or loaded) and evaluated; student runs then load teacher.checkpoint."""
    accelerator, data, _ = start(cfg, trackers=False)
    _, info, _ = prepare_teacher(cfg, data, accelerator, Groups.world_only(), stop_requested)
    if accelerator.is_main_process:
        print(f"teacher {info.name}: test accuracy {100 * info.test_acc:.2f} % ({info.checkpoint})")
    accelerator.end_training()  # the process groups ended here: left to the interpreter's exit, gloo's may abort


def run(cfg: RunConfig, placement: Placement, stop_requested: StopRequest) -> dict:
    """Teacher stage, then the student phase; writes the run directory and returns results.json's content."""
    accelerator, data, data_identity = start(cfg, trackers=True)
    timeout = startup_timeout(cfg)
    groups = Groups.from_mesh(placement.build_mesh(accelerator.device.type, timeout), timeout)
    tracker = Tracker(cfg, accelerator)
    graph = TeachingGraph.from_config(cfg)
    # the students' batches, models and init files are checked before the teacher trains (else after, in
    # StudentTrainer)
    check_fills_a_batch(len(data.train), cfg.data.batch_size, placement.replicas, "data.batch_size")
    check_local_students(cfg, placement, data.num_classes, data.train.image_size)
    with output_dir_held(cfg, accelerator):  # another run there is refused while this one runs
        check_output_dir_shared(cfg, accelerator)
        teacher, teacher_info, teacher_predictions = None, None, None
        # a teacher file the students do not learn from is still loaded: results.json reports its accuracy
        if graph.uses_teacher or teacher_file_found(cfg, accelerator):
            model, teacher_info, teacher_predictions = prepare_teacher(cfg, data, accelerator, groups, stop_requested)
            teacher = teacher_logits(cfg, model, teacher_info, data, accelerator, groups, stop_requested)
        trainer = StudentTrainer(cfg, placement, groups, accelerator, data, data_identity, graph, teacher, teacher_info,
                                 tracker, stop_requested)
        start_step = trainer.resume()  # refuses another run's checkpoint before anything is moved or overwritten
        if start_step == 0:
            set_aside_earlier_attempt(cfg, accelerator)
        tracker.start()
        try:
            if accelerator.is_main_process:
                save_config(cfg, cfg.output_dir / "config.yaml")
            groups.set_timeout(timedelta(seconds=cfg.train.collective_timeout_s))
            evaluation = trainer.train(start_step)
            results = build_results(cfg, teacher_info, evaluation.accuracies, teacher.summary() if teacher else {})
            if accelerator.is_main_process:
                write_predictions(cfg.output_dir, cfg.student_names, evaluation.test_predictions, data.test.labels,
                                  teacher_predictions)
                write_results(results, cfg.output_dir)
                print(f"\n{RESULTS_LINE}{cfg.output_dir}/results.json\n{results_table(results)}")
        except BaseException as error:  # what was logged reaches the trackers before main ends the process (and groups)
            tracker.close(exit_code(error), rerun=isinstance(error, Preempted))
            raise
        tracker.finish()
        return results


def exit_code(error: BaseException) -> int:
    """The exit code of a process that `error` ends (README's table under Launching)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT_CODE
    if isinstance(error, (RunStopped, UserError, OutOfSpace)):
        return error.exit_code
    said = exit_code_said_elsewhere(error)
    return 1 if said is None else said


def exit_code_said_elsewhere(error: BaseException) -> int | None:
    """When `error` is gloo's or NCCL's where another rank said in one line why it stopped (its collective failed as
    that rank left): that rank's exit code."""
    return shared_errors.code_said_by_another_rank() if isinstance(error, RuntimeError) else None


def another_rank_gone(error: RuntimeError) -> str | None:
    """The one line for gloo's error when another rank's process ended while this one waited for it in a collective
    (killed, most often for memory, or crashed); None for another error."""
    if not (closed := re.search(r"Connection (closed|reset) by peer", str(error))):
        return None
    return (f"another rank's process ended while this one waited for it (gloo: {closed[0].lower()}): its own error, "
            "if any, is above, and the launcher's report names it with its exit code or signal (SIGKILL: most often "
            "the kernel's out-of-memory killer); rerun the same command to resume from the last checkpoint")


@contextmanager
def output_dir_held(cfg: RunConfig, accelerator: Accelerator) -> Iterator[None]:
    """Inside, the main process holds output_dir's lock (the folder's flock, which goes with the process however it
    ends): a second run in the same output_dir (a command started twice) is refused on every rank, where the two
    would write each other's checkpoints. On a file system without locks, runs go ahead as before."""
    folder = None
    if accelerator.is_main_process:
        with checkpoint.written_into(cfg.output_dir):
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
        folder = os.open(cfg.output_dir, os.O_RDONLY)
    try:
        if not broadcast_object_list([folder is None or checkpoint.try_lock(folder)])[0]:
            raise SharedUserError(f"output_dir {cfg.output_dir} is in use by another run (its process holds the "
                                  "folder's lock): wait for that run to end, or give this one another output_dir")
        yield
    finally:
        if folder is not None:
            os.close(folder)


def check_output_dir_shared(cfg: RunConfig, accelerator: Accelerator) -> None:
    """Refuse on every rank, before the teacher, a rank whose output_dir is not the main process's (a node's own
    folder): the checkpoints the main process completes would lack that rank's files, which only a resume would
    find. The main process makes a file of a name of its own in its output_dir (made by output_dir_held), which every
    rank looks for, then removes it, leaving the folder's times as they were (a refused run changes nothing)."""
    if accelerator.num_processes == 1:
        return
    name = [f".dist-tsp-shared-{secrets.token_hex(8)}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        times = cfg.output_dir.stat()
        with checkpoint.written_into(cfg.output_dir):
            (cfg.output_dir / name[0]).touch()
    mark = cfg.output_dir / broadcast_object_list(name)[0]

    def sees_the_mark() -> None:
        if not mark.is_file():
            raise UserError(f"output_dir {cfg.output_dir} is not the main process's here (it lacks {mark.name}, which "
                            f"the main process just made there): {checkpoint.SHARED_OUTPUT_DIR}")

    try:
        shared_errors.on_every_rank(sees_the_mark)
    finally:
        if accelerator.is_main_process:
            mark.unlink(missing_ok=True)
            os.utime(cfg.output_dir, ns=(times.st_atime_ns, times.st_mtime_ns))


def set_aside_earlier_attempt(cfg: RunConfig, accelerator: Accelerator) -> None:
    """A run that starts at step 0 moves what an earlier attempt left (resume=off, or killed before its first
    checkpoint) into output_dir/previous-N/, before its metrics, W&B run and config are written: the main process
    moves, while the other ranks wait."""
    if accelerator.is_main_process:
        with checkpoint.written_into(cfg.output_dir):
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            previous = checkpoint.set_aside(cfg.output_dir, tensorboard_folder(cfg))
        if previous:
            print(f"starting at step 0: the earlier attempt's checkpoints and metrics were moved to {previous}")
    accelerator.wait_for_everyone()


@record  # under torchrun/accelerate, the failure summary shows the failing rank's exception
def main(argv: list[str] | None = None, stop_requested: StopRequest | None = None) -> None:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    in_process = stop_requested is not None  # run by the protocol or a sweep in its own process
    try:  # said once, by rank 0, naming the ranks that met it unless all did
        cfg, placement = shared_errors.before_the_process_group(lambda: plan(argv, world_size, rank), STARTUP_TIMEOUT)
    except UserError as error:
        _refuse(error, rank, world_size, every_rank=True)
    # The handlers stay while an error below exits: a launcher's SIGTERM to the ranks still running (torchrun sends
    # it once one rank has failed) then only asks for a stop, and each rank exits with its own code.
    with stop_on_signals(stop_requested) as stop_requested:
        try:
            if placement is None:
                run_teacher_stage(cfg, stop_requested)
            else:
                run(cfg, placement, stop_requested)
        except SharedUserError as error:
            _refuse(error, rank, world_size, every_rank=True)
        except (UserError, OutOfSpace) as error:  # met by some ranks (an image in their shard) or each (a full disk)
            said = shared_errors.said_by_another_rank_first(str(error), error.exit_code)
            _refuse(error, rank, world_size, every_rank=False, said=said)
        except RuntimeError as error:  # gloo's, NCCL's in blocking-wait mode (DistBackendError), or a loader's
            if (code := ended_by(error, cfg, rank, world_size)) is None:
                raise
            _exit(code)
        except KeyboardInterrupt:  # Ctrl-C: at once, where the protocol or a sweep running it in its process does not
            if in_process:
                raise
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # another Ctrl-C changes nothing now
            if world_size > 1:  # every rank is interrupted before one leaves (else its collectives fail first)
                time.sleep(INTERRUPT_GRACE_S)
            if rank == 0:
                print(f"dist-tsp: {INTERRUPTED}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(INTERRUPTED_EXIT_CODE)  # collectives may be in flight: their destructors would wait or abort
        except RunStopped as stopped:
            if dist.is_initialized():  # every rank stopped after the same step (gloo may abort at exit otherwise)
                dist.destroy_process_group()
            if hand_over(stopped):
                return  # dist-tsp-launch says it once and exits with its code; torchrun sees workers that ended well
            if rank == 0:
                print(f"dist-tsp: {stopped}", file=sys.stderr)
            sys.exit(stopped.exit_code)


def ended_by(error: RuntimeError, cfg: RunConfig, rank: int, world_size: int) -> int | None:
    """The exit code of this rank, which `error` ends, once its one line is said, unless another rank says it; None
    for an error no line says (a crash, whose traceback torchrun's report keeps)."""
    said_elsewhere, failed, gone = exit_code_said_elsewhere(error), loader_failed(error), another_rank_gone(error)
    timed_out = "timed out" in str(error).lower()
    if said_elsewhere is None and not (failed or gone or timed_out):
        return None
    stop_loader_workers()  # this rank ends: their deaths (torchrun's SIGTERM reaches them) would raise torch's error
    if said_elsewhere is not None:
        time.sleep(AFTER_ANOTHER_RANK_S)  # the rank that stopped says why
        return said_elsewhere
    if failed:
        shared_errors.record(failed, 1)  # the other ranks' failed collectives end quietly
        _say_error(failed, rank, world_size)
    elif gone:
        time.sleep(AFTER_ANOTHER_RANK_S)  # a rank whose timeout closed the connections records it meanwhile
        if shared_errors.first_to_record(gone, 1):
            _say_error(gone, rank, world_size)
    else:
        line = ("a collective waited longer than its timeout (train.collective_timeout_s="
                f"{cfg.train.collective_timeout_s:g} s in the student steps, "
                f"{startup_timeout(cfg).total_seconds() / 60:g} min before them): another rank is stuck or gone (its "
                "own error, if any, is above)")
        shared_errors.record(line, 1)  # a rank whose connection this timeout closed ends quietly
        _say_error(line, rank, world_size)
    return 1


def _refuse(error: UserError | OutOfSpace, rank: int, world_size: int, *, every_rank: bool,
            said: bool = False) -> NoReturn:
    """Exit with the error's code, its one line said by rank 0 when every rank met it, else by each rank that did
    (naming itself) unless another rank `said` the same."""
    if every_rank and rank == 0:
        print(f"dist-tsp: error: {error}", file=sys.stderr)
    elif not every_rank and not said:
        _say_error(str(error), rank, world_size)
    _exit(error.exit_code)


def command() -> None:
    """The command line's entry (`python dist_tsp/train.py`, `dist-tsp-train`): main, where on several ranks a crash
    (an error no line says, which @record keeps for torchrun's report) ends this rank at once with its traceback.
    Left to the interpreter's exit, its process groups may close first and the teardown go on: the other ranks
    then end on the lost connection before it does, and torchrun names one of them as the first failure."""
    try:
        main()
    except Exception:
        if not _several_ranks():
            raise
        traceback.print_exc()
        stop_loader_workers()  # not left behind, where a stuck decoder would keep one alive
        _leave_at_once(1)


def _exit(code: int) -> NoReturn:
    """Exit with `code`, the error said in one line: at once when the process groups span several ranks (their
    destructors can abort, as the other ranks leave, or wait for work in flight), else as usual (SystemExit, which
    the protocol or a sweep running the run in its own process reports)."""
    said_in_one_line(code)
    if _several_ranks():
        _leave_at_once(code)
    sys.exit(code)


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _leave_at_once(code: int) -> NoReturn:
    """End this process with `code` now, its output flushed, without the process groups' destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say_error(what: str, rank: int, world_size: int) -> None:
    """Say on stderr in one line what this rank met, naming the rank where there are several; on a line of its own
    (the main process's progress bar, which another rank cannot know it is drawing, ends without a newline)."""
    where, new_line = (f" (rank {rank})", "\n" * (rank > 0)) if world_size > 1 else ("", "")
    sys.stderr.write(f"{new_line}dist-tsp: error{where}: {what}\n")


if __name__ == "__main__":
    command()
