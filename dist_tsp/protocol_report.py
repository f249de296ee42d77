"""The protocol's report: Tables 1 and 2, paired verdicts and Figures 2-5 from finished run directories."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tabulate import tabulate

from dist_tsp.checkpoint import write_text_atomic
from dist_tsp.data import Samples, images_of
from dist_tsp.errors import UserError
from dist_tsp.report import write_table

PAPER = {"scratch": {"alexnet": 60.54, "lenet": 56.5, "mobilenet": 78.16},
         "kd": {"alexnet": 61.52, "lenet": 58.02, "mobilenet": 80.75},
         "tsp": {"alexnet": 69.8, "lenet": 55.0, "mobilenet": 82.88}}
"""CIFAR-10 test accuracies (%) reported by the paper, by method and student name."""

SHORT = {"scratch": "scratch", "kd": "KD", "tsp": "TSP"}
"""How verdicts name the paper's three methods; other rows go by their label."""

NO_VERDICTS = ("No verdicts: each claim compares two methods over the same seeds (tsp with kd or scratch, kd with "
               "scratch, tuned or alternate with tsp), and these runs hold no such pair: give --methods both "
               "methods of one, e.g. kd,tsp")
"""verdicts.md's line when there is no claim to judge."""

CURVES = (("curves_loss", "train/{}/ce", "step", 1, "train cross-entropy"),
          ("curves_accuracy", "test/{}/acc", "epoch", 100, "test accuracy %"))
"""Figures 2 and 3: file name, metric key, x axis, scale and y label."""


@dataclass(frozen=True)
class Row:
    """One row of Table 2: a method, and for every seed which run directory holds each student's result."""
    method: str
    label: str
    runs: dict[int, dict[str, Path]]

    def accuracies(self, student: str) -> dict[int, float]:
        """Seed -> the student's test accuracy in %, for the seeds that have the student."""
        return {seed: 100 * _results(runs[student])["students"][student]["test_acc"]
                for seed, runs in sorted(self.runs.items()) if student in runs}

    def teacher_accuracies(self) -> dict[int, float]:
        """Seed -> the teacher's test accuracy in % (from the first of its runs that had a teacher)."""
        found = {seed: [_results(run)["teacher"] for run in runs.values()] for seed, runs in sorted(self.runs.items())}
        return {seed: 100 * next(t for t in teachers if t)["test_acc"]
                for seed, teachers in found.items() if any(teachers)}


@dataclass(frozen=True)
class GridPoint:
    """One (alpha, beta, gamma) of the grid search, with its run on the 80/20 train/val split."""
    alpha: float
    beta: float
    gamma: float
    run: Path


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _val_accuracies(run: Path) -> dict[str, float]:
    """Student name -> validation accuracy in %."""
    return {name: 100 * s["val_acc"] for name, s in _results(run)["students"].items()}


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _csv_cells(rows: list[list]) -> list[list]:
    """The rows as the CSV files hold them: None as an empty cell, floats to 4 decimals."""
    return [["" if v is None else round(v, 4) if isinstance(v, float) else v for v in row] for row in rows]


def select_grid_points(grid: list[GridPoint], scratch: Path) -> tuple[str, str, dict[str, GridPoint]]:
    """The weakest and strongest students (by scratch val accuracy) and, for each, the grid point where
    that student's val accuracy is highest (ties: the first in grid order)."""
    scratch_acc = _val_accuracies(scratch)
    weakest, strongest = min(scratch_acc, key=scratch_acc.get), max(scratch_acc, key=scratch_acc.get)
    chosen = {role: max(grid, key=lambda point: _val_accuracies(point.run)[student])
              for role, student in (("weakest", weakest), ("strongest", strongest))}
    return weakest, strongest, chosen


def write_table1(out: Path, grid: list[GridPoint], scratch: Path, weakest: str, strongest: str,
                 chosen: dict[str, GridPoint]) -> str:
    """table1.md and table1.csv: every student's val accuracy (%) for scratch and each grid point."""
    students = list(_val_accuracies(scratch))
    role_student = {"weakest": weakest, "strongest": strongest}
    rows = [["scratch", None, None, None, *_val_accuracies(scratch).values(), ""]]
    for point in grid:
        accuracy = _val_accuracies(point.run)
        roles = ", ".join(f"{role} ({role_student[role]})" for role, p in chosen.items() if p == point)
        rows.append(["grid", point.alpha, point.beta, point.gamma, *(accuracy[s] for s in students), roles])
    header = ["run", "alpha", "beta", "gamma", *(f"{s} val acc %" for s in students), "chosen for"]
    markdown = (tabulate(rows, headers=header, tablefmt="github", floatfmt=".2f", missingval="-")
                + f"\n\nWeakest student (lowest scratch val accuracy): {weakest}; strongest: {strongest}.")
    write_table(out, "table1", markdown, header, _csv_cells(rows))
    return markdown


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f} (n={len(values)})"


