"""results.json and the per-student accuracy table printed at the end of a run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from dist_tsp.checkpoint import write_text_atomic
from dist_tsp.config import RunConfig
from dist_tsp.teacher import TeacherInfo


def build_results(cfg: RunConfig, teacher: TeacherInfo | None, accuracies: dict[str, dict[str, float]],
                  teacher_cache: dict[str, Any]) -> dict[str, Any]:
    """The results.json document: the teacher (with its mode, memory and logit cache) and every student's
    final accuracies."""
    val = accuracies.get("val", {})
    students = {s.name: {"model": s.model, "test_acc": accuracies["test"][s.name], "val_acc": val.get(s.name)}
                for s in cfg.students}
    teacher_entry = None if teacher is None else {**dataclasses.asdict(teacher), "cache": teacher_cache or None}
    return {"teacher": teacher_entry, "students": students, "loss": cfg.loss.model_dump(mode="json"),
            "dataset": cfg.data.name, "seed": cfg.seed}


def results_table(results: dict[str, Any], fmt: str = "github") -> str:
    """A table with one row per student (and the teacher), accuracies in percent."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    rows = [[name, s["model"], pct(s["val_acc"]), pct(s["test_acc"])] for name, s in results["students"].items()]
    if results["teacher"] is not None:
        rows.append(["(teacher)", results["teacher"]["name"], "-", pct(results["teacher"]["test_acc"])])
    return tabulate(rows, headers=["student", "model", "val acc %", "test acc %"], tablefmt=fmt)


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """results.json (atomically) and results.md beside it."""
    write_text_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    (output_dir / "results.md").write_text(results_table(results) + "\n")
