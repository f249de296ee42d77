import subprocess
import sys

import pytest

from tests.runs import ROOT

pytestmark = pytest.mark.slow


def test_step_breakdown_quick_mode_prints_a_table_per_configuration(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/step_breakdown.py", "--quick", "--work-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "### tsp, teacher sharded, W=3 CPU" in done.stdout and "### Summary (slowest rank)" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("|      ")]
    assert len(rows) == 1 + 3  # W=1: one rank, W=3: three ranks
    for row in rows:
        step_ms = float(row.split("|")[10])
        assert step_ms > 0
