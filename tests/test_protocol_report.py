"""The protocol report: tables, grid selection, verdicts and figures from synthetic run directories."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_tsp.data import ImageSet
from dist_tsp.errors import UserError
from dist_tsp.protocol import choose_tuned
from dist_tsp.protocol_report import (
    GridPoint,
    Row,
    plot_curves,
    plot_qualitative,
    qualitative_indices,
    select_grid_points,
    verdicts,
    write_table1,
    write_table2,
    write_verdicts,
)

STUDENTS = ["lenet", "alexnet", "mobilenet"]


def make_run(path: Path, test: dict[str, float], val: dict[str, float] | None = None, teacher: float | None = None,
             predictions: dict[str, list[int]] | None = None) -> Path:
    """A run directory with results.json, a few metrics.jsonl rows and (optionally) predictions.npz."""
    path.mkdir(parents=True)
    students = {s: {"model": s, "test_acc": acc, "val_acc": (val or {}).get(s)} for s, acc in test.items()}
    results = {"teacher": None if teacher is None else {"name": "resnet", "test_acc": teacher},
               "students": students, "loss": {}, "dataset": "digits", "seed": 0}
    (path / "results.json").write_text(json.dumps(results))
    rows = []
    for epoch in range(2):
        rows += [{"step": 3 * epoch + i, "epoch": epoch, **{f"train/{s}/ce": 2.0 - 0.1 * (3 * epoch + i) - acc
                                                            for s, acc in test.items()}} for i in range(3)]
        rows.append({"step": 3 * epoch + 3, "epoch": epoch, **{f"test/{s}/acc": acc * (epoch + 1) / 2
                                                               for s, acc in test.items()}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if predictions is not None:
        np.savez(path / "predictions.npz", **{k: np.array(v, dtype=np.int64) for k, v in predictions.items()})
    return path


def make_row(tmp_path: Path, method: str, accuracies: dict[int, dict[str, float]], teacher: float | None = 0.9,
             label: str | None = None) -> Row:
    """A Row whose every seed is one run directory holding all its students."""
    runs = {seed: make_run(tmp_path / f"{method}-{seed}", acc, teacher=teacher) for seed, acc in accuracies.items()}
    return Row(method, label or method, {seed: {s: run for s in accuracies[seed]} for seed, run in runs.items()})


def paper_rows(tmp_path: Path) -> list[Row]:
    return [make_row(tmp_path, "scratch", {0: dict(lenet=0.50, alexnet=0.60, mobilenet=0.70),
                                           1: dict(lenet=0.52, alexnet=0.62, mobilenet=0.72)}, teacher=None),
            make_row(tmp_path, "kd", {0: dict(lenet=0.60, alexnet=0.61, mobilenet=0.75),
                                      1: dict(lenet=0.64, alexnet=0.63, mobilenet=0.71)}),
            make_row(tmp_path, "tsp", {0: dict(lenet=0.62, alexnet=0.65, mobilenet=0.74),
                                       1: dict(lenet=0.63, alexnet=0.66, mobilenet=0.70)}, teacher=0.92)]


def test_table2_reports_mean_and_sample_std_over_seeds(tmp_path):
    markdown = write_table2(tmp_path / "out", paper_rows(tmp_path), STUDENTS, "digits")
    assert "62.00 ± 2.83 (n=2)" in markdown  # kd lenet: 60 and 64, sample std = 4 / sqrt(2)
    assert "92.00" in markdown.splitlines()[-1]  # the teacher column of the tsp row
    assert "paper" not in markdown
    table = list(csv.DictReader((tmp_path / "out" / "table2.csv").open()))
    kd_lenet = next(r for r in table if r["method"] == "kd" and r["student"] == "lenet")
    assert float(kd_lenet["seed 0"]) == pytest.approx(60) and float(kd_lenet["seed 1"]) == pytest.approx(64)
    assert float(kd_lenet["mean"]) == pytest.approx(62) and float(kd_lenet["std"]) == pytest.approx(2 ** 1.5, abs=1e-4)
    assert not any(r["method"] == "scratch" and r["student"] == "teacher" for r in table)
    assert (tmp_path / "out" / "table2.md").read_text() == markdown + "\n"


def test_table2_shows_paper_numbers_only_for_cifar10(tmp_path):
    markdown = write_table2(tmp_path / "out", paper_rows(tmp_path), STUDENTS, "cifar10")
    assert "paper alexnet" in markdown.splitlines()[0]
    assert "69.8" in markdown.splitlines()[-1]
    table = list(csv.DictReader((tmp_path / "out" / "table2.csv").open()))
    assert next(r for r in table if r["method"] == "scratch" and r["student"] == "lenet")["paper"] == "56.5"


def test_table2_with_one_seed_prints_the_mean_alone(tmp_path):
    row = make_row(tmp_path, "tsp", {0: dict(lenet=0.625)})
    markdown = write_table2(tmp_path / "out", [row], ["lenet"], "digits")
    assert "62.50" in markdown and "±" not in markdown and "n=" not in markdown


def grid_runs(tmp_path: Path) -> tuple[list[GridPoint], Path]:
    scratch = make_run(tmp_path / "scratch", {s: 0.5 for s in STUDENTS}, val=dict(lenet=0.5, alexnet=0.6,
                                                                                   mobilenet=0.8))
    vals = [dict(lenet=0.55, alexnet=0.6, mobilenet=0.81), dict(lenet=0.58, alexnet=0.6, mobilenet=0.79),
            dict(lenet=0.58, alexnet=0.6, mobilenet=0.83)]
    grid = [GridPoint(0.1, 0.9 - g, g, make_run(tmp_path / f"grid{i}", {s: 0.5 for s in STUDENTS}, val=v))
            for i, (g, v) in enumerate(zip([0.0, 0.1, 0.2], vals))]
    return grid, scratch


def test_grid_selection_takes_best_val_point_for_weakest_and_strongest_student(tmp_path):
    grid, scratch = grid_runs(tmp_path)
    weakest, strongest, chosen = select_grid_points(grid, scratch)
    assert (weakest, strongest) == ("lenet", "mobilenet")
    assert chosen == {"weakest": grid[1], "strongest": grid[2]}  # lenet ties at 58 on points 1 and 2: first wins


def test_the_tuned_rows_train_with_the_points_chosen_for_the_weakest_and_the_strongest_student(tmp_path):
    grid, scratch = grid_runs(tmp_path)
    protocol = SimpleNamespace(grid=[(point.alpha, point.beta, point.gamma) for point in grid])
    tuned = choose_tuned(protocol, tmp_path / "out", [scratch, *(point.run for point in grid)])
    assert {method: weights for method, (_, weights) in tuned.items()} == {
        "tsp_tuned_weakest": protocol.grid[1], "tsp_tuned_strongest": protocol.grid[2]}


def test_table1_lists_scratch_and_every_grid_point_and_marks_the_chosen(tmp_path):
    grid, scratch = grid_runs(tmp_path)
    markdown = write_table1(tmp_path / "out", grid, scratch, *select_grid_points(grid, scratch))
    lines = markdown.splitlines()
    assert "scratch" in lines[2] and "80.00" in lines[2]
    assert "weakest (lenet)" in lines[4] and "strongest (mobilenet)" in lines[5]
    assert "Weakest student (lowest scratch val accuracy): lenet; strongest: mobilenet." in markdown
    table = list(csv.DictReader((tmp_path / "out" / "table1.csv").open()))
    assert [r["run"] for r in table] == ["scratch", "grid", "grid", "grid"]
    assert float(table[3]["gamma"]) == pytest.approx(0.2) and float(table[3]["mobilenet val acc %"]) == 83


def test_verdicts_pair_seeds_and_report_sign_and_how_often_the_claim_holds(tmp_path):
    rows = paper_rows(tmp_path)
    lines = verdicts(rows, STUDENTS)
    assert len(lines) == 9
    # tsp - kd for alexnet: +4, +3 -> mean 3.5, std 0.71; for mobilenet: -1, -1
    assert "TSP > KD for alexnet: +3.50 ± 0.71 points over 2 seeds (holds in 2/2)" in lines
    assert "TSP not > KD for mobilenet: -1.00 ± 0.00 points over 2 seeds (holds in 0/2)" in lines
    assert "KD > scratch for lenet: +11.00 ± 1.41 points over 2 seeds (holds in 2/2)" in lines
    write_verdicts(tmp_path / "out", lines)
    assert (tmp_path / "out" / "verdicts.md").read_text().count("\n- ") == 9


def test_tuned_and_alternate_rows_are_compared_to_tsp_on_shared_seeds_only(tmp_path):
    rows = paper_rows(tmp_path)[2:]  # tsp alone: no kd or scratch claims
    rows.append(make_row(tmp_path, "tsp_tuned_weakest", {1: dict(lenet=0.60, alexnet=0.70, mobilenet=0.70),
                                                          5: dict(lenet=0.9, alexnet=0.9, mobilenet=0.9)},
                         label="TSP tuned (weakest: lenet)"))
    rows.append(make_row(tmp_path, "alternate_lenet", {0: dict(lenet=0.64, alexnet=0.1, mobilenet=0.1)},
                         label="alternate (lenet last)"))
    assert verdicts(rows, STUDENTS) == [
        "TSP tuned (weakest: lenet) not > TSP for lenet: -3.00 points over 1 seed (holds in 0/1)",
        "TSP tuned (weakest: lenet) > TSP for alexnet: +4.00 points over 1 seed (holds in 1/1)",
        "TSP tuned (weakest: lenet) not > TSP for mobilenet: +0.00 points over 1 seed (holds in 0/1)",
        "alternate (lenet last) > TSP for lenet: +2.00 points over 1 seed (holds in 1/1)"]


def is_png(path: Path, min_bytes: int = 5000) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > min_bytes


def test_curves_are_written_as_one_figure_per_quantity(tmp_path):
    rows = paper_rows(tmp_path)
    mentor = make_row(tmp_path, "alternate_lenet", {0: dict(lenet=0.6)})  # no alexnet or mobilenet curves
    paths = plot_curves(tmp_path / "out", [*rows, mentor], STUDENTS)
    assert [p.name for p in paths] == ["curves_loss.png", "curves_accuracy.png"]
    assert all(is_png(p) for p in paths)


LABELS = [0, 1, 2, 0, 1, 2, 0, 1]


def test_qualitative_indices_select_exactly_the_right_and_wrong_pattern():
    labels = np.array(LABELS)
    teacher = np.array([0, 1, 2, 0, 1, 0, 0, 1])    # wrong at 5
    scratch = np.array([1, 1, 0, 0, 2, 0, 1, 1])    # wrong at 0, 2, 4, 5, 6
    kd = np.array([0, 1, 0, 0, 1, 2, 0, 0])         # wrong at 2, 7
    assert qualitative_indices(labels, [teacher, kd], [scratch]).tolist() == [0, 4, 6]
    assert qualitative_indices(labels, [teacher, kd], [scratch], limit=2).tolist() == [0, 4]
    peer_a, peer_b = np.array([0] * 8), np.array([2] * 8)  # right at 0, 3, 6 and at 2, 5
    assert qualitative_indices(labels, [], [teacher, scratch], [peer_a, peer_b]).tolist() == [5]
    assert qualitative_indices(labels, [], [scratch], []).tolist() == []


def test_qualitative_figures_are_written_even_when_a_student_has_no_example(tmp_path):
    students = ["lenet", "alexnet"]
    labels = LABELS
    prediction_runs = {
        "teacher": {"labels": labels, "teacher": [0, 1, 2, 0, 1, 0, 0, 1], "lenet": labels, "alexnet": labels},
        "scratch": {"labels": labels, "lenet": [1, 1, 0, 0, 2, 0, 1, 1], "alexnet": [1] * 8},
        "kd": {"labels": labels, "lenet": [0, 1, 0, 0, 1, 2, 0, 0], "alexnet": [1] * 8},
        "tsp": {"labels": labels, "lenet": labels, "alexnet": labels}}
    runs = {name: make_run(tmp_path / name, {s: 0.5 for s in students}, predictions=p)
            for name, p in prediction_runs.items()}
    test = ImageSet(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.tensor(labels))
    paths = plot_qualitative(tmp_path / "out", runs["teacher"], runs["scratch"], runs["kd"], runs["tsp"], students,
                             test, ["zero", "one", "two"], per_student=4)
    assert [p.name for p in paths] == ["figure4.png", "figure5.png"] and all(is_png(p) for p in paths)


def test_qualitative_figures_need_teacher_predictions(tmp_path):
    run = make_run(tmp_path / "run", {"lenet": 0.5}, predictions={"labels": LABELS, "lenet": LABELS})
    test = ImageSet(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.tensor(LABELS))
    with pytest.raises(UserError, match="no 'teacher' predictions"):
        plot_qualitative(tmp_path / "out", run, run, run, run, ["lenet"], test, ["a", "b", "c"])


def test_verdicts_without_a_pair_of_methods_to_compare_say_why_there_are_none(tmp_path):
    """Before, --methods alternate alone wrote a verdicts.md of its title alone."""
    rows = [make_row(tmp_path, "alternate_lenet", {0: dict(lenet=0.64, alexnet=0.1, mobilenet=0.1)},
                     label="alternate (lenet last)")]
    write_verdicts(tmp_path / "out", verdicts(rows, STUDENTS))
    assert (tmp_path / "out" / "verdicts.md").read_text() == (
        "# Verdicts\n\nNo verdicts: each claim compares two methods over the same seeds (tsp with kd or scratch, kd "
        "with scratch, tuned or alternate with tsp), and these runs hold no such pair: give --methods both methods "
        "of one, e.g. kd,tsp\n")
