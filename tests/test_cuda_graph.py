"""The graph-ready step's parts on the CPU: which step a launch gets, optimizers with a device learning rate, static
buffers, nothing read back from the device inside the step. (Launched runs: tests/test_resume.py and
test_teacher_modes.py train with train.step=graph and end bitwise where the eager step does; the capture itself is
checked on a GPU by benchmarks/gpu_check.py.)"""

import collections
import os
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from dist_tsp import train
from dist_tsp.config import ConfigError, load_config
from dist_tsp.cuda_graph import CapturedStep, choose_step, choose_teacher_step, step_autocast
from dist_tsp.data import Batch, load_dataset
from dist_tsp.run_control import StopRequest, StopVote
from dist_tsp.students import LocalStudent
from dist_tsp.teacher import train_teacher
from dist_tsp.train import plan
from tests.multiprocess import run_on_ranks
from tests.runs import ROOT, TINY

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


def _autocast_in_bf16() -> dict[str, tuple[bool, bool, bool]]:
    """(autocast on in bf16, its cache of the weights' casts on, the environment emptied) in each step's autocast
    entered twice, in a process of its own: accelerate keeps one mixed precision per process."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    seen, autocasts = {}, {captured: step_autocast(accelerator, captured) for captured in (False, True)}
    emptied, clear = [], os.environ.clear
    os.environ.clear = lambda: (emptied.append(True), clear())  # how accelerate's settings empty it for a moment
    for captured, autocast in autocasts.items():
        emptied.clear()
        for _ in range(2):
            with autocast():
                on = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                cached = torch.is_autocast_cache_enabled()
        seen["captured" if captured else "uncaptured"] = (on, cached, bool(emptied))
    del os.environ.clear
    return seen


def test_a_captured_steps_autocast_keeps_no_cache_of_the_weights_casts_and_leaves_the_environment_alone():
    """A graph would replay the casts cached in its first step after the optimizer has changed the weights. Before,
    each use asked accelerate for it, which empties the process environment for a moment (while a pin-memory
    thread or NCCL's may read it) in each student's forward of the steps before the capture."""
    assert run_on_ranks(_autocast_in_bf16, 1) == [{"uncaptured": (True, True, False),
                                                  "captured": (True, False, False)}]


def test_a_checkpoint_without_a_cuda_random_state_leaves_a_students_own_generator_as_seeded():
    """A checkpoint written on a CPU holds no CUDA state: resumed by a captured step, whose student draws from a
    generator of its own, the generator keeps its seeded state (as the eager step keeps the device's)."""
    generator = torch.Generator().manual_seed(5)
    seeded = generator.get_state()
    student = LocalStudent("a", 0, torch.nn.Linear(2, 2), None, None, (torch.get_rng_state(), seeded), generator)
    student.load_random_state((torch.get_rng_state(), None))
    assert torch.equal(student.saved_random_state()[1], seeded)


# Ops that read a device tensor back to the host (a value, a size that depends on values) or make one from host
# data: inside a CUDA graph's capture each is an error, and in an uncaptured step a wait for the device.
READS_BACK = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
              "unique_dim", "unique_consecutive", "lift_fresh"}
# Copies to the host that dispatch nothing on a CPU tensor: watched as calls
HOST_COPIES = {(torch.Tensor, "cpu"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"), (torch, "from_numpy")}


class OpsReadingBack(TorchDispatchMode):
    """Counts what reads back (READS_BACK, an index by a mask, repeat_interleave without its output size, and the
    HOST_COPIES calls that `watch_host_copies` reports) while it is active, except inside an optimizer's step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self.active, self.in_optimizer, self.all_ops = False, False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_optimizer:
            self.all_ops += 1
            name = func.overloadpacket.__name__
            if name in READS_BACK or _shape_from_values(name, func._overloadname, args, kwargs):
                self.seen[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def watch_host_copies(self, monkeypatch) -> None:
        for owner, name in HOST_COPIES:
            def counted(*args, _original=getattr(owner, name), _name=name, **kwargs):
                if self.active and not self.in_optimizer:
                    self.seen[_name] += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(owner, name, counted)


def _shape_from_values(name: str, overload: str, args: tuple, kwargs: dict) -> bool:
    """An op whose output's size depends on a tensor's values (a host read on CUDA): an index by a boolean mask, a
    repeat_interleave by a tensor of repeats without its output size."""
    if name in ("index", "index_put", "index_put_"):
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return name == "repeat_interleave" and overload != "self_int" and kwargs.get("output_size") is None


def test_the_graph_ready_steps_of_the_students_and_the_teacher_read_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Every call of a graph-ready step (the students' and the teacher's training step, what a CUDA graph captures)
    in a run on the CPU, its optimizers' steps aside: on the CPU those read their float64 learning rate back, as the
    eager step's float, while on CUDA they are torch's fused, capturable ones."""
    watch = OpsReadingBack()
    watch.watch_host_copies(monkeypatch)
    steps_run = collections.Counter()

    def watched(step, name):
        def run(*inputs):
            steps_run[name] += 1
            with watch:
                return step(*inputs)
        return run

    original = CapturedStep.__init__
    monkeypatch.setattr(CapturedStep, "__init__", lambda self, step, **options: original(
        self, watched(step, getattr(step, "__name__", "?")), **options))
    pre = register_optimizer_step_pre_hook(lambda *_: setattr(watch, "in_optimizer", True))
    post = register_optimizer_step_post_hook(lambda *_: setattr(watch, "in_optimizer", False))
    try:
        train.main(["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, "train.step=graph",
                    f"output_dir={tmp_path}"], stop_requested=StopRequest())
    finally:
        pre.remove()
        post.remove()
    assert steps_run["_learn"] == 6 and steps_run["learn"] > 0, steps_run  # the students' steps, the teacher's
    assert watch.all_ops > 1000  # the steps ran under the watch: forwards, backwards, the loss
    assert not watch.seen, dict(watch.seen)
