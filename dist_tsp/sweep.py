"""Sweeps: a trials file with one line of config overrides per trial, each trial its own run in DIR/trial_N, and one
table of every trial's results in DIR/sweep.md and DIR/sweep.csv.

    python -m dist_tsp.sweep run TRIALS DIR CONFIG [--parallel-runs N|auto] [key=value ...]
                                                  # every unfinished trial on this machine, several at once
    python -m dist_tsp.sweep trial TRIALS DIR N   # trial N's overrides, one per line (N counts from 1; slurm/sweep.sh)
    python -m dist_tsp.sweep collect DIR          # (re)writes DIR/sweep.md and DIR/sweep.csv
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate
from tqdm.auto import tqdm

from dist_tsp import side_by_side
from dist_tsp.checkpoint import check_writable, differences, write_text_atomic
from dist_tsp.config import RunConfig, load_config
from dist_tsp.errors import ArgumentParser, UserError, folder_argument, not_a_file
from dist_tsp.placement import Placement
from dist_tsp.report import write_table

RECORD = "trials.txt"  # the sweep's own copy of its trials file
OWN_OUTPUT_DIR = "a trial's output_dir is the sweep's DIR/trial_N: leave it out"


def read_trials(path: Path, *, recorded: bool = False) -> list[list[str]]:
    """Trial N is the N-th line that is not blank or a # comment, split into key=value words like a shell line.
    A trial may not set output_dir, unless `recorded` (a sweep directory's copy, maybe from before this check)."""
    if not path.is_file():
        raise UserError(f"trials file {path} {not_a_file(path)}: write one line of key=value overrides per trial")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"trials file {path} is not UTF-8 text: write one line of key=value overrides per trial"
                        ) from None
    trials = []
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise UserError(f"{path}:{number}: {error}: quote a value with spaces as a whole word") from None
        if bad := [w for w in words if "=" not in w]:
            raise UserError(f"{path}:{number}: {bad[0]!r} is not key=value: write e.g. loss.gamma=0.2")
        if not recorded and any(w.startswith("output_dir=") for w in words):
            raise UserError(f"{path}:{number}: {OWN_OUTPUT_DIR}")
        if words:
            trials.append(words)
    if not trials:
        raise UserError(f"trials file {path} holds no trials: write one line of key=value overrides per trial")
    return trials


def trial(trials_file: Path, sweep_dir: Path, number: int) -> list[str]:
    """Trial `number`'s overrides; the first trial to start copies the trials file into the sweep directory."""
    trials = read_trials(trials_file)
    check_writable(sweep_dir, f"sweep directory {sweep_dir}")
    if not 1 <= number <= len(trials):
        raise UserError(f"{trials_file} has {len(trials)} trials, so no trial {number}: "
                        f"submit with --array=1-{len(trials)}")
    if not recorded(trials_file, sweep_dir, trials):
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(sweep_dir / RECORD, trials_file.read_text())
    return trials[number - 1]


def recorded(trials_file: Path, sweep_dir: Path, trials: list[list[str]]) -> bool:
    """Whether the sweep directory records `trials` (False: it records none yet); refuses one that records others."""
    record = sweep_dir / RECORD
    if record.is_file() and read_trials(record, recorded=True) != trials:
        raise UserError(f"{sweep_dir} holds another sweep ({record} differs from {trials_file}): "
                        "choose another directory")
    return record.is_file()


def check_finished(configs: list[RunConfig]) -> None:
    """A finished trial is reused only if it ran with the config it would run with now (RunConfig.identity, as a
    checkpoint on resume, and the run's length); raises UserError naming the first that did not."""
    for cfg in configs:
        if not (cfg.output_dir / "results.json").is_file():
            continue
        try:
            ran = load_config(cfg.output_dir / "config.yaml")
        except UserError as error:
            raise UserError(f"{cfg.output_dir} has finished but its config.yaml does not load ({error}): "
                            f"remove {cfg.output_dir} to run it again") from None
        if differ := differences(ran.identity(finished=True), cfg.identity(finished=True)):
            raise UserError(f"{cfg.output_dir} finished with other settings ({'; '.join(differ[:4])}): rerun with "
                            f"the settings it ran with, or choose another DIR or remove {cfg.output_dir}")


@dataclass(frozen=True, slots=True)
class Trial:
    name: str  # trial_N, its directory under the sweep's
    overrides: list[str]


