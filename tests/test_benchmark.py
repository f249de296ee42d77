import importlib.util
import subprocess
import sys

import pytest

from tests.runs import ROOT

pytestmark = pytest.mark.slow


def test_step_breakdown_quick_mode_prints_a_table_per_configuration(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/step_breakdown.py", "--quick", "--work-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "### tsp, teacher cached, W=3 CPU" in done.stdout and "### Summary (slowest rank)" in done.stdout
    assert "| TSP cached / scratch step " in done.stdout and "### Targets" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("|      ")]
    assert len(rows) == 2 * 3  # two configurations of three ranks
    header = next(line for line in done.stdout.splitlines() if line.startswith("|   rank"))
    step_column = [cell.strip() for cell in header.split("|")].index("step ms")
    for row in rows:
        assert float(row.split("|")[step_column]) > 0


def test_teacher_modes_quick_mode_prints_every_mode_and_a_third_per_rank_when_parameter_sharded(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/teacher_modes.py", "--quick", "--work-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    modes = ("replicated", "sharded", "cached", "fsdp", "deepspeed")
    rows = {cells[1].strip(): cells for cells in (line.split("|") for line in done.stdout.splitlines())
            if len(cells) == 9 and cells[1].strip() in modes}
    assert set(rows) == set(modes)
    for mode, cells in rows.items():
        teacher_ms, share = float(cells[3]), float(cells[7])
        assert teacher_ms >= 0 and (share < 0.4 if mode in ("fsdp", "deepspeed") else share == 1.0)
    assert "Which mode when" in done.stdout


def test_loss_fusion_quick_mode_prints_both_timings_after_checking_the_losses_agree():
    done = subprocess.run([sys.executable, "benchmarks/loss_fusion.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cells = [line.split("|") for line in done.stdout.splitlines() if line.startswith("|   3 |")]
    assert len(cells) == 1 and float(cells[0][5]) > 0 and float(cells[0][6]) > 0


def test_rounds_report_each_number_as_its_median_over_the_rounds():
    spec = importlib.util.spec_from_file_location("step_breakdown", ROOT / "benchmarks" / "step_breakdown.py")
    step_breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_breakdown)
    rounds = [[{"ms": {"teacher": t, "loss": 1.0}, "step_ms": s},
               {"ms": {"teacher": 0.0, "loss": loss}, "step_ms": 9.0}]
              for t, s, loss in ((3.0, 10.0, 2.0), (1.0, 30.0, 4.0), (2.0, 20.0, 3.0))]
    assert step_breakdown.median_ranks(rounds) == [{"ms": {"teacher": 2.0, "loss": 1.0}, "step_ms": 20.0},
                                                  {"ms": {"teacher": 0.0, "loss": 3.0}, "step_ms": 9.0}]
