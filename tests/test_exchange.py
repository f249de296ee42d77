"""The per-step collectives on 3 gloo ranks, each compared with the same formula computed in one process, and the
one collective a training step makes."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_tsp import exchange
from dist_tsp.exchange import all_gather_cat, all_gather_cat_parts
from dist_tsp.losses import tsp_loss
from dist_tsp.placement import Groups, Placement
from tests.multiprocess import run_on_ranks

B, C, WORLD = 13, 10, 3
LOSS = dict(alpha=0.1, beta=0.8, gamma=0.1, temperature=4.0)


def local_logits(student: int) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(100 + student))


def shared_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, C, (B,), generator=g), torch.randn(B, C, generator=g)


def _step_on_ranks(num_students: int):
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=num_students)
    groups = Groups.from_mesh(placement.build_mesh("cpu"))
    labels, teacher_logits = shared_inputs()
    mine = torch.stack([local_logits(s) for s in placement.local_students])
    everyone = all_gather_cat(mine, groups.peer)
    losses = {}
    for k, s in enumerate(placement.local_students):
        peers = everyone[[j for j in range(num_students) if j != s]]
        losses[s] = tsp_loss(mine[k], labels, teacher_logits, peers, **LOSS).total.item()
    return {"gathered": everyone, "losses": losses}


@pytest.fixture(scope="module")
def one_per_rank():
    return run_on_ranks(_step_on_ranks, WORLD, 3)


def reference_losses(num_students: int) -> dict[int, float]:
    """The same formula in one process, with every student's logits at hand."""
    labels, teacher_logits = shared_inputs()
    logits = torch.stack([local_logits(s) for s in range(num_students)])
    return {s: tsp_loss(logits[s], labels, teacher_logits, logits[[j for j in range(num_students) if j != s]],
                        **LOSS).total.item() for s in range(num_students)}


def test_peer_all_gather_gives_every_rank_all_logits_in_student_order(one_per_rank):
    expected = torch.stack([local_logits(s) for s in range(3)])
    for result in one_per_rank:
        assert torch.equal(result["gathered"], expected)


def test_distributed_tsp_losses_equal_single_process_formula(one_per_rank):
    reference = reference_losses(3)
    for rank, result in enumerate(one_per_rank):
        assert result["losses"] == pytest.approx({rank: reference[rank]}, rel=1e-6)


def test_two_students_per_rank_gather_and_losses_match():
    results = run_on_ranks(_step_on_ranks, 2, 4)  # N = W*K with K = 2
    reference = reference_losses(4)
    expected = torch.stack([local_logits(s) for s in range(4)])
    for rank, result in enumerate(results):
        assert torch.equal(result["gathered"], expected)
        assert result["losses"] == pytest.approx({s: reference[s] for s in (2 * rank, 2 * rank + 1)}, rel=1e-6)


def _gather_parts_together_and_apart():
    """A bf16 [2, B, C] part and an fp32 [5, C] part, gathered in one collective and each on its own (and the
    first again as the only part)."""
    rank = dist.get_rank()
    logits = torch.randn(2, B, C, generator=torch.Generator().manual_seed(rank)).bfloat16()
    teacher_slice = torch.randn(5, C, generator=torch.Generator().manual_seed(50 + rank))
    together = all_gather_cat_parts([logits, teacher_slice], dist.group.WORLD)
    apart = [all_gather_cat(part, dist.group.WORLD) for part in (logits, teacher_slice)]
    return together + all_gather_cat_parts([logits], dist.group.WORLD), apart + apart[:1]


def test_parts_gathered_in_one_collective_equal_separate_gathers_in_their_own_dtypes():
    for together, apart in run_on_ranks(_gather_parts_together_and_apart, WORLD):
        assert [t.dtype for t in together] == [torch.bfloat16, torch.float32, torch.bfloat16]
        assert [t.shape for t in together] == [(2 * WORLD, B, C), (5 * WORLD, C), (2 * WORLD, B, C)]
        for mine, reference in zip(together, apart):
            assert torch.equal(mine, reference)


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "barrier",
               "reduce_scatter_tensor", "all_to_all_single", "send", "recv")


