"""What the student phase decides at step boundaries: the metrics summed since the last log step, each student's first
non-finite loss, and whether every rank agreed to stop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_tsp import checkpoint
from dist_tsp.errors import NonFiniteLoss
from dist_tsp.exchange import all_reduce

TRAIN_METRICS = ("loss", "ce", "kd", "peer", "acc")
NEVER = float(2**52)  # "no non-finite loss yet" in the first-bad-step tracker


class RunControl:
    """Per step, on the device and without reading anything back: the learners' metric rows are summed and their
    first non-finite step kept. At a log step, two collectives over every rank: the first bad steps (a NonFiniteLoss
    before anything is logged or checkpointed), then the sums, as one metrics row. Beside every step, the stop vote.
    """

    def __init__(self, names: list[str], learners: list[str], *, replicas: int, world: dist.ProcessGroup | None,
                 control: dist.ProcessGroup | None, stop_requested: StopRequest, device: torch.device,
                 output_dir: Path) -> None:
        self.names, self.learners, self.replicas, self.world = names, learners, replicas, world
        self.output_dir = output_dir  # named in the non-finite loss message: its last complete checkpoint
        self.stop_vote = StopVote(stop_requested, control)
        self.stop_agreed = False
        self.running = torch.zeros(len(names), len(TRAIN_METRICS), device=device)
        self.first_nonfinite = torch.full((len(names),), NEVER, device=device)
        self.device_step = torch.zeros((), device=device)
        self.steps_since_log = 0

    def start_step(self) -> None:
        """Cast this rank's stop vote; it travels while the step runs."""
        self.stop_vote.start()

    def record(self, learner_index: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """Count a step, adding the rows [K, 5] (loss, ce, kd, peer, acc) of the learners at `learner_index` (none on a
        rank of mentors only)."""
        self.device_step += 1
        self.steps_since_log += 1
        if rows is not None:
            broken = ~torch.isfinite(rows[:, :4]).all(dim=1)
            seen = self.first_nonfinite[learner_index]
            self.first_nonfinite[learner_index] = torch.where(broken, torch.minimum(seen, self.device_step), seen)
            self.running.index_add_(0, learner_index, rows)

    def end_step(self) -> bool:
        """Whether every rank agreed to stop after this step."""
        self.stop_agreed = self.stop_vote.result()
        return self.stop_agreed

    def metrics_row(self, step: int, epoch: int) -> dict[str, Any]:
        """The mean of every learner's metrics since the last log step (then reset), after stopping on a non-finite
        loss (see raise_if_nonfinite)."""
        self.raise_if_nonfinite()
        means = all_reduce(self.running, self.world) / (self.steps_since_log * self.replicas)
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        for name, values in zip(self.names, means.tolist()):
            if name in self.learners:
                row.update({f"train/{name}/{metric}": v for metric, v in zip(TRAIN_METRICS, values)})
        self.running.zero_()
        self.steps_since_log = 0
        return row

    def raise_if_nonfinite(self) -> None:
        """NonFiniteLoss, naming the student, step and term, when a loss was NaN or inf since the last log step:
        before any checkpoint could keep the damage."""
        first_bad = all_reduce(self.first_nonfinite.clone(), self.world, dist.ReduceOp.MIN).tolist()
        if min(first_bad) == NEVER:
            return
        index = min(range(len(self.names)), key=lambda i: first_bad[i])
        sums = all_reduce(self.running.clone(), self.world)[index].tolist()
        terms = [m for m, v in zip(TRAIN_METRICS[1:4], sums[1:4]) if not math.isfinite(v)] or ["total"]
        kept = checkpoint.complete_checkpoints(self.output_dir)
        last = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite {'/'.join(terms)} loss for student {self.names[index]} at step "
                            f"{int(first_bad[index])}: stopping; {last} (lower the learning rate or the temperature)")


class StopRequest:
    """Whether a stop signal came: set by the signal handler, read before every step. A plain attribute, so that a
    handler can set it at any moment: threading.Event.set takes a lock, and a second signal arriving inside the
    first handler's set() waited on that lock forever (each further signal nesting another handler)."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested


class StopVote:
    """Whether every rank stops after this step: asked every step without holding it up or reading the device.

    A rank votes 1 once a stop was requested (SIGTERM, SIGUSR1). The votes meet in a MAX all-reduce of one CPU value
    over the gloo `control` group, started before the step and read after it, so that it runs beside the step, and
    every rank stops after the same step: the one after the step that the signal interrupted.
    """

    def __init__(self, requested: StopRequest, group: dist.ProcessGroup | None) -> None:
        self.requested, self.group = requested, group
        self.vote = torch.zeros(1)
        self.pending: dist.Work | None = None

    def start(self) -> None:
        self.vote.fill_(float(self.requested.is_set()))
        if self.group is not None:
            self.pending = dist.all_reduce(self.vote, dist.ReduceOp.MAX, group=self.group, async_op=True)

    def result(self) -> bool:
        if self.pending is not None:
            self.pending.wait()
        return self.vote.item() > 0