def write_table2(out: Path, rows: list[Row], students: list[str], dataset: str) -> str:
    """table2.md and table2.csv: each method's test accuracy (%) per student, mean ± std over seeds, with the
    paper's CIFAR-10 numbers beside them."""
    paper = PAPER if dataset == "cifar10" else {}
    header = ["method"]
    for student in students:
        header += [student] + ([f"paper {student}"] if paper else [])
    table = []
    for row in rows:
        line = [row.label]
        for student in students:
            line += [_cell(list(row.accuracies(student).values()))]
            line += [paper.get(row.method, {}).get(student, "-")] if paper else []
        table.append(line + [_cell(list(row.teacher_accuracies().values()))])
    markdown = tabulate(table, headers=header + ["teacher"], tablefmt="github", disable_numparse=True)

    seeds = sorted({seed for row in rows for seed in row.runs})
    csv_rows = []
    for row in rows:
        series = {s: row.accuracies(s) for s in students} | {"teacher": row.teacher_accuracies()}
        for student, values in series.items():
            if values:
                mean, std = _mean_std(list(values.values()))
                csv_rows.append([row.method, row.label, student, *(values.get(seed, "") for seed in seeds), mean,
                                 "" if std is None else std, paper.get(row.method, {}).get(student, "")])
    write_table(out, "table2", markdown, ["method", "label", "student", *(f"seed {s}" for s in seeds), "mean", "std",
                                          "paper"], _csv_cells(csv_rows))
    return markdown


def _claim(better: Row, worse: Row, student: str) -> str | None:
    """'A > B for s: +d ± sd points over n seeds (holds in k/n)', paired by seed; None when nothing pairs."""
    a, b = better.accuracies(student), worse.accuracies(student)
    diffs = [a[seed] - b[seed] for seed in a if seed in b]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    spread = "" if std is None else f" ± {std:.2f}"
    names = [SHORT.get(row.method, row.label) for row in (better, worse)]
    relation = ">" if mean > 0 else "not >"
    return (f"{names[0]} {relation} {names[1]} for {student}: {mean:+.2f}{spread} points over {len(diffs)} "
            f"seed{'s' * (len(diffs) > 1)} (holds in {sum(d > 0 for d in diffs)}/{len(diffs)})")


def verdicts(rows: list[Row], students: list[str]) -> list[str]:
    """One line per claim of the paper, from paired per-seed differences of test accuracy."""
    by_method = {row.method: row for row in rows}
    claims = [(a, b, s) for s in students for a, b in (("tsp", "kd"), ("tsp", "scratch"), ("kd", "scratch"))]
    claims += [(row.method, "tsp", s) for row in rows if row.method.startswith("tsp_tuned") for s in students]
    claims += [(row.method, "tsp", row.method.removeprefix("alternate_")) for row in rows
               if row.method.startswith("alternate_")]
    lines = [_claim(by_method[a], by_method[b], s) for a, b, s in claims if a in by_method and b in by_method]
    return [line for line in lines if line is not None]


