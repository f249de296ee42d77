"""Which rank holds which students, and the process groups that follow from it.

W ranks, N students. Either W = N*R (each student on R data-parallel replicas) or N = W*K
(K students on every rank). Ranks form an (R, G) grid: row = replica index, column = position in
the peer group. A *peer group* (one row) holds one copy of every student and sees the same batch;
a *student group* (one column) holds the R replicas of the same students and averages gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _set_pg_timeout

from dist_tsp.errors import UserError

# torch 2.14 names it set_timeout and deprecates _set_pg_timeout (a FutureWarning on every call); torch 2.11, on the
# GPU machine, has only the latter.
set_group_timeout = getattr(dist, "set_timeout", _set_pg_timeout)


class PlacementError(UserError):
    """The launch shape does not fit the student count."""


@dataclass(kw_only=True, slots=True)
class Placement:
    """The layout of students on ranks, validated at construction."""

    world_size: int
    rank: int
    num_students: int
    replicas: int = field(init=False)
    students_per_rank: int = field(init=False)

    def __post_init__(self) -> None:
        w, n = self.world_size, self.num_students
        if w < 1 or n < 1 or not 0 <= self.rank < w:
            raise PlacementError(f"invalid placement: rank {self.rank} of {w} ranks, {n} students")
        if not self.fits(w, n):
            fits = sorted({d for d in range(1, n + 1) if n % d == 0} | {n * 2, n * 3})
            raise PlacementError(
                f"{w} processes cannot hold {n} students: launch a number of processes that divides "
                f"or is a multiple of {n} (e.g. {', '.join(map(str, fits))}) with --num_processes"
            )
        self.replicas, self.students_per_rank = (w // n, 1) if w % n == 0 else (1, n // w)

    @staticmethod
    def fits(world_size: int, num_students: int) -> bool:
        """W = N*R (R replicas per student) or N = W*K (K students per rank)."""
        return world_size % num_students == 0 or num_students % world_size == 0

    @property
    def peer_group_size(self) -> int:
        """G: ranks in one peer group."""
        return self.world_size // self.replicas

    @property
    def replica_index(self) -> int:
        """Which copy of the ensemble this rank belongs to (selects the data shard)."""
        return self.rank // self.peer_group_size

    @property
    def peer_rank(self) -> int:
        """Position of this rank inside its peer group."""
        return self.rank % self.peer_group_size

    @property
    def local_students(self) -> list[int]:
        """Indices (into the config's student list) of the students this rank trains."""
        first = self.peer_rank * self.students_per_rank
        return list(range(first, first + self.students_per_rank))

    def build_mesh(self, device_type: str, timeout: timedelta | None = None) -> DeviceMesh | None:
        """Create every subgroup once, on every rank, in the same order (None when single-process); their
        collectives raise after `timeout` (torch's default, 30 min, when None: a new group does not inherit the
        world group's)."""
        if self.world_size == 1:
            return None
        assert dist.get_world_size() == self.world_size, "placement built for another world size"
        names = ("replica", "peer")
        override = None if timeout is None else {name: _backend_options(device_type, timeout) for name in names}
        return init_device_mesh(device_type, (self.replicas, self.peer_group_size), mesh_dim_names=names,
                                backend_override=override)


def _backend_options(device_type: str, timeout: timedelta) -> C10dBackend.Options:
    """Options for a new group of the device's backend (NCCL on CUDA, gloo otherwise) with `timeout`."""
    options = dist.ProcessGroupNCCL.Options() if device_type == "cuda" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


@dataclass(frozen=True, slots=True)
class Groups:
    """The process groups a training step uses; None means "just this rank". `control` spans every rank on gloo
    whatever the device, for host-side agreements (the stop vote) that must not wait for the device."""

    peer: dist.ProcessGroup | None
    replica: dist.ProcessGroup | None
    world: dist.ProcessGroup | None
    control: dist.ProcessGroup | None = None

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh | None, timeout: timedelta | None = None) -> Groups:
        """Every group from the mesh; `control` with the run's collective `timeout` (torch's default when None)."""
        if mesh is None:
            return cls(peer=None, replica=None, world=None)
        peer = mesh.get_group("peer") if mesh["peer"].size() > 1 else None
        replica = mesh.get_group("replica") if mesh["replica"].size() > 1 else None
        control = dist.new_group(backend="gloo", timeout=timeout)
        return cls(peer=peer, replica=replica, world=dist.group.WORLD, control=control)

    def set_timeout(self, timeout: timedelta) -> None:
        """From now on every group's collectives raise after `timeout` (torchtitan switches from its start-up timeout
        to its training one the same way)."""
        for group in (self.world, self.peer, self.replica, self.control):
            if group is not None:
                set_group_timeout(timeout, group)

    @classmethod
    def world_only(cls) -> Groups:
        """Every rank as one group, and the control group: the teacher stage of --teacher-only, which has no
        placement."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return cls(peer=None, replica=None, world=None)
        return cls(peer=None, replica=None, world=dist.group.WORLD, control=dist.new_group(backend="gloo"))

    def world_mesh(self, device_type: str) -> DeviceMesh:
        """Every rank as a 1-D mesh over the world group (no new group): where a parameter-sharded teacher lives."""
        assert self.world is not None, "a single process has no mesh"
        return DeviceMesh.from_group(self.world, device_type)

