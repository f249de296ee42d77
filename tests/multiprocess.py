"""One small launcher for multi-process tests: run a function on W gloo ranks and collect the results."""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180) -> list[Any]:
    """Call `fn(*args)` on `world_size` spawned processes joined in a gloo group; results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, queue, args)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures = []
    for _ in procs:
        rank, ok, value = queue.get()
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            failures.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]


def _entry(fn, rank: int, world_size: int, port: int, queue, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
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
