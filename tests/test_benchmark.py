import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from dist_tsp import checkpoint
from dist_tsp.config import LOSS_PRESETS
from dist_tsp.losses import tsp_loss
from dist_tsp.report import RESULTS_LINE
from tests.runs import ROOT

pytestmark = pytest.mark.slow


def test_step_breakdown_quick_mode_prints_a_table_per_configuration(tmp_path):
    """Its runs in a temporary folder, gone when it ends; scratch, which runs no teacher, names no teacher mode."""
    done = subprocess.run([sys.executable, "benchmarks/step_breakdown.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not list(tmp_path.glob("dist-tsp-*"))
    assert "### scratch, W=3 CPU" in done.stdout and "### tsp, teacher cached, W=3 CPU" in done.stdout
    assert "### Summary (slowest rank)" in done.stdout
    assert "| TSP cached / scratch step " in done.stdout and "### Targets" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("|      ")]
    assert len(rows) == 2 * 3  # two configurations of three ranks
    header = next(line for line in done.stdout.splitlines() if line.startswith("|   rank"))
    step_column = [cell.strip() for cell in header.split("|")].index("step ms")
    for row in rows:
        assert float(row.split("|")[step_column]) > 0


def test_teacher_modes_quick_mode_prints_every_mode_and_a_third_per_rank_when_parameter_sharded(tmp_path):
    """On the images it is given (the GPU check's, where scikit-learn and its digits may be missing), of any number
    of classes."""
    rng = np.random.default_rng(0)
    for split, size in (("train", 96), ("test", 32)):
        np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (size, 32, 32, 3), np.uint8),
                 labels=np.arange(size) % 4, classes=np.array(["a", "b", "c", "d"]))
    done = subprocess.run([sys.executable, "benchmarks/teacher_modes.py", "--quick", "--data", "data.name=npz",
                           f"data.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"data data.name=npz data.root={tmp_path} (96 training images), batch 48" in done.stdout
    assert not list(tmp_path.glob("dist-tsp-*"))  # its temporary folder, with the workers' JSON, is gone
    modes = ("replicated", "sharded", "cached", "fsdp", "deepspeed")
    rows = {cells[1].strip(): cells for cells in (line.split("|") for line in done.stdout.splitlines())
            if len(cells) == 9 and cells[1].strip() in modes}
    assert set(rows) == set(modes)
    for mode, cells in rows.items():
        teacher_ms, share = float(cells[3]), float(cells[7])
        assert teacher_ms >= 0 and (share < 0.4 if mode in ("fsdp", "deepspeed") else share == 1.0)
    assert "Which mode when" in done.stdout


def test_loader_quick_mode_prints_its_rows_as_they_come_then_the_table_and_leaves_no_temporary_folder(tmp_path):
    pytest.importorskip("torchcodec")
    done = subprocess.run([sys.executable, "benchmarks/loader.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not list(tmp_path.glob("dist-tsp-*"))
    lines = done.stdout.splitlines()
    assert any(line.startswith("folder in memory (224 px): padded crop + flip | 0 | ") for line in lines)
    assert not [line for line in lines if line.startswith("[")]  # before, each row as a Python list
    assert "data share of a step" in done.stdout


def test_a_benchmarks_temporary_work_folder_goes_when_it_ends_and_stays_named_when_it_fails(tmp_path, monkeypatch,
                                                                                            capsys):
    """Without --work-dir: removed at the end, on Ctrl-C and on exit 0; kept (what its runs left may explain the
    failure) and named in one line on stderr when the benchmark fails. A --work-dir given always stays."""
    work_dir = load_benchmark("step_breakdown").work_dir
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def used(ending: BaseException | None = None, given: Path | None = None) -> Path:
        try:
            with work_dir(given, "dist-tsp-test-") as work:
                (work / "run.log").write_text("step 1\n")
                if ending is not None:
                    raise ending
        except (RuntimeError, KeyboardInterrupt, SystemExit):
            pass
        return work

    for ending in (None, KeyboardInterrupt(), SystemExit(0)):
        assert not used(ending).exists()
    assert capsys.readouterr().err == ""
    for ending in (RuntimeError("a run failed"), SystemExit("benchmark run failed")):
        kept = used(ending)
        assert (kept / "run.log").is_file() and capsys.readouterr().err.endswith(f"kept for the failed runs: {kept}\n")
    given = tmp_path / "given" / "work"
    assert used(None, given) == given and (given / "run.log").is_file()
    assert (used(RuntimeError("a run failed"), given) / "run.log").is_file() and capsys.readouterr().err == ""


def test_benchmark_help_says_the_gpu_checks_time_limits_and_what_the_memory_baseline_is():
    gpu_check = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert "a time limit (below)" in gpu_check.stdout and "GPU_LIMITS_S" not in gpu_check.stdout
    assert "time limits on a GPU: 240 s per training run" in gpu_check.stdout and "150 s per protocol seed" in \
        gpu_check.stdout
    data_memory = subprocess.run([sys.executable, "benchmarks/data_memory.py", "--help"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
    assert "a baseline run (the demo's students learning from each other, no teacher" in data_memory.stdout
    assert "issue" not in data_memory.stdout


def test_loss_fusion_quick_mode_prints_both_timings_after_checking_the_losses_agree():
    done = subprocess.run([sys.executable, "benchmarks/loss_fusion.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cells = [line.split("|") for line in done.stdout.splitlines() if line.startswith("|   3 |")]
    assert len(cells) == 1 and float(cells[0][5]) > 0 and float(cells[0][6]) > 0


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_gpu_check(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # gpu_check.py adds the checkout to both
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return load_benchmark("gpu_check")


def test_the_gpu_check_without_pydantic_or_tabulate_names_the_wheels_to_bring_in_one_line():
    """A lent GPU machine's image has no pydantic (and may have no tabulate): before, the check ended in an import
    traceback."""
    hide = ("import runpy, sys; sys.modules['pydantic'] = sys.modules['annotated_types'] = None; "
            "sys.modules['tabulate'] = None; "
            "sys.argv = ['gpu_check.py', '--quick']; runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == ("gpu_check.py: error: pydantic, annotated-types, tabulate not "
                                                    "installed, without which dist-tsp cannot run: install them, or on "
                                                    "a machine without internet carry their wheels (README.md, The GPU "
                                                    "check)\n")


def test_rounds_report_each_number_as_its_median_over_the_rounds():
    step_breakdown = load_benchmark("step_breakdown")
    rounds = [[{"ms": {"teacher": t, "loss": 1.0}, "step_ms": s},
               {"ms": {"teacher": 0.0, "loss": loss}, "step_ms": 9.0}]
              for t, s, loss in ((3.0, 10.0, 2.0), (1.0, 30.0, 4.0), (2.0, 20.0, 3.0))]
    assert step_breakdown.median_ranks(rounds) == [{"ms": {"teacher": 2.0, "loss": 1.0}, "step_ms": 20.0},
                                                  {"ms": {"teacher": 0.0, "loss": 3.0}, "step_ms": 9.0}]


def test_the_gpu_checks_floor_step_computes_the_tsp_loss_of_its_models_and_moves_every_student(tmp_path, monkeypatch):
    """The floor the GPU check holds the captured step against, run uncaptured here: its loss is dist-tsp's TSP loss
    of the same logits (same dropout), and its fused Adam steps move every parameter tensor of every student."""
    gpu_check = load_gpu_check(monkeypatch)
    teacher_file = gpu_check.GpuCheck(tmp_path, quick=True, data=[], seeds=1, real_data=False).teacher_file
    torch.manual_seed(0)
    floor = gpu_check.minimal_step(teacher_file, False, torch.channels_last, torch.device("cpu"))
    random_state = torch.random.get_rng_state()
    with torch.no_grad():
        teacher = floor.teacher(floor.images)
        logits = torch.stack([student(floor.images) for student in floor.students])
    torch.random.set_rng_state(random_state)  # the step's forwards draw the same dropout masks
    before = [p.clone() for student in floor.students for p in student.parameters()]
    loss = floor.step()
    alpha, beta, gamma = LOSS_PRESETS["tsp"]
    expected = sum(tsp_loss(logits[k], floor.labels, teacher, torch.cat([logits[:k], logits[k + 1:]]), alpha=alpha,
                            beta=beta, gamma=gamma, temperature=10.0).total for k in range(len(floor.students)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    after = [p for student in floor.students for p in student.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_gpu_checks_correctness_reruns_on_cudnns_default_kernels_where_its_deterministic_ones_fail(
        tmp_path, monkeypatch):
    """A GPU whose cuDNN has no deterministic kernel for one of the convolutions still gets the comparisons (and says
    so), from runs of their own; any other failure of those runs fails the part without a rerun."""
    gpu_check = load_gpu_check(monkeypatch)
    check = gpu_check.GpuCheck(tmp_path, quick=True, data=[], seeds=1, real_data=False)
    commands = []

    def launch(failure):
        def run_command(command, timeout=None, **options):  # what a run leaves: its losses and students' weights
            commands.append(command)
            if "train.deterministic=true" in command and failure:
                return subprocess.CompletedProcess(command, 1, "", f"Traceback ...\nRuntimeError: {failure}")
            run = Path(next(arg for arg in command if arg.startswith("output_dir=")).split("=", 1)[1])
            (run / "metrics.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/lenet/loss": 2.0 / s}) + "\n"
                                                       for s in range(1, 9)))
            for student in gpu_check.STUDENTS:
                path = checkpoint.student_file(checkpoint.step_dir(run, 8), student)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": {"weight": torch.ones(2)}}, path)
            return subprocess.CompletedProcess(command, 0, "", "")
        return run_command

    step_breakdown = sys.modules["step_breakdown"]  # the module gpu_check's runs go through
    monkeypatch.setattr(step_breakdown, "run_command", launch("cuDNN error: GET was unable to find an engine"))
    report = check.correctness()
    assert "cuDNN's deterministic kernels failed here" in report and "unable to find an engine" in report
    assert report.count("| equal") == 6 and "**NO**" not in report
    assert any("train.deterministic=false" in command for command in commands)
    commands.clear()
    monkeypatch.setattr(step_breakdown, "run_command", launch("CUDA error: an illegal memory access"))
    with pytest.raises(SystemExit, match="illegal memory access"):
        check.correctness()
    assert not any("train.deterministic=false" in command for command in commands)


def test_the_gpu_checks_steps_part_reports_a_failed_run_in_its_row_and_still_measures_the_others(tmp_path,
                                                                                                  monkeypatch):
    """Before, one failed run (out of memory, a failed capture) lost every step measured in the part."""
    gpu_check = load_gpu_check(monkeypatch)
    check = gpu_check.GpuCheck(tmp_path, quick=True, data=[], seeds=1, real_data=False)

    def run_command(command, timeout=None, **options):
        if "train.step=eager" in command:
            return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nRuntimeError: CUDA error: out of memory")
        run = Path(next(arg for arg in command if arg.startswith("output_dir=")).split("=", 1)[1])
        (run / "profile").mkdir(parents=True)
        (run / "profile" / "rank0.json").write_text(json.dumps({"ms": {"forward": 2.0, "loss": 1.5, "data": 5.0}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sys.modules["step_breakdown"], "run_command", run_command)
    report = check.steps()
    assert re.search(r"\| dist-tsp, eager, fp32 +\| failed +\| .*train.step=eager.*CUDA error: out of memory", report)
    assert re.search(r"\| dist-tsp, graph-ready, not captured, fp32 +\| 3.50 +\| forward 2.0, loss 1.5 ", report)


def test_a_gpu_check_rerun_in_its_work_folder_redoes_each_part_and_its_protocol_takes_the_teacher_trained_there(
        tmp_path, monkeypatch):
    """A check cut in two under a lent GPU's limit per command (teacher, then protocol), or rerun: before, a part's
    teacher stage, protocol or logit cache found the earlier check's outputs and reused them, reporting seconds
    that were not spent, and a protocol run without the teacher part took an untrained teacher."""
    gpu_check = load_gpu_check(monkeypatch)
    found = []  # per command: its output folder's name, what was already there, its teacher file

    def check(parts: list[str]) -> str:  # the command run again in the same work folder
        checked = gpu_check.GpuCheck(tmp_path, quick=True, data=[], seeds=1, real_data=False)
        gpu_check.run_parts(checked, parts, "", tmp_path / "report.md")
        return (tmp_path / "report.md").read_text()

    def run_command(command, timeout=None, **options):
        overrides = dict(arg.split("=", 1) for arg in command if "=" in arg and not arg.startswith("-"))
        out = Path(overrides.get("output_dir") or command[command.index("--out") + 1])
        found.append((out.name, sorted(p.name for p in out.glob("*")), overrides["teacher.checkpoint"]))
        out.mkdir(parents=True, exist_ok=True)
        if "--teacher-only" in command:
            Path(overrides["teacher.checkpoint"]).write_bytes(b"trained")
            return subprocess.CompletedProcess(command, 0, "teacher step: eager\ntest accuracy 94.50 %\n", "")
        (out / "table2.md").write_text("| method | lenet |\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_check, "run_command", run_command)
    assert "teacher shared (untrained, the demo's shape" in check(["protocol"])
    assert found.pop() == ("protocol", [], str(tmp_path / "untrained_teacher.pt"))
    for parts in (["teacher"], ["protocol"], ["teacher", "protocol"]):
        report = check(parts)
        assert found == [(part, [], str(tmp_path / "teacher" / "model.pt")) for part in parts], parts
        assert "teacher shared (the teacher part's)" in report or parts == ["teacher"]
        found.clear()


# the arguments after --quick, and the one line: before, exit 1, a traceback once the data was decoded, or (--seeds 0)
# a failed part in a report that ended with exit 0
BAD_GPU_CHECKS = {
    "an unknown part": (["--parts", "x"], "--parts: unknown part 'x': choose from correctness, steps, teacher, "
                                          "protocol, modes"),
    "no seed": (["--seeds", "0"], "argument --seeds: 0: give at least 1: see --help"),
    "no CIFAR-10 there": (["--cifar10", "nowhere"], "--cifar10 nowhere: nowhere/train/airplane is not a folder: give "
                                                    "CIFAR-10 as an image folder, train/<class>/* and test/<class>/* "
                                                    "for its 10 classes (as unpack_cifar10.py writes it)"),
    "a report in no folder": (["--out", "nowhere/report.md"], "--out nowhere/report.md: give a file in a folder that "
                                                              "exists"),
    "a file as the work folder": (["--work-dir", "file"], "argument --work-dir: 'file' is a file: give a folder: see "
                                                         "--help"),
}


@pytest.mark.parametrize("case", BAD_GPU_CHECKS)
def test_a_gpu_check_given_bad_arguments_says_so_in_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    gpu_check = load_gpu_check(monkeypatch)
    arguments, line = BAD_GPU_CHECKS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").touch()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--quick", *arguments])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert (stop.value.code, capsys.readouterr().err) == (2, f"gpu_check.py: error: {line}\n")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


# a benchmark, its bad arguments, and the one line: before, tracebacks (some in every launched rank, with torchrun's
# report), or a failure once its data was made
BAD_BENCHMARKS = {
    "teacher_modes.py": (["--teacher-args", "[1, 2]"],
                         """--teacher-args [1, 2]: give a JSON object, e.g. '{"depth": 20}'"""),
    "step_breakdown.py": (["--rounds", "0"], "argument --rounds: 0: give at least 1: see --help"),
    "topk_cache.py": (["--k", "200"], "--k 200: give at most --classes (100)"),
    "data_memory.py": (["--work-dir", "file"], "argument --work-dir: 'file' is a file: give a folder: see --help"),
}


@pytest.mark.parametrize("benchmark", BAD_BENCHMARKS)
def test_a_benchmark_given_bad_arguments_says_so_in_one_line_before_any_work(benchmark, tmp_path):
    arguments, line = BAD_BENCHMARKS[benchmark]
    (tmp_path / "file").touch()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / benchmark), *arguments], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f"{benchmark}: error: {line}\n")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


def test_a_gpu_checks_work_folder_reuses_its_arrays_and_refuses_a_check_of_other_data(tmp_path, monkeypatch):
    """A check cut in two, or rerun, in one --work-dir takes the images decoded there, made whole (written aside,
    then renamed); one with another --cifar10 or --quick would have run on them, under its own report's name."""
    gpu_check = load_gpu_check(monkeypatch)
    data = tmp_path / "work" / "data"
    assert gpu_check.write_data(data, None, quick=True) == ["data.name=npz", f"data.root={data}"]
    arrays = {path: path.stat().st_mtime_ns for path in data.glob("*.npz")}
    gpu_check.write_data(data, None, quick=True)
    assert {path: path.stat().st_mtime_ns for path in data.glob("*.npz")} == arrays
    assert sorted(path.name for path in arrays) == ["test.npz", "train.npz"]
    other = r"holds a check of other data \(.*'quick': True.*this one .*'quick': False.*\): give this check another"
    with pytest.raises(SystemExit, match=other + " --work-dir, or the same --cifar10 and --quick"):
        gpu_check.write_data(data, None, quick=False)


def test_an_interrupted_gpu_check_keeps_its_finished_parts_and_what_the_interrupted_one_measured(tmp_path):
    """A time limit around the check on a lent GPU (`timeout`, SIGTERM): before, the part running was lost, and a
    check stopped in its first part left no report."""
    out, started = tmp_path / "report.md", tmp_path / "steps started"
    script = f"""
import importlib.util, sys, time
sys.path.insert(0, "benchmarks")
spec = importlib.util.spec_from_file_location("gpu_check", "benchmarks/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

def steps(self):
    self.step_rows.append(["dist-tsp, eager, fp32", "9.25", "forward 9.2"])
    open({str(started)!r}, "w").close()
    time.sleep(300)

gpu_check.GpuCheck.correctness = lambda self: "all equal"
gpu_check.GpuCheck.steps = steps
sys.argv = ["gpu_check.py", "--quick", "--out", {str(out)!r}, "--work-dir", {str(tmp_path / "work")!r}]
gpu_check.main()
"""
    check = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and check.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        check.send_signal(signal.SIGTERM)
        stderr = check.communicate(timeout=60)[1]
    finally:
        check.kill()
    assert check.returncode == 1 and stderr == (f"gpu_check.py: interrupted (Ctrl-C or SIGTERM); the parts done so "
                                                f"far are in {out}\n"), stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# dist-tsp GPU check\n\n- device: ") and "- parts: correctness, steps, teacher" in report
    assert re.search(r"\n## correctness \(\d+ s\)\n\nall equal\n\n## steps \(interrupted after \d+ s\)\n\n"
                     r"\| step .*\n\|[-|]+\n\| dist-tsp, eager, fp32 +\| 9.25 +\| forward 9.2 +\|\n$", report), report


def test_a_benchmark_command_past_its_time_limit_is_killed_with_what_it_started(tmp_path):
    """The GPU check's limit per command: the command and the processes it started (an accelerate launch's workers)
    all go, and the caller gets TimeoutError at the limit, not when the command would have ended."""
    pid_file = tmp_path / "worker.pid"
    launcher = ("import os, subprocess, sys, time; worker = subprocess.Popen(['sleep', '60']); "
                f"open('{pid_file}.tmp', 'w').write(str(worker.pid)); os.rename('{pid_file}.tmp', '{pid_file}'); "
                "time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not done in 5 s, killed"):
        load_benchmark("step_breakdown").run_command([sys.executable, "-c", launcher], timeout=5)
    assert time.monotonic() - started < 30 and pid_file.is_file()
    worker_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(worker_pid):
        assert time.monotonic() < deadline, "the worker outlived its launcher"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_gpu_checks_failure_report_shows_the_end_of_every_unfinished_runs_log(tmp_path, monkeypatch):
    finished = "step 6\n" + RESULTS_LINE + f"{tmp_path / 'kd'}/results.json\n| student | ... |\n"
    (tmp_path / "seed_0-kd.log").write_text(finished)
    (tmp_path / "seed_0-tsp.log").write_text("".join(f"step {n}\n" for n in range(1, 31)))
    report = load_gpu_check(monkeypatch).unfinished_logs(tmp_path)
    assert "seed_0-kd.log" not in report
    assert "seed_0-tsp.log, last 25 lines:" in report and "step 30" in report and "step 5\n" not in report