def run(args: argparse.Namespace) -> str:
    """Every trial of args.trials whose results are not in args.dir yet (an interrupted one resumes), up to
    --parallel-runs at once, each with args.config and args.overrides under its own; then the table. Every trial's
    config is checked before any starts, and a finished trial's against the one it ran with."""
    launch_config = side_by_side.accelerate_config(args)
    if bad := [o for o in args.overrides if "=" not in o]:
        raise UserError(f"{bad[0]!r} is not key=value: write e.g. loss.gamma=0.2")
    if moved := [o for o in args.overrides if o.startswith("output_dir=")]:
        raise UserError(f"{moved[0]}: {OWN_OUTPUT_DIR}")
    per_trial = read_trials(args.trials)
    configs = side_by_side.check_configs(args.config, ((f"{args.trials}, trial {n} ({' '.join(overrides)})",
                                                        trial_overrides(args, f"trial_{n}", overrides))
                                                       for n, overrides in enumerate(per_trial, 1)))
    for n, cfg in enumerate(configs, 1):
        if not Placement.fits(args.processes, len(cfg.students)):
            raise UserError(f"{args.trials}, trial {n}: --processes {args.processes} cannot hold its "
                            f"{len(cfg.students)} students: give a count that divides or is a multiple of it")
    recorded(args.trials, args.dir, per_trial)  # another sweep's directory is refused before its trials are compared
    check_finished(configs)
    trials = [Trial(f"trial_{n}", trial(args.trials, args.dir, n)) for n in range(1, len(per_trial) + 1)]
    slots = side_by_side.choose_slots(args.parallel_runs, args.processes)
    print(slots.describe("sweep"), flush=True)

    def run_trial(planned: Trial, devices: str | None) -> Path:
        directory = args.dir / planned.name
        if not (directory / "results.json").is_file():
            side_by_side.launch_run(planned.name, ["--config", str(args.config),
                                                   *trial_overrides(args, planned.name, planned.overrides)],
                                    args.dir / "logs" / f"{planned.name}.log", processes=args.processes,
                                    accelerate_config=launch_config, devices=devices, in_process=slots.one_at_a_time)
        return directory

    with tqdm(total=len(trials), desc="sweep", unit="run") as bar:
        side_by_side.run_concurrently(trials, slots.devices, run_trial, bar)
    return collect(args.dir)


def trial_overrides(args: argparse.Namespace, name: str, overrides: list[str]) -> list[str]:
    """A trial's config overrides: a tracker's run named for the trial in a group named for the sweep (unless the
    sweep's overrides or the trial's name others), the sweep's, the trial's, and its directory."""
    group = json.dumps(args.dir.resolve().name)  # a YAML string, whatever the name (2024-05-01, 3, true)
    return [f"tracking.group={group}", f"tracking.run_name={name}", *args.overrides, *overrides,
            f"output_dir={args.dir / name}"]


def collect(sweep_dir: Path) -> str:
    """Write sweep.md and sweep.csv, one row per trial (accuracies in %, none until it finishes); return the table."""
    if not (sweep_dir / RECORD).is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {RECORD}): pass the DIR given to slurm/sweep.sh")
    with open(sweep_dir / ".sweep.lock", "w") as lock:  # of tasks finishing together, the last one reads every result
        fcntl.flock(lock, fcntl.LOCK_EX)
        trials = read_trials(sweep_dir / RECORD, recorded=True)
        rows = [_row(sweep_dir, n, overrides) for n, overrides in enumerate(trials, 1)]
        keys = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
        accuracies = list(dict.fromkeys(key for row in rows for key in row["accuracies"]))
        header = ["trial", *keys, *accuracies]
        # an empty cell in sweep.csv (spreadsheets and pandas read a number column), `-` in sweep.md
        table = [[row["trial"], *(row["overrides"].get(k) for k in keys),
                  *(row["accuracies"].get(a) for a in accuracies)] for row in rows]
        shown = [["-" if v is None else f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in table]
        markdown = tabulate(shown, headers=header, tablefmt="github", disable_numparse=True)
        write_table(sweep_dir, "sweep", markdown, header, table)
    return markdown


def _row(sweep_dir: Path, number: int, overrides: list[str]) -> dict[str, Any]:
    path = sweep_dir / f"trial_{number}" / "results.json"
    accuracies = {}
    if path.is_file():
        results = json.loads(path.read_text())
        for name, student in results["students"].items():
            if student["val_acc"] is not None:
                accuracies[f"{name} val %"] = 100 * student["val_acc"]
            accuracies[f"{name} test %"] = 100 * student["test_acc"]
        if results["teacher"] is not None:
            accuracies["teacher test %"] = 100 * results["teacher"]["test_acc"]
    return {"trial": number, "overrides": dict(o.split("=", 1) for o in overrides), "accuracies": accuracies}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m dist_tsp.sweep", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    every = commands.add_parser("run", help="run every unfinished trial here, then write the table",
                                usage="python -m dist_tsp.sweep run TRIALS DIR CONFIG [options] [key=value ...] "
                                      "(key=value: for every trial, before its own)")
    trials_help = "the trials file: one line of key=value overrides per trial (blank and # comment lines skipped)"
    dir_help = "the sweep directory: trial N runs in DIR/trial_N, the table is DIR/sweep.md and DIR/sweep.csv"
    every.add_argument("trials", type=Path, metavar="TRIALS", help=trials_help)
    every.add_argument("dir", type=folder_argument, metavar="DIR", help=dir_help)
    every.add_argument("config", type=Path, metavar="CONFIG", help="the run config every trial starts from")
    side_by_side.add_options(every, "the sweep's files")
    one = commands.add_parser("trial", help="print trial N's overrides, one per line")
    one.add_argument("trials", type=Path, metavar="TRIALS", help=trials_help)
    one.add_argument("dir", type=folder_argument, metavar="DIR", help=dir_help)
    one.add_argument("number", type=int, metavar="N", help="the trial's number, counting from 1")
    commands.add_parser("collect", help="write DIR/sweep.md and DIR/sweep.csv").add_argument(
        "dir", type=folder_argument, metavar="DIR", help=dir_help)
    try:
        args, overrides = parser.parse_known_args(argv)  # key=value words may come before or after the options
        args.overrides = overrides
        if args.overrides and args.command != "run":
            parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
        if args.command == "run":
            print(run(args))
        else:
            print("\n".join(trial(args.trials, args.dir, args.number)) if args.command == "trial" else
                  collect(args.dir))
    except side_by_side.ENDINGS as ending:
        side_by_side.end("dist-tsp", ending)


if __name__ == "__main__":
    main()
