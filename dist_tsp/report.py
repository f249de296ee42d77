"""results.json, predictions.npz and the per-student accuracy table printed at the end of a run; the markdown and
CSV tables of sweeps and of the protocol."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tabulate import tabulate

from dist_tsp.checkpoint import write_atomic, write_text_atomic
from dist_tsp.config import LABELS, TEACHER, RunConfig

if TYPE_CHECKING:  # importing the teacher (accelerate, torchvision) would slow `python -m dist_tsp.sweep`
    from dist_tsp.teacher import TeacherInfo

RESULTS_LINE = "Results in "  # how a finished run's output announces its results.json (a log without it: unfinished)


def build_results(cfg: RunConfig, teacher: TeacherInfo | None, accuracies: dict[str, dict[str, float]],
                  teacher_cache: dict[str, Any]) -> dict[str, Any]:
    """The results.json document: the teacher (with its mode, memory and logit cache) and every student's
    final accuracies."""
    val = accuracies.get("val", {})
    students = {s.name: {"model": s.model, "test_acc": accuracies["test"][s.name], "val_acc": val.get(s.name),
                         "frozen": s.frozen, "init": None if s.init is None else str(s.init)}
                for s in cfg.students}
    teacher_entry = None if teacher is None else {**dataclasses.asdict(teacher), "cache": teacher_cache or None}
    return {"teacher": teacher_entry, "students": students, "loss": cfg.loss.model_dump(mode="json"),
            "dataset": cfg.data.name, "seed": cfg.seed}


def results_table(results: dict[str, Any], fmt: str = "github") -> str:
    """A table with one row per student (and the teacher), accuracies in percent."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    rows = [[f"{name} (frozen)" if s.get("frozen") else name, s["model"], pct(s["val_acc"]), pct(s["test_acc"])]
            for name, s in results["students"].items()]
    if results["teacher"] is not None:
        rows.append(["(teacher)", results["teacher"]["name"], "-", pct(results["teacher"]["test_acc"])])
    return tabulate(rows, headers=["student", "model", "val acc %", "test acc %"], tablefmt=fmt)


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """results.json and results.md beside it, atomically."""
    write_text_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(output_dir / "results.md", results_table(results) + "\n")


def write_predictions(output_dir: Path, names: list[str], students: torch.Tensor, labels: torch.Tensor,
                      teacher: torch.Tensor | None) -> None:
    """predictions.npz: the test labels and every student's (and the teacher's) predicted class per test sample."""
    arrays = {LABELS: labels, **dict(zip(names, students))}
    if teacher is not None:
        arrays[TEACHER] = teacher
    write_atomic(output_dir / "predictions.npz",
                 lambda file: np.savez_compressed(file, **{k: v.cpu().numpy() for k, v in arrays.items()}))


def write_table(directory: Path, name: str, markdown: str, header: list[str], rows: list[list]) -> None:
    """name.md (the markdown table) and name.csv (header and rows) in `directory`, each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    spreadsheet = io.StringIO()
    csv.writer(spreadsheet, lineterminator="\n").writerows([header, *rows])
    write_text_atomic(directory / f"{name}.md", markdown + "\n")
    write_text_atomic(directory / f"{name}.csv", spreadsheet.getvalue())
