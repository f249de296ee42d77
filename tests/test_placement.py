from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_tsp.config import load_config
from dist_tsp.placement import Groups, Placement, PlacementError
from dist_tsp.students import build_local_students
from tests.multiprocess import run_on_ranks
from tests.runs import TINY


@pytest.mark.parametrize("world, students, replicas, per_rank, peer_group", [
    (3, 3, 1, 1, 3), (4, 2, 2, 1, 2), (1, 3, 1, 3, 1), (6, 3, 2, 1, 3), (2, 4, 1, 2, 2),
])
def test_layout_arithmetic(world, students, replicas, per_rank, peer_group):
    layouts = [Placement(world_size=world, rank=r, num_students=students) for r in range(world)]
    assert all(p.replicas == replicas and p.students_per_rank == per_rank for p in layouts)
    assert layouts[0].peer_group_size == peer_group
    held = sorted(s for p in layouts for s in p.local_students)
    assert held == sorted(list(range(students)) * replicas)


def test_peer_groups_hold_every_student_once_and_replicas_the_same_students():
    layouts = [Placement(world_size=4, rank=r, num_students=2) for r in range(4)]
    assert [p.local_students for p in layouts] == [[0], [1], [0], [1]]
    assert [p.replica_index for p in layouts] == [0, 0, 1, 1]


@pytest.mark.parametrize("world, students", [(2, 3), (4, 3), (5, 2), (3, 2)])
def test_shapes_that_do_not_fit_are_rejected_with_the_fix(world, students):
    with pytest.raises(PlacementError, match=rf"{world} processes cannot hold {students} students: launch a number"):
        Placement(world_size=world, rank=0, num_students=students)


def _group_membership(num_students: int):
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=num_students)
    groups = Groups.from_mesh(placement.build_mesh("cpu"))
    ranks = lambda g: None if g is None else dist.get_process_group_ranks(g)  # noqa: E731
    return {"peer": ranks(groups.peer), "replica": ranks(groups.replica), "students": placement.local_students}


def test_one_student_per_rank_groups_on_three_ranks():
    results = run_on_ranks(_group_membership, 3, 3)
    assert [r["peer"] for r in results] == [[0, 1, 2]] * 3
    assert [r["replica"] for r in results] == [None] * 3
    assert [r["students"] for r in results] == [[0], [1], [2]]


def test_two_replicas_of_two_students_groups_on_four_ranks():
    results = run_on_ranks(_group_membership, 4, 2)
    assert [r["peer"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["replica"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["students"] for r in results] == [[0], [1], [0], [1]]


def test_one_rank_holds_all_three_students():
    placement = Placement(world_size=1, rank=0, num_students=3)
    assert placement.local_students == [0, 1, 2]
    assert Groups.from_mesh(placement.build_mesh("cpu")) == Groups(peer=None, replica=None, world=None)


def test_each_student_and_each_replica_draws_its_own_dropout_stream_wherever_it_is_placed():
    """A student's random state (AlexNet's dropout) is seeded by the run's seed, the student and its replica: the
    three students on one rank draw what their first replicas draw on six ranks, and the second replicas their own."""
    cfg, cpu = load_config("configs/demo.yaml", TINY), torch.device("cpu")

    def first_draws(world_size: int, rank: int) -> dict[tuple[str, int], list[float]]:
        placement = Placement(world_size=world_size, rank=rank, num_students=3)
        draws = {}
        for student in build_local_students(cfg, placement, SimpleNamespace(replica=None), cpu, 10, 1):
            with student.generating(cpu):
                draws[student.name, placement.replica_index] = torch.rand(8).tolist()
        return draws

    on_one_rank = first_draws(1, 0)
    with_replicas = {key: draw for rank in range(6) for key, draw in first_draws(6, rank).items()}
    assert len(on_one_rank) == 3 and len(with_replicas) == 6
    assert all(with_replicas[key] == draw for key, draw in on_one_rank.items())
    assert len({tuple(draw) for draw in with_replicas.values()}) == 6
