"""The graph-ready step's parts on the CPU: which step a launch gets, optimizers with a device learning rate, static
buffers. (Launched runs: tests/test_resume.py and test_teacher_modes.py train with train.step=graph and end bitwise
where the eager step does; the capture itself is checked on a GPU by benchmarks/gpu_check.py.)"""

from pathlib import Path

import pytest
import torch

from dist_tsp.config import ConfigError, load_config
from dist_tsp.cuda_graph import CapturedStep, choose_step, choose_teacher_step
from dist_tsp.data import Batch, load_dataset
from dist_tsp.run_control import StopRequest, StopVote
from dist_tsp.students import LocalStudent
from dist_tsp.teacher import train_teacher
from dist_tsp.train import plan

STUDENTS = "students=[{name: a, model: lenet}, {name: b, model: lenet}, {name: c, model: lenet}]"


def config(*overrides: str):
    return load_config(None, [STUDENTS, *overrides])


@pytest.mark.parametrize(("overrides", "replicas", "device", "expected"), [
    ((), 1, "cuda", "step: eager (train.step=eager)"),
    (("train.step=auto",), 1, "cuda", "step: CUDA graph (train.step=auto: captured after 3 eager steps)"),
    (("train.step=graph",), 1, "cuda", "step: CUDA graph (train.step=graph: captured after 3 eager steps)"),
    (("train.step=auto",), 1, "cpu", "step: eager (train.step=auto: no CUDA device)"),
    (("train.step=graph",), 1, "cpu",
     "step: graph-ready, not captured (train.step=graph on the CPU: the same step, without a CUDA graph)"),
    (("train.step=auto",), 2, "cuda",
     "step: eager (train.step=auto: the students have 2 replicas, whose DDP gradient all-reduce is not captured)"),
    (("train.step=auto", "teacher.mode=fsdp"), 1, "cuda",
     "step: eager (train.step=auto: teacher.mode=fsdp gathers its parameters under host control)"),
])
def test_each_launch_says_which_step_runs_and_why(overrides, replicas, device, expected):
    assert choose_step(config(*overrides), replicas, uses_teacher=True, device_type=device).line() == expected


@pytest.mark.parametrize("step, processes, device, expected", [
    ("graph", 3, "cuda", "teacher step: eager (train.step=graph: the teacher trains on 3 processes, whose DDP "
                         "gradient all-reduce is not captured)"),
    ("auto", 1, "cuda", "teacher step: CUDA graph (train.step=auto: captured after 3 eager steps)"),
    ("graph", 1, "cpu", "teacher step: graph-ready, not captured (train.step=graph on the CPU: the same step, "
                        "without a CUDA graph)"),
    ("eager", 1, "cuda", "teacher step: eager (train.step=eager)"),
])
def test_the_teachers_training_step_is_captured_on_one_process_and_stays_eager_under_ddp(step, processes, device,
                                                                                         expected):
    assert choose_teacher_step(config(f"train.step={step}"), processes, device).line() == expected


def test_a_teacher_trained_with_the_graph_ready_step_is_bitwise_the_eager_one(tmp_path, capsys):
    """The airbench recipe in small (Nesterov SGD with a tensor learning rate, the triangular schedule, label
    smoothing, BatchNorm statistics) on one CPU process."""
    from accelerate import Accelerator

    recipe = Path(__file__).resolve().parents[1] / "configs" / "paper" / "teacher_airbench.yaml"
    trained = {}
    for step in ("eager", "graph"):
        cfg = load_config(recipe, ["data={name: digits, image_size: 16}", "teacher.args={widths: [8, 16, 16]}",
                                   "teacher.epochs=2", "teacher.batch_size=64", f"train.step={step}",
                                   f"output_dir={tmp_path / step}"])
        data = load_dataset(cfg.data, cfg.seed)
        train_teacher(cfg, data, Accelerator(cpu=True), tmp_path / step / "teacher.pt", StopVote(StopRequest(), None))
        trained[step] = torch.load(tmp_path / step / "teacher.pt", weights_only=True)["model"]
    assert "teacher step: graph-ready, not captured" in capsys.readouterr().out
    assert trained["eager"].keys() == trained["graph"].keys()
    assert all(torch.equal(trained["eager"][k], trained["graph"][k]) for k in trained["eager"])


def test_a_sharded_teacher_the_students_do_not_learn_from_does_not_stop_the_capture():
    cfg = config("train.step=graph", "teacher.mode=deepspeed")
    assert choose_step(cfg, 1, uses_teacher=False, device_type="cuda").captured


def test_graph_step_that_cannot_be_captured_is_refused_at_launch_in_one_line(tmp_path):
    args = ["--config", "configs/demo.yaml", f"output_dir={tmp_path}", STUDENTS, "train.step=graph"]
    with pytest.raises(ConfigError, match=r"^train.step=graph cannot capture this run's step: the students have 2 "
                                          r"replicas, .* use train.step=auto .* or train.step=eager$"):
        plan(args, world_size=6, rank=0)
    with pytest.raises(ConfigError, match="train.compile makes torch.compile's own graphs"):
        plan([*args, "train.compile=true"], world_size=3, rank=0)


def test_captured_step_runs_on_static_buffers_refilled_from_every_batch():
    seen = []

    def step(batch, teacher_logits):
        seen.append((batch.images, teacher_logits))
        return batch.images.sum() + teacher_logits.sum()

    captured = CapturedStep(step, capture=False)
    batches = [Batch(torch.full((2, 3), float(k)), torch.tensor([k, k]), torch.tensor([k, k + 1])) for k in range(3)]
    outputs = [captured(batch, torch.full((2, 5), 10.0 * k)).item() for k, batch in enumerate(batches)]
    assert outputs == [0.0, 6.0 + 100.0, 12.0 + 200.0]
    assert all(images is seen[0][0] and logits is seen[0][1] for images, logits in seen)  # the same buffers
    with pytest.raises(ValueError, match=r"batch of shape \(1, 3\), but the step was made for \(2, 3\)"):
        captured(Batch(torch.zeros(1, 3), torch.zeros(1), torch.zeros(1)), torch.zeros(1, 5))


def test_a_checkpoint_without_a_cuda_random_state_leaves_a_students_own_generator_as_seeded():
    """A checkpoint written on a CPU holds no CUDA state: resumed by a captured step, whose student draws from a
    generator of its own, the generator keeps its seeded state (as the eager step keeps the device's)."""
    generator = torch.Generator().manual_seed(5)
    seeded = generator.get_state()
    student = LocalStudent("a", 0, torch.nn.Linear(2, 2), None, None, (torch.get_rng_state(), seeded), generator)
    student.load_random_state((torch.get_rng_state(), None))
    assert torch.equal(student.saved_random_state()[1], seeded)
