"""The training step captured once in a CUDA graph and replayed (train.step=graph or auto): which step runs, and
the capture.

Paper-size students on a GPU are bound by kernel launches and Python, not arithmetic: replaying the whole step
(students' forwards, the peer all-gather, the teacher, the loss, backward, optimizer steps) as one graph removes
both. The captured step is the eager step's own code, run on static buffers that the batch is copied into at the
step's boundary. What makes it capturable is set up where each part is built: fused optimizers whose learning rate
is a device tensor that the schedule fills between replays (optim.py), each student's random state a CUDA
generator swapped in graph-safely and registered with the graph (students.py), autocast without its weight cache,
and nothing in the step that reads the device back. On the CPU the same graph-ready step runs without capture:
that is what the tests compare with the eager step.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, get_mixed_precision_context_manager

from dist_tsp.config import ConfigError, RunConfig
from dist_tsp.data import Batch
from dist_tsp.teacher_modes import PARAMETER_SHARDED


@dataclass(frozen=True, slots=True)
class StepChoice:
    """Whether the step is the graph-ready one, whether it is captured, and why (the start-up line)."""

    graph_ready: bool
    captured: bool
    reason: str
    what: str = "step"

    def line(self) -> str:
        kind = "CUDA graph" if self.captured else "graph-ready, not captured" if self.graph_ready else "eager"
        return f"{self.what}: {kind} ({self.reason})"


def choose_step(cfg: RunConfig, replicas: int, uses_teacher: bool, device_type: str) -> StepChoice:
    """The students' step train.step asks for on this launch; ConfigError, before any work, when train.step=graph
    cannot be captured here."""
    blockers = []
    if replicas > 1:
        blockers.append(f"the students have {replicas} replicas, whose DDP gradient all-reduce is not captured")
    if uses_teacher and cfg.teacher.mode in PARAMETER_SHARDED:
        blockers.append(f"teacher.mode={cfg.teacher.mode} gathers its parameters under host control")
    if cfg.train.compile:
        blockers.append("train.compile makes torch.compile's own graphs")
    if blockers and cfg.train.step == "graph":
        raise ConfigError(f"train.step=graph cannot capture this run's step: {blockers[0]}: use train.step=auto "
                          "(the eager step where the graph cannot run) or train.step=eager")
    return _choice(cfg, blockers, device_type, "step")


def choose_teacher_step(cfg: RunConfig, processes: int, device_type: str) -> StepChoice:
    """The teacher's training step under train.step: on several processes (DDP) it stays eager, whatever was asked,
    since the students' step may still be captured."""
    blockers = [f"the teacher trains on {processes} processes, whose DDP gradient all-reduce is not captured"] \
        if processes > 1 else []
    return _choice(cfg, blockers, device_type, "teacher step")


def _choice(cfg: RunConfig, blockers: list[str], device_type: str, what: str) -> StepChoice:
    asked = cfg.train.step
    if asked == "eager":
        return StepChoice(False, False, "train.step=eager", what)
    if blockers:
        return StepChoice(False, False, f"train.step={asked}: {blockers[0]}", what)
    if device_type != "cuda":
        if asked == "graph":
            return StepChoice(True, False, "train.step=graph on the CPU: the same step, without a CUDA graph", what)
        return StepChoice(False, False, "train.step=auto: no CUDA device", what)
    return StepChoice(True, True, f"train.step={asked}: captured after {cfg.train.graph_warmup} eager steps", what)


def step_autocast(accelerator: Accelerator, captured: bool) -> Callable[[], AbstractContextManager]:
    """accelerate's autocast for a step; for a captured one without its cache of the weights' casts, which a graph
    would keep from one replay to the next. That one is asked of accelerate once, and made again from its settings
    for each use: accelerate reads its settings with the process environment emptied for a moment, which other
    threads (a pin-memory thread, NCCL's) must not see once the steps run."""
    if not captured:
        return accelerator.autocast
    made = get_mixed_precision_context_manager(accelerator.native_amp, AutocastKwargs(cache_enabled=False))
    if not isinstance(made, torch.autocast):
        return contextlib.nullcontext
    return functools.partial(torch.autocast, made.device, dtype=made.fast_dtype, cache_enabled=False)


class CapturedStep:
    """Runs `step(batch, teacher_logits)` on static copies of its inputs: eagerly for the first `warmup` calls
    (real steps, on a side stream: optimizer state, NCCL communicators and cuBLAS handles are made), then captured
    once in a CUDA graph with `generators` registered, and replayed. Without `capture` (CPU) every call runs eagerly
    on the same buffers. Returns the step's output tensor (the same static tensor on every replay), or None when
    the step returns none."""

    def __init__(self, step: Callable[[Batch, torch.Tensor | None], torch.Tensor | None], *, capture: bool,
                 warmup: int = 3, generators: Sequence[torch.Generator] = ()) -> None:
        self.step, self.capture, self.warmup, self.generators = step, capture, warmup, generators
        self.inputs: tuple[Batch, torch.Tensor | None] | None = None
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self, batch: Batch, teacher_logits: torch.Tensor | None) -> torch.Tensor | None:
        self._load(batch, teacher_logits)
        self.calls += 1
        if not self.capture:
            return self.step(*self.inputs)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():  # uncaptured on purpose: torch warns once
                warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
                output = self.step(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            return output
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            for generator in self.generators:  # registered before the capture begins: the replays advance their offsets
                self.graph.register_generator_state(generator)
            # thread_local: a streamed loader's pin-memory thread may allocate pinned memory during the capture,
            # which the default (global) mode turns into a failed capture (as in torch.compile's CUDA graphs)
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = self.step(*self.inputs)
        self.graph.replay()
        return self.output

    def _load(self, batch: Batch, teacher_logits: torch.Tensor | None) -> None:
        """Copy the step's inputs into the static buffers (made from the first batch)."""
        if self.inputs is None:
            self.inputs = (Batch(batch.images.clone(), batch.labels.clone(), batch.indices),
                           None if teacher_logits is None else teacher_logits.clone())
            return
        static, static_teacher = self.inputs
        if batch.images.shape != static.images.shape:
            raise ValueError(f"captured step: batch of shape {tuple(batch.images.shape)}, but the step was made for "
                             f"{tuple(static.images.shape)}")
        static.images.copy_(batch.images, non_blocking=True)
        static.labels.copy_(batch.labels, non_blocking=True)
        if static_teacher is not None:
            static_teacher.copy_(teacher_logits, non_blocking=True)
        self.inputs = (static._replace(indices=batch.indices), static_teacher)
