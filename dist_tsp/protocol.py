"""The paper's whole protocol from one command, for S seeds, on any dataset and student set.

    launch/protocol.sh --config configs/fashion_mnist.yaml --seeds 3 --out runs/protocol [key=value ...]

One teacher is trained (or loaded) once and shared. Then: a grid over (alpha, beta, gamma) plus scratch on the
80/20 train/validation split (Table 1), which picks the grid point best for the weakest and for the strongest
student; and for every seed scratch, vanilla KD, fixed TSP, the tuned TSP points retrained on the full training
split, and alternate learning rotated over every student (phase 1: the teacher and peer learning teach the
others; phase 2: the teacher and those now-frozen mentors teach the one left out). Every run is an ordinary
run directory under --out; a finished run is reused, an interrupted one resumes, so rerunning the command
continues where it stopped. The report (tables, verdicts, curves, qualitative figures) is written at the end.
Independent runs can go several at once, each in a process of its own (--parallel-runs): a small run leaves a GPU
mostly idle.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dist_tsp import checkpoint, protocol_report, side_by_side
from dist_tsp.checkpoint import check_writable, write_text_atomic
from dist_tsp.config import DEFAULT_TEACHER_FILE, LOSS_PRESETS, LOSS_WEIGHTS, RunConfig, load_config
from dist_tsp.data import load_dataset
from dist_tsp.errors import ArgumentParser, UserError, folder_argument
from dist_tsp.placement import Placement
from dist_tsp.protocol_report import GridPoint, Row

METHODS = ("scratch", "kd", "tsp", "tuned", "alternate")
GRID = ((0.1, 0.8, 0.1), (0.1, 0.7, 0.2), (0.1, 0.6, 0.3), (0.2, 0.7, 0.1), (0.2, 0.6, 0.2), (0.2, 0.5, 0.3))
LABELS = {"scratch": "scratch", "kd": "vanilla KD", "tsp": "TSP (0.1/0.8/0.1)"}
ALTERNATE_PHASES = ("tsp", "mentored")  # presets: (0.1, 0.8, 0.1), then (0.1, 0.6, 0.3)


@dataclass
class Protocol:
    """What one protocol directory runs; saved as protocol.json and checked again when the command is rerun."""

    config: str
    overrides: list[str]
    seeds: list[int]
    methods: list[str]
    grid: list[tuple[float, float, float]]
    val_fraction: float
    processes: int
    accelerate_config: str | None
    base: RunConfig = field(repr=False, compare=False)

    def record(self) -> dict:
        """Its options and what its runs start from: the config as it reads now (an edited file is another one)."""
        options = {k: v for k, v in asdict(self).items() if k != "base"}
        return json.loads(json.dumps({**options, "base_config": self.base.identity(finished=True)}))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(prog="launch/protocol.sh", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run config every run starts from")
    parser.add_argument("--out", type=folder_argument, default=Path("runs/protocol"), help="the protocol directory")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default 3)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--grid", default=" ".join(",".join(f"{w:g}" for w in point) for point in GRID),
                        help="grid points 'a,b,g a,b,g ...' for the tuned TSP (default: the 6 points of Table 1)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share for the grid (0.2)")
    side_by_side.add_options(parser, "protocol.json")
    return parser.parse_known_args(argv)


def plan(argv: list[str] | None) -> tuple[Protocol, Path, side_by_side.Slots]:
    """Parse and validate everything, every run's config included, before any run starts or anything is written."""
    args, overrides = parse_args(argv)
    if bad := [o for o in overrides if "=" not in o]:
        raise UserError(f"{bad[0]!r} is neither an option nor key=value: see launch/protocol.sh --help")
    if moved := [o for o in overrides if o.startswith("output_dir=")]:
        raise UserError(f"{moved[0]}: every run's output_dir is a folder of --out: leave it out, and give the "
                        "protocol's folder as --out")
    accelerate_config = side_by_side.accelerate_config(args)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        raise UserError(f"--methods: unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if not methods:
        raise UserError(f"--methods {args.methods!r} names no method: choose from {', '.join(METHODS)}")
    try:
        grid = [tuple(float(w) for w in point.split(",")) for point in args.grid.split()]
    except ValueError:
        grid = []
    if not grid or any(len(point) != 3 or min(point) < 0 or not all(map(math.isfinite, point)) for point in grid):
        raise UserError(f"--grid {args.grid!r}: write points as 'alpha,beta,gamma' separated by spaces, e.g. "
                        "'0.1,0.8,0.1 0.2,0.6,0.2'")
    if twice := next((point for point in grid if grid.count(point) > 1), None):
        raise UserError(f"--grid lists the point {','.join(map(weight_text, twice))} more than once: give each once")
    for option, value in (("--seeds", args.seeds), ("--processes", args.processes)):
        if value < 1:
            raise UserError(f"{option} {value}: give at least 1")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction:g}: give a fraction between 0 and 1")
    check_writable(args.out, f"--out {args.out}")
    base = load_config(args.config, overrides)
    needs_peers = {"tsp", "tuned", "alternate"} & set(methods)
    if needs_peers and len(base.students) < 2:
        raise UserError(f"{', '.join(sorted(needs_peers))} need at least 2 students; the config has 1: add "
                        "students or choose --methods scratch,kd")
    if any(s.frozen for s in base.students):
        raise UserError("the protocol trains every student: remove frozen from the config's students")
    protocol = Protocol(config=args.config, overrides=overrides, seeds=list(range(args.seeds)), methods=methods,
                        grid=grid, val_fraction=args.val_fraction, processes=args.processes,
                        accelerate_config=accelerate_config, base=base)
    side_by_side.check_configs(args.config, ((f"run {planned.name}", run_overrides(protocol, args.out, planned))
                                             for planned in every_run(protocol)))
    record = args.out / "protocol.json"
    if record.is_file():
        saved, current = json.loads(record.read_text()), protocol.record()
        if "base_config" in saved:  # what the runs start from decides, not how it was given (path, override order)
            saved, current = ({k: v for k, v in kept.items() if k not in ("config", "overrides")}
                              for kept in (saved, current))
        else:  # written before the record held the config's content
            current.pop("base_config")
        if saved.get("seeds") == current["seeds"][:len(saved.get("seeds") or [])]:  # more seeds: the earlier reused
            saved["seeds"] = current["seeds"]
        if differ := checkpoint.differences(saved, current):
            raise UserError(f"{args.out} holds another protocol ({'; '.join(differ[:4])}): rerun with its options "
                            "or choose another --out")
    return protocol, args.out, side_by_side.choose_slots(args.parallel_runs, args.processes)


