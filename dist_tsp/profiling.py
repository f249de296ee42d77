"""Optional per-step timing of the parts of a training step (train.profile=true); free when off."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_tsp.checkpoint import write_text_atomic

# "graph": the whole graph-ready step (replayed on CUDA), whose parts are not timed apart; "between": the rest of a
# step's wall time, the host's work outside every section (learning-rate updates, metrics, the stop vote, logging)
SECTIONS = ("data", "teacher", "forward", "idle", "exchange", "loss", "backward", "optimizer", "graph", "between")
WARMUP_STEPS = 3  # steps not timed: first allocations, kernel choices, caches filling


class StepProfiler:
    """Wall time per named section, per step, after `warmup` steps; the sections and "between" add up to the wall
    time from one step_done() to the next.

    When enabled, each section synchronizes the device on entry and exit so that GPU time is
    charged to the section that queued it; "idle" is a barrier over the peer group just before
    the teacher and just before the exchange, i.e. the time this rank waits for its slowest peer
    (which the teacher's and the exchange's collectives would otherwise absorb).
    """

    def __init__(self, enabled: bool, device: torch.device, warmup: int = WARMUP_STEPS) -> None:
        self.enabled, self.device, self.warmup = enabled, device, warmup
        self.totals: dict[str, float] = defaultdict(float)
        self.steps_seen = 0
        self._null = contextlib.nullcontext()
        self._last_done: float | None = None  # when the last step was done
        self._in_sections = 0.0  # seconds in sections since then

    def section(self, name: str) -> contextlib.AbstractContextManager:
        return self._timed(name) if self.enabled else self._null

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        elapsed = time.perf_counter() - start
        self._in_sections += elapsed
        if self.steps_seen >= self.warmup:
            self.totals[name] += elapsed

    def timed_batches(self, batches: Iterator) -> Iterator:
        """Yield from `batches`, charging each next() to "data"; an epoch's first step is timed from here (what
        came before it, evaluation and the epoch's checkpoint, is not a step's)."""
        self.not_a_step()
        iterator = iter(batches)
        while True:
            with self.section("data"):
                item = next(iterator, None)
            if item is None:
                return
            yield item

    def wait_for_peers(self, group: dist.ProcessGroup | None) -> None:
        """When profiling: a barrier over the peer group, charged to "idle" (waiting for the slowest peer)."""
        if self.enabled and group is not None:
            with self._timed("idle"):
                dist.barrier(group=group)

    def not_a_step(self) -> None:
        """What ran since the last step (an epoch's evaluation, a checkpoint) is no step's "between"."""
        if self.enabled:
            self._sync()
            self._last_done, self._in_sections = time.perf_counter(), 0.0

    def step_done(self) -> None:
        if not self.enabled:
            return
        self._sync()
        now = time.perf_counter()
        if self._last_done is not None and self.steps_seen >= self.warmup:
            self.totals["between"] += now - self._last_done - self._in_sections
        self._last_done, self._in_sections = now, 0.0
        self.steps_seen += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self, batch_size: int, students: int) -> dict[str, Any]:
        """Milliseconds per step by section, images/s per student, and peak memory."""
        steps = max(1, self.steps_seen - self.warmup)
        ms = {name: 1000 * self.totals.get(name, 0.0) / steps for name in SECTIONS}
        step_ms = sum(ms.values())
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"steps": steps, "ms": ms, "step_ms": step_ms, "students": students,
                "images_per_s_per_student": 1000 * batch_size / step_ms if step_ms else 0.0, "peak_mb": peak_mb}

    def write(self, path: Path, batch_size: int, students: int) -> None:
        write_text_atomic(path, json.dumps(self.report(batch_size, students), indent=2) + "\n")
