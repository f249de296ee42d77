"""One small launcher for multi-process tests: run a function on W gloo ranks and collect the results."""

from __future__ import annotations

import io
import os
import queue as queues
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_tsp.side_by_side import free_port

# The ranks fork from one server process that imported torch and dist_tsp once for the whole session: a spawned rank
# spends seconds importing them again on every call.
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(["dist_tsp.train", "tests.multiprocess"])
POLL_S = 0.2  # how often the parent looks at the ranks while it waits for their results
FAILURE_GRACE_S = 5.0  # after a rank raised, the others' time to report too (they may wait for it in a collective)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180,
                 nodes: Sequence[int | None] | None = None) -> list[Any]:
    """Call `fn(*args)` on `world_size` new processes, with this process's environment, joined in a gloo group as
    torchrun starts them: on one node, or rank r on node nodes[r] (its GROUP_RANK, with LOCAL_RANK and
    LOCAL_WORLD_SIZE among that node's ranks; None: a launcher that sets no GROUP_RANK); results by rank.

    Raises AssertionError, after killing the ranks still running, when a rank raised (with its traceback), exited
    without a result (with its exit code), or when the ranks have not all given their result within `timeout` s."""
    queue = CONTEXT.Queue()
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "GROUP_RANK"}  # now, not the server's from its start
    nodes = [0] * world_size if nodes is None else list(nodes)
    procs = [CONTEXT.Process(target=_entry, args=(fn, rank, world_size, port, queue,
                                                  {**environment, **torchrun_node(nodes, rank)}, args))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    finished = False
    try:
        results, failures, problem = _collect(procs, queue, timeout)
        finished = not failures and not problem
    finally:
        for p in procs:
            if finished:
                p.join(30)  # every rank gave its result: let it leave its process group
            if p.is_alive():
                p.kill()
            p.join()
        queue.close()
    if not finished:
        raise AssertionError("\n".join([*(f"rank {r}:\n{value}" for r, value in sorted(failures.items())),
                                        *([problem] if problem else [])]))
    return [results[r] for r in range(world_size)]


def _collect(procs: list, queue, timeout: float) -> tuple[dict[int, Any], dict[int, str], str | None]:
    """Wait for every rank's result; stop at once when a rank dies without one, FAILURE_GRACE_S after a rank
    raised, or after `timeout` s. Returns the results, the tracebacks and what went wrong otherwise."""
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    start = time.monotonic()
    first_failure = None
    seen_dead: set[int] = set()
    while len(results) + len(failures) < len(procs):
        try:
            rank, ok, value = queue.get(timeout=POLL_S)
        except queues.Empty:
            missing = [r for r in range(len(procs)) if r not in results and r not in failures]
            # A rank flushes what it sent before it exits, so one seen dead a whole poll ago sent nothing.
            if silent := [r for r in missing if r in seen_dead]:
                alive = [r for r in missing if r not in silent]
                return results, failures, "; ".join(
                    [*(f"rank {r} exited with code {procs[r].exitcode} without a result" for r in silent),
                     *([f"ranks {alive} were still running: killed"] if alive else [])])
            seen_dead = {r for r in missing if procs[r].exitcode is not None}
            now = time.monotonic()
            if first_failure is not None and now - first_failure > FAILURE_GRACE_S:
                return results, failures, (f"ranks {missing} gave no result {FAILURE_GRACE_S:g} s after rank "
                                           f"{min(failures)} raised: killed (waiting for it in a collective?)")
            if now - start > timeout:
                return results, failures, (f"ranks {missing} gave no result within {timeout:g} s: killed (hung?)")
            continue
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            failures[rank] = value
            first_failure = first_failure or time.monotonic()
    return results, failures, None


def torchrun_node(nodes: list[int | None], rank: int) -> dict[str, str]:
    """What torchrun tells `rank` of its node, nodes[rank] (None: a launcher that names no GROUP_RANK)."""
    here = [other for other, node in enumerate(nodes) if node == nodes[rank]]
    said = {"LOCAL_RANK": str(here.index(rank)), "LOCAL_WORLD_SIZE": str(len(here))}
    return said if nodes[rank] is None else {**said, "GROUP_RANK": str(nodes[rank])}


def _entry(fn, rank: int, world_size: int, port: int, queue, environment: dict[str, str], args) -> None:
    os.environ.clear()
    os.environ.update(environment, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Serialized, not shared: a tensor sent through the queue shares memory by a file descriptor that is gone
        # once this process exits, which can be before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
