"""Work before the student steps whose bad input, met on any rank, stops every rank with it: said once by rank 0
(a SharedUserError), where the others would crash in the next collective or wait in it until its timeout."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from dist_tsp.errors import SharedUserError, UserError

T = TypeVar("T")


def main_process_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on the main process, then on the others (a download happens once)."""
    result, problem = _attempt(work) if accelerator.is_main_process else (None, None)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise SharedUserError(problem)
    return result if accelerator.is_main_process else work()


def on_every_rank(work: Callable[[], T]) -> T:
    """`work()` (no collectives in it) on every rank at once, e.g. reading its checkpoint files. The message names
    the ranks that met it unless all did."""
    if not dist.is_initialized():
        return work()
    result, problem = _attempt(work)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    met: dict[str, list[int]] = {}
    for rank, message in enumerate(problems):
        if message is not None:
            met.setdefault(message, []).append(rank)
    if not met:
        return result
    if list(met.values()) == [list(range(len(problems)))]:
        raise SharedUserError(next(iter(met)))
    raise SharedUserError("; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: {message}"
                                    for message, ranks in met.items()))


def _attempt(work: Callable[[], T]) -> tuple[T | None, str | None]:
    """`work()`'s result, or the bad input it met."""
    try:
        return work(), None
    except UserError as error:
        return None, str(error)