def processes_for(num_students: int, processes: int) -> int:
    """The most processes, up to `processes`, that can hold `num_students` (W = N*R or N = W*K)."""
    return max(w for w in range(1, processes + 1) if Placement.fits(w, num_students))


def fewer_processes_line(num_students: int, processes: int) -> str | None:
    """The start-up line when the runs of every student get fewer processes than --processes (None: they get it)."""
    given = processes_for(num_students, processes)
    if given == processes:
        return None
    return (f"protocol: the runs of all {num_students} students take {given} process{'es' * (given > 1)} each, the "
            f"most up to --processes {processes} that can hold them")


def loss_overrides(weights: tuple[float, float, float]) -> list[str]:
    return ["loss.preset=null", *(f"loss.{k}={weight_text(w)}" for k, w in zip(LOSS_WEIGHTS, weights))]


def weight_text(weight: float) -> str:
    """A loss weight as run names, overrides and labels write it: short (0.1, 1, 0) and exact (0.1234561)."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(weight)


class Runner:
    """Runs the protocol's runs (a finished one is reused), one at a time or several at once, and knows where each
    lives; the bar counts them."""

    def __init__(self, protocol: Protocol, out: Path, slots: side_by_side.Slots, bar: tqdm) -> None:
        self.protocol, self.out, self.slots, self.bar = protocol, out, slots, bar
        self.teacher = teacher_file(protocol, out)

    def run_all(self, runs: list[PlannedRun]) -> list[Path]:
        """Every run of `runs` (a phase 2 after its phase 1); their directories in the same order."""
        return side_by_side.run_concurrently(runs, self.slots.devices, self.run, self.bar,
                                             waits_for=lambda planned: planned.mentors_from)

    def run(self, planned: PlannedRun, devices: str | None = None) -> Path:
        """Run `planned` (output_dir = out/name) unless its results exist, on `devices` (CUDA_VISIBLE_DEVICES, None:
        this process's); return its directory."""
        directory = self.out / planned.name
        done = self.teacher.is_file() if planned.teacher_only else (directory / "results.json").is_file()
        if not done:
            args = ["--config", self.protocol.config, *run_overrides(self.protocol, self.out, planned),
                    *self._mentors(planned)]
            args += ["--teacher-only"] if planned.teacher_only else []
            side_by_side.launch_run(planned.name, args, self.out / "logs" / f"{planned.name.replace('/', '-')}.log",
                                    processes=processes_for(planned.num_students, self.protocol.processes),
                                    accelerate_config=self.protocol.accelerate_config, devices=devices,
                                    in_process=self.slots.one_at_a_time)
        return directory

    def _mentors(self, planned: PlannedRun) -> list[str]:
        """Alternate phase 2: every student but the one it trains starts from phase 1's final weights, frozen."""
        if planned.mentors_from is None:
            return []
        phase1 = self.out / planned.mentors_from
        students = [s.model_dump(mode="json", exclude_defaults=True) for s in self.protocol.base.students]
        return [student_overrides([s if s["name"] in planned.reports else
                                   {**s, "init": str(final_student_file(phase1, s["name"])), "frozen": True}
                                   for s in students])]


def teacher_file(protocol: Protocol, out: Path) -> Path:
    """The teacher every run learns from: the config's teacher.checkpoint, else the one the protocol trains."""
    return protocol.base.teacher.checkpoint or out / DEFAULT_TEACHER_FILE


def run_overrides(protocol: Protocol, out: Path, planned: PlannedRun) -> list[str]:
    """The overrides of `planned`'s config (output_dir = out/name) but alternate phase 2's mentors, known once its
    phase 1 has finished."""
    return [f"teacher.checkpoint={teacher_file(protocol, out)}", "teacher.mode=cached",
            f"teacher.cache_dir={out / 'teacher' / 'logit_cache'}", *protocol.overrides,
            f"tracking.group={out.name}", f"tracking.run_name={run_name(planned.name)}",
            f"output_dir={out / planned.name}", *planned.overrides]


def run_name(name: str) -> str:
    """The W&B run name for a run directory name: seed_0/alternate_lenet/phase1 -> alternate_lenet-phase1-seed0."""
    first, *rest = name.split("/")
    return "-".join(rest) + "-seed" + first.removeprefix("seed_") if first.startswith("seed_") and rest \
        else name.replace("/", "-")


def student_overrides(students: list[dict]) -> str:
    return "students=" + json.dumps(students)


def final_student_file(run: Path, name: str) -> Path:
    """The student's weights at the end of a finished run (its last checkpoint)."""
    return checkpoint.student_file(checkpoint.complete_checkpoints(run)[-1], name)


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """One run of the protocol: its directory under --out, its overrides, and the Table 2 cells it fills."""

    name: str
    overrides: tuple[str, ...]
    num_students: int
    teacher_only: bool = False
    mentors_from: str | None = None  # alternate phase 2: the phase-1 run whose students become frozen mentors
    row: tuple[str, str, int] | None = None  # (method, label, seed) of its Table 2 row
    reports: tuple[str, ...] = ()  # the students whose results in that row come from this run


TEACHER = PlannedRun("teacher", (), num_students=1, teacher_only=True)


def execute(protocol: Protocol, out: Path, slots: side_by_side.Slots) -> dict[str, Path]:
    """Every run of the protocol, then the report; returns the report's files by name. The teacher, then the grid,
    then every seed's runs once the grid has chosen: within each, up to one run per slot at once. The progress bar
    counts the runs planned so far."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "protocol.json", json.dumps(protocol.record(), indent=2) + "\n")
    print(slots.describe("protocol"), flush=True)
    if note := fewer_processes_line(len(protocol.base.students), protocol.processes):
        print(note, flush=True)
    grid = grid_runs(protocol)
    with tqdm(total=1 + len(grid), desc="protocol", unit="run") as bar:
        runner = Runner(protocol, out, slots, bar)
        runner.run_all([TEACHER])
        tuned = choose_tuned(protocol, out, runner.run_all(grid)) if grid else {}
        later = seed_runs(protocol, tuned)
        bar.total += len(later)
        bar.refresh()
        labels: dict[str, str] = {}
        cells: dict[str, dict[int, dict[str, Path]]] = {}  # method -> seed -> student -> its run
        for planned, directory in zip(later, runner.run_all(later), strict=True):
            if planned.row is not None:
                method, labels[method], seed = planned.row
                cells.setdefault(method, {}).setdefault(seed, {}).update(dict.fromkeys(planned.reports, directory))
        names = protocol.base.student_names
        rows = [Row(method, labels[method], {seed: {name: found[name] for name in names}
                                             for seed, found in seeds.items()}) for method, seeds in cells.items()]
        bar.set_postfix_str("report")
        return report(protocol, out, rows, tuned)


def every_run(protocol: Protocol) -> list[PlannedRun]:
    """Every run the protocol may start, whichever grid points the grid chooses: the teacher, the grid, then every
    seed's runs with each grid point as a tuned one (seed_<k>/tsp_tuned_<point>)."""
    grid = grid_runs(protocol)
    tuned = {f"tsp_tuned_{point_name(w)}": (f"TSP tuned {_weights(w)}", w) for w in protocol.grid} if grid else {}
    return [TEACHER, *grid, *seed_runs(protocol, tuned)]


def grid_runs(protocol: Protocol) -> list[PlannedRun]:
    """Scratch and every grid point on the train/val split (first seed); none without the tuned method."""
    if "tuned" not in protocol.methods:
        return []
    split = (f"seed={protocol.seeds[0]}", f"data.val_fraction={protocol.val_fraction}")
    n = len(protocol.base.students)
    return [PlannedRun("grid/scratch", (*split, *loss_overrides(LOSS_PRESETS["scratch"])), n)] + [
        PlannedRun(f"grid/{point_name(weights)}", (*split, *loss_overrides(weights)), n) for weights in protocol.grid]


def point_name(weights: tuple[float, float, float]) -> str:
    """A grid point's name in run names: a0.1_b0.8_g0.1."""
    return "_".join(f"{key}{weight_text(w)}" for key, w in zip("abg", weights))


def choose_tuned(protocol: Protocol, out: Path, directories: list[Path]
                 ) -> dict[str, tuple[str, tuple[float, float, float]]]:
    """Table 1 from the grid's runs (scratch first); the points chosen for the weakest and the strongest student as
    {method: (label, weights)} (one method when both choose the same point)."""
    scratch, *points = directories
    grid = [GridPoint(*weights, directory) for weights, directory in zip(protocol.grid, points)]
    weakest, strongest, chosen = protocol_report.select_grid_points(grid, scratch)
    protocol_report.write_table1(out, grid, scratch, weakest, strongest, chosen)
    weights = {role: (point.alpha, point.beta, point.gamma) for role, point in chosen.items()}
    if weights["weakest"] == weights["strongest"]:
        return {"tsp_tuned": (f"TSP tuned {_weights(weights['weakest'])} (weakest {weakest}, strongest "
                              f"{strongest})", weights["weakest"])}
    return {f"tsp_tuned_{role}": (f"TSP tuned {_weights(w)} ({role}: {student})", w)
            for (role, w), student in zip(weights.items(), (weakest, strongest))}


def _weights(weights: tuple[float, float, float]) -> str:
    return "/".join(map(weight_text, weights))


def seed_runs(protocol: Protocol, tuned: dict[str, tuple[str, tuple[float, float, float]]]) -> list[PlannedRun]:
    """Every seed's runs on the full training split, in order: scratch, KD, TSP, the tuned points, then alternate
    learning rotated over the students (phase 1 then phase 2 for each student left out)."""
    names = tuple(protocol.base.student_names)
    methods = [(m, LABELS[m], LOSS_PRESETS[m]) for m in ("scratch", "kd", "tsp") if m in protocol.methods]
    methods += [(method, label, weights) for method, (label, weights) in tuned.items()]
    runs = []
    for seed in protocol.seeds:
        runs += [PlannedRun(f"seed_{seed}/{method}", (f"seed={seed}", *loss_overrides(weights)), len(names),
                            row=(method, label, seed), reports=names) for method, label, weights in methods]
        if "alternate" in protocol.methods:
            for last in names:
                runs += alternate_runs(protocol, seed, last)
    return runs


def alternate_runs(protocol: Protocol, seed: int, last: str) -> list[PlannedRun]:
    """One rotation of alternate learning: phase 1 trains the others with the teacher and peer learning; phase 2
    trains `last` with the teacher and those students, now frozen mentors."""
    first, second = (loss_overrides(LOSS_PRESETS[phase]) for phase in ALTERNATE_PHASES)
    students = [s.model_dump(mode="json", exclude_defaults=True) for s in protocol.base.students]
    others = tuple(s["name"] for s in students if s["name"] != last)
    row = (f"alternate_{last}", f"alternate ({last} last)", seed)
    phase1 = f"seed_{seed}/alternate_{last}/phase1"
    return [
        PlannedRun(phase1, (f"seed={seed}", *first, student_overrides([s for s in students if s["name"] in others])),
                   len(others), row=row, reports=others),
        PlannedRun(f"seed_{seed}/alternate_{last}/phase2", (f"seed={seed}", *second), len(students),
                   mentors_from=phase1, row=row, reports=(last,)),
    ]


def report(protocol: Protocol, out: Path, rows: list[Row], tuned: dict) -> dict[str, Path]:
    """Table 2, the verdicts, Figures 2-5 (and Table 1, written by tune); Table 2 to W&B when it is tracked."""
    base, names = protocol.base, protocol.base.student_names
    table2 = protocol_report.write_table2(out, rows, names, base.data.name)
    protocol_report.write_verdicts(out, protocol_report.verdicts(rows, names))
    tables = ["table2", "table1"] if tuned else ["table2"]
    files = {f"{name}{suffix}": out / f"{name}{suffix}" for name in tables for suffix in (".md", ".csv")}
    files["verdicts"] = out / "verdicts.md"
    files.update({p.stem: p for p in protocol_report.plot_curves(out, rows, names)})
    by_method = {row.method: row.runs[protocol.seeds[0]] for row in rows}
    if {"scratch", "kd", "tsp"} <= by_method.keys():
        first = protocol.seeds[0]
        test = load_dataset(base.data, first)
        runs = [by_method[m][names[0]] for m in ("kd", "scratch", "kd", "tsp")]
        files.update({p.stem: p for p in protocol_report.plot_qualitative(out, *runs, names, test.test,
                                                                           test.classes)})
    if base.tracking.report_to == "wandb":
        log_table_to_wandb(base, out, table2)
    print(f"\n{table2}\n\n" + (out / "verdicts.md").read_text())
    return files


def log_table_to_wandb(base: RunConfig, out: Path, table2_markdown: str) -> None:
    """Table 2 as a W&B table in a summary run of the protocol's group (offline without credentials): one run, which
    a rerun continues (out/table2_run_id)."""
    import csv

    import wandb

    from dist_tsp.tracking import persistent_run_id, tracker_settings

    tracker_settings(base)  # offline mode when there are no credentials
    header, *rows = list(csv.reader((out / "table2.csv").read_text().splitlines()))
    rows = [[_number(value) for value in row] for row in rows]
    run = wandb.init(project=base.tracking.project, group=out.name, name="table2", job_type="report",
                     dir=str(out), id=persistent_run_id(out / "table2_run_id"), resume="allow")
    run.log({"table2": wandb.Table(columns=header, data=rows)})
    run.summary["table2_markdown"] = table2_markdown
    run.finish()


def _number(text: str) -> float | str | None:
    try:
        return float(text)
    except ValueError:
        return text or None


def main(argv: list[str] | None = None) -> None:
    try:
        protocol, out, slots = plan(argv)
        files = execute(protocol, out, slots)
    except side_by_side.ENDINGS as ending:
        side_by_side.end("dist-tsp protocol", ending)
    print("Written: " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
