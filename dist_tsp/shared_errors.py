"""Bad input met on some ranks stops every rank with one line. Before the student steps, the ranks agree on it and
rank 0 says it (a SharedUserError), where the others would crash in the next collective or wait in it until its
timeout. Met later by some ranks alone (an image that cannot be decoded), or by each on its own (a full disk), it
is recorded in the launch's store: the ranks that met it say it once, and those whose next collective fails because
of it exit with its code, quietly. A loader worker lost on one rank (killed for memory) is recorded the same way,
with its own exit code, and so is another rank's process gone (said once, by the first rank whose collective
failed). Work done once per node (listing an image folder) or first by one rank per node (a download) stops every
rank the same way on what it met. What the ranks check before the process group exists (the config, the files it
names) is agreed through torchrun's store, so that ranks that met nothing do not wait for those that left."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from dist_tsp.errors import SharedUserError, UserError

T = TypeVar("T")


def main_process_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """`work()` on the main process, then on each other node's first rank, then on the other ranks of every node: a
    download happens once where data.root is shared, once per node where each node has its own, and never by two
    processes of a node at once (under torchrun, which names the nodes; under a launcher that does not, every rank is
    a node of its own, so the ranks but the main process run it at once). Bad input that the main process or another
    node's first rank meets stops every rank in one line (naming that node's first rank)."""
    result, problem = _attempt(work) if accelerator.is_main_process else (None, None)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise SharedUserError(problem)
    if accelerator.num_processes == 1:
        return result
    firsts = {ranks[0] for ranks in _ranks_by_node()}  # a collective: every rank
    first_of_node = not accelerator.is_main_process and dist.get_rank() in firsts
    node_result = on_every_rank(work if first_of_node else lambda: None)
    if accelerator.is_main_process:
        return result
    return node_result if first_of_node else work()


def once_per_node(work: Callable[[], T], timeout: timedelta) -> T:
    """`work()` (no collectives in it) once on each node, by its first rank, whose result the node's other ranks
    receive, e.g. an image folder listed once per node, not by each of its ranks on a shared file system. Bad input
    met on some nodes stops every rank, naming those nodes' ranks, as on_every_rank does. A node's other ranks wait
    up to `timeout` for its first."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    nodes = _ranks_by_node()
    if len(nodes) == dist.get_world_size():  # a rank per node: nothing to share
        return on_every_rank(work)
    node_group, _ = dist.new_subgroups_by_enumeration(nodes, timeout=timeout, backend="gloo")
    try:
        first = dist.get_process_group_ranks(node_group)[0]
        outcome = [_attempt(work) if dist.get_rank() == first else None]
        dist.broadcast_object_list(outcome, src=first, group=node_group)
    finally:
        dist.destroy_process_group(node_group)
    result, problem = outcome[0]

    def received() -> T:
        if problem is not None:
            raise UserError(problem)
        return result

    return on_every_rank(received)


def _ranks_by_node() -> list[list[int]]:
    """Every node's ranks (a collective): a node is the ranks of one launcher, which torchrun's GROUP_RANK names;
    under a launcher that does not, every rank is a node of its own."""
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, os.environ.get("GROUP_RANK"))
    if None in nodes:
        nodes = list(range(len(nodes)))
    return [[rank for rank, other in enumerate(nodes) if other == node] for node in dict.fromkeys(nodes)]


def on_every_rank(work: Callable[[], T]) -> T:
    """`work()` (no collectives in it) on every rank at once, e.g. reading its checkpoint files. The message names
    the ranks that met it unless all did."""
    if not dist.is_initialized():
        return work()
    result, problem = _attempt(work)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    _stop_if_met(problems)
    return result