def write_verdicts(out: Path, lines: list[str]) -> None:
    """verdicts.md: the claims as a bullet list, or why there are none."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "verdicts.md", "# Verdicts\n\n" + ("".join(f"- {line}\n" for line in lines) or
                                                               f"{NO_VERDICTS}\n"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _curve(logs: list[list[dict]], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """The x values every seed logged `key` at, and a [seeds, points] array of its values there."""
    series = [{row[x]: row[key] for row in log if key in row} for log in logs]
    xs = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(xs), np.array([[s[v] for v in xs] for s in series])


def plot_curves(out: Path, rows: list[Row], students: list[str]) -> list[Path]:
    """Figures 2 and 3: training cross-entropy per step and test accuracy per epoch, one subplot per
    student, one line per row (mean over seeds, min-max band when there are several)."""
    logs = {run: _metrics(run) for row in rows for runs in row.runs.values() for run in runs.values()}
    paths = []
    for name, key, x, scale, ylabel in CURVES:
        figure = Figure(figsize=(4.5 * len(students), 3.5), layout="constrained")
        for ax, student in zip(figure.subplots(1, len(students), squeeze=False)[0], students):
            for row in rows:
                seeds = [logs[runs[student]] for runs in row.runs.values() if student in runs]
                xs, ys = _curve(seeds, key.format(student), x) if seeds else (np.array([]), None)
                if xs.size:
                    xs = xs + 1 if x == "epoch" else xs  # accuracy after epoch e is logged with epoch e - 1
                    ax.plot(xs, scale * ys.mean(0), label=row.label, marker="o" if len(xs) < 30 else None,
                            markersize=3)
                    if len(ys) > 1:
                        ax.fill_between(xs, scale * ys.min(0), scale * ys.max(0), alpha=0.2)
            ax.set(title=student, xlabel=x, ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.axes[0].legend(fontsize="small")
        paths.append(out / f"{name}.png")
        out.mkdir(parents=True, exist_ok=True)
        figure.savefig(paths[-1], dpi=120)
    return paths


def qualitative_indices(labels: np.ndarray, right: Sequence[np.ndarray], wrong: Sequence[np.ndarray],
                        any_right: Sequence[np.ndarray] | None = None, limit: int = 8) -> np.ndarray:
    """Test indices (first `limit`, in test order) where every `right` prediction is correct, every `wrong`
    one is wrong and, when `any_right` is given, at least one of those is correct (so never for an empty one)."""
    keep = np.ones(len(labels), dtype=bool)
    for predictions in right:
        keep &= predictions == labels
    for predictions in wrong:
        keep &= predictions != labels
    if any_right is not None:
        keep &= np.any([predictions == labels for predictions in any_right], axis=0)
    return np.flatnonzero(keep)[:limit]


def _predictions(run: Path, key: str, count: int) -> np.ndarray:
    with np.load(run / "predictions.npz") as archive:
        if key not in archive:
            raise UserError(f"{run / 'predictions.npz'} has no {key!r} predictions: pass a run that has them")
        if len(archive[key]) != count:
            raise UserError(f"{run / 'predictions.npz'} has {len(archive[key])} predictions for {count} test "
                            "images: pass the test set the runs were evaluated on")
        return archive[key]


def _image_grid(path: Path, title: str, images: dict[int, torch.Tensor], per_student: int,
                cells: dict[str, list[tuple[int, str]]]) -> Path:
    """One row of titled images per student; a row with no image says so."""
    figure = Figure(figsize=(1.3 * per_student, 1.5 * len(cells)), layout="constrained")
    figure.suptitle(title, fontsize="small")
    for axes, (student, row) in zip(figure.subplots(len(cells), per_student, squeeze=False), cells.items()):
        for column, ax in enumerate(axes):
            ax.set(xticks=[], yticks=[])
            ax.spines[:].set_visible(column < len(row))
            if column < len(row):
                index, caption = row[column]
                ax.imshow(images[index].permute(1, 2, 0).numpy())
                ax.set_title(caption, fontsize=6)
        axes[0].set_ylabel(student)
        if not row:
            axes[0].text(0, 0.5, "no such test image", transform=axes[0].transAxes, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_qualitative(out: Path, teacher_run: Path, scratch: Path, kd: Path, tsp: Path, students: list[str],
                     test: Samples, classes: list[str], per_student: int = 8) -> list[Path]:
    """Figure 4 (teacher right, scratch wrong, KD right) and Figure 5 (teacher and scratch wrong, some TSP
    peer right, the TSP student right), `per_student` test images per student (only those are read)."""
    count = len(test)
    labels = _predictions(teacher_run, "labels", count)
    teacher = _predictions(teacher_run, "teacher", count)
    scratch_p, kd_p, tsp_p = ({s: _predictions(run, s, count) for s in students} for run in (scratch, kd, tsp))

    def captions(indices: np.ndarray, student: str, other: np.ndarray) -> list[tuple[int, str]]:
        return [(i, "/".join(classes[c][:6] for c in (labels[i], scratch_p[student][i], other[i])))
                for i in indices]

    figure4 = {s: captions(qualitative_indices(labels, [teacher, kd_p[s]], [scratch_p[s]], limit=per_student),
                           s, kd_p[s]) for s in students}
    figure5 = {s: captions(qualitative_indices(labels, [tsp_p[s]], [teacher, scratch_p[s]],
                                               [tsp_p[p] for p in students if p != s], per_student), s, teacher)
               for s in students}
    shown = sorted({index for cells in (figure4, figure5) for row in cells.values() for index, _ in row})
    images = dict(zip(shown, images_of(test, shown)))
    return [_image_grid(out / "figure4.png", "teacher right, scratch wrong, KD right (true/scratch/KD)",
                        images, per_student, figure4),
            _image_grid(out / "figure5.png", "teacher and scratch wrong, a peer and TSP right (true/scratch/teacher)",
                        images, per_student, figure5)]
