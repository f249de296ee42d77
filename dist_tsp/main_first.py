"""Work the main process does before the others (a download happens once), with its bad input shared by every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from dist_tsp.errors import SharedUserError, UserError

T = TypeVar("T")


def main_process_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on the main process, then on the others. Bad input the main process meets stops every rank with it
    (a SharedUserError), rather than leaving the others to fail in a barrier that it never reaches."""
    problem = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise SharedUserError(problem)
    return result if accelerator.is_main_process else work()