def before_the_process_group(work: Callable[[], T], timeout: timedelta) -> T:
    """`work()` on every rank before the process group exists (checking the config and the files it names), as
    on_every_rank does, through torchrun's store: bad input met on some ranks only (a node's own copy of a path) stops
    every rank at once, where the others would wait for them in the process group's rendezvous. Without torchrun's
    store (one process, another launcher), what a rank meets stops it alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return work()
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    result, problem = _attempt(work)
    store.set(_key("checked", os.environ["RANK"]), json.dumps(problem))
    keys = [_key("checked", rank) for rank in range(world_size)]
    store.wait(keys, timeout)
    _stop_if_met([json.loads(store.get(key)) for key in keys])
    return result


def _stop_if_met(problems: list[str | None]) -> None:
    """SharedUserError for the bad input the ranks met (each rank's message, or None), naming them unless all did."""
    met: dict[str, list[int]] = {}
    for rank, message in enumerate(problems):
        if message is not None:
            met.setdefault(message, []).append(rank)
    if not met:
        return
    if list(met.values()) == [list(range(len(problems)))]:
        raise SharedUserError(next(iter(met)))
    raise SharedUserError("; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: {message}"
                                    for message, ranks in met.items()))


def check_same_on_every_rank(what: str, describe: Callable[[], str], fix: str) -> None:
    """Refuse on every rank what a rank holds when its description differs from rank 0's, naming the ranks: `what`
    they did, e.g. "loaded a dataset"."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, describe())
    if differ := [rank for rank, other in enumerate(values) if other != values[0]]:
        raise SharedUserError(f"rank{'s' * (len(differ) > 1)} {', '.join(map(str, differ))} {what} other than "
                              f"rank 0's ({values[differ[0]]}; rank 0: {values[0]}): {fix}")


def _attempt(work: Callable[[], T]) -> tuple[T | None, str | None]:
    """`work()`'s result, or the bad input it met."""
    try:
        return work(), None
    except UserError as error:
        return None, str(error)


def said_by_another_rank_first(message: str, exit_code: int) -> bool:
    """Record what this rank met without the others (bad input in its shard, a full disk), with the code it exits
    with, for the other ranks; True when another rank recorded the same first (it has been said). False without a
    store to record it in."""
    store = _store()
    order = _record(store, message, exit_code)
    return any(store.get(_key("said", earlier)).decode().split(" ", 1)[1] == _storable(message)
               for earlier in range(1, order))


def record(message: str, exit_code: int) -> None:
    """Record what this rank alone met and says in one line (a lost loader worker), with the code it exits with, for
    the other ranks."""
    _record(_store(), message, exit_code)


def first_to_record(message: str, exit_code: int) -> bool:
    """Record what this rank says in one line unless another rank says it first (another rank's process gone, which
    every other rank meets at once); True when this rank is to say it (also without a store)."""
    return _record(_store(), message, exit_code) <= 1


def _record(store: dist.Store | None, message: str, exit_code: int) -> int:
    """`message` and `exit_code` recorded in `store`; their place among the records (0: no store)."""
    if store is None:
        return 0
    order = store.add(_key("said", "count"), 1)
    store.set(_key("said", order), f"{exit_code} {_storable(message)}")
    return order


def _storable(message: str) -> str:
    """`message` as the store keeps it (UTF-8): a file name that is not UTF-8 keeps its undecodable bytes escaped."""
    return message.encode("utf-8", "backslashreplace").decode()


def code_said_by_another_rank() -> int | None:
    """The exit code of what a rank recorded first, if one did: this rank's failed collective is its consequence,
    said by that rank."""
    store = _store()
    if store is None or not store.check([_key("said", 1)]):
        return None
    return int(store.get(_key("said", 1)).decode().split(" ", 1)[0])


def _store() -> dist.Store | None:
    """The store the default process group was made with (torchrun's agent holds it), if it can still be reached."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.check([_key("said", "count")])
    except (RuntimeError, ValueError):  # its server was in a process that has gone
        return None
    return store


def _key(*names: object) -> str:
    """This attempt's key (torchrun restarts its workers with the same store)."""
    return "/".join(["dist-tsp", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), *map(str, names)])