def _collectives_of_steps(output_dir: str) -> list[list[str]]:
    """The collectives each of 3 training steps of the demo's students made on this rank (its teacher sharded)."""
    from accelerate import Accelerator

    from dist_tsp.config import load_config
    from dist_tsp.data import load_dataset
    from dist_tsp.graph import TeachingGraph
    from dist_tsp.loop import StudentTrainer
    from dist_tsp.models import build_model
    from dist_tsp.run_control import StopRequest
    from dist_tsp.teacher_modes import RunTeacher
    from dist_tsp.tracking import Tracker
    from tests.runs import TINY

    cfg = load_config("configs/demo.yaml", [*TINY, f"output_dir={output_dir}"])
    accelerator = Accelerator(cpu=True)
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=3)
    data = load_dataset(cfg.data, cfg.seed)
    teacher = RunTeacher(build_model(cfg.teacher.model, data.num_classes, **cfg.teacher.args).eval(), sharded=True,
                         autocast=accelerator.autocast)
    trainer = StudentTrainer(cfg, placement, Groups.from_mesh(placement.build_mesh("cpu")), accelerator, data,
                             data.identity(), TeachingGraph.from_config(cfg), teacher, None, Tracker(cfg, accelerator),
                             StopRequest())
    made: list[str] = []

    def counted(name, collective):
        def call(*args, **kwargs):
            made.append(name)
            return collective(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    exchange._all_gather_single = counted("all_gather_single", exchange._all_gather_single)
    steps = []
    for _, batch in zip(range(3), trainer.batches.epoch(0)):
        before = len(made)
        trainer.train_step(batch)
        steps.append(made[before:])
    return steps


def test_a_training_step_makes_one_collective_the_peer_all_gather_of_logits_and_teacher_slices(tmp_path):
    """The students' logits and the sharded teacher's slices travel in one message; metrics stay on the device until
    the log step (the stop vote runs beside the step, on its own group)."""
    for steps in run_on_ranks(_collectives_of_steps, WORLD, str(tmp_path)):
        assert steps == [["all_gather_single"]] * 3


def _metrics_rows_on_ranks() -> tuple[list[dict], str]:
    """Rank r holds student r % 2 of "a", "b" (2 replicas each; "mentor" learns nothing) and records, for 3 steps and
    then 1, the row its `known_row` gives; the two rows logged after them. Then 2 more steps, the second's kd term NaN
    on rank 3 alone (a replica of "b"): what the log step after them raises."""
    from dist_tsp.errors import NonFiniteLoss
    from dist_tsp.run_control import RunControl, StopRequest

    rank = dist.get_rank()
    control = RunControl(["a", "b", "mentor"], ["a", "b"], replicas=2, world=dist.group.WORLD, control=None,
                         stop_requested=StopRequest(), device=torch.device("cpu"), output_dir=Path("unused"))
    logged = []
    for steps in ((1, 2, 3), (4,)):
        for step in steps:
            control.record(torch.tensor([rank % 2]), known_row(rank, step)[None])
        logged.append(control.metrics_row(step=steps[-1], epoch=0))
    for step in (5, 6):
        row = known_row(rank, step)
        if (rank, step) == (3, 6):
            row[2] = float("nan")
        control.record(torch.tensor([rank % 2]), row[None])
    with pytest.raises(NonFiniteLoss) as raised:
        control.metrics_row(step=6, epoch=0)
    return logged, str(raised.value)


@pytest.fixture(scope="module")
def metrics_on_four_ranks() -> list[tuple[list[dict], str]]:
    return run_on_ranks(_metrics_rows_on_ranks, 4)


def known_row(rank: int, step: int) -> torch.Tensor:
    """What rank `rank` records at `step`: loss, ce, kd, peer, acc, each its own value."""
    return torch.tensor([100.0 * rank + 10 * step + metric for metric in range(5)])


def test_logged_metrics_are_each_learners_mean_over_its_replicas_and_the_steps_since_the_last_log(
        metrics_on_four_ranks):
    expected = []
    for steps in ((1, 2, 3), (4,)):
        row = {}
        for student, name in enumerate(("a", "b")):
            mean = torch.stack([known_row(rank, step) for rank in (student, student + 2) for step in steps]).mean(0)
            row.update({f"train/{name}/{metric}": value for metric, value in
                        zip(("loss", "ce", "kd", "peer", "acc"), mean.tolist())})
        expected.append({"step": steps[-1], "epoch": 0, **row})
    for logged, _ in metrics_on_four_ranks:
        assert logged == [pytest.approx(row) for row in expected]


def test_a_nonfinite_loss_of_one_replica_of_one_student_stops_every_rank_naming_student_step_and_term(
        metrics_on_four_ranks):
    """The other student stays finite and the mentor learns nothing: one bad learner is enough."""
    for _, stopped in metrics_on_four_ranks:
        assert stopped.startswith("non-finite kd loss for student b at step 6: stopping; no checkpoint was written")
