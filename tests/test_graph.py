"""The teaching graph: presets as edge lists, frozen mentors, and the graph loss on 3 gloo ranks against one process."""

import pytest
import torch
import torch.distributed as dist

from dist_tsp.config import ConfigError, load_config
from dist_tsp.exchange import all_gather_cat
from dist_tsp.graph import TeachingGraph
from dist_tsp.losses import tsp_loss
from dist_tsp.placement import Groups, Placement
from tests.multiprocess import run_on_ranks

B, C, T = 11, 10, 4.0


def three_students(tmp_path, *overrides):
    weights = tmp_path / "mentor.pt"
    weights.touch()
    students = "students=[{name: a, model: lenet}, {name: b, model: lenet}, {name: c, model: lenet}]"
    return load_config(None, [students, *(o.format(init=weights) for o in overrides)])


def edges(graph):
    return sorted(str(e) for e in graph.edges)


def test_tsp_preset_is_labels_teacher_and_every_peer_into_every_student(tmp_path):
    graph = TeachingGraph.from_config(three_students(tmp_path, "loss.preset=tsp"))
    assert edges(graph) == sorted(f"{s} -> {t} ({w})" for t in "abc"
                                  for s, w in [("labels", 0.1), ("teacher", 0.8)] + [(p, 0.1) for p in "abc" if p != t])
    assert graph.uses_teacher and graph.uses_peers


def test_kd_and_scratch_have_no_peer_edges_and_mutual_has_no_teacher(tmp_path):
    kd, scratch, mutual = (TeachingGraph.from_config(three_students(tmp_path, f"loss.preset={p}"))
                           for p in ("kd", "scratch", "mutual"))
    assert kd.uses_teacher and not kd.uses_peers
    assert edges(scratch) == ["labels -> a (1)", "labels -> b (1)", "labels -> c (1)"]
    assert mutual.uses_peers and not mutual.uses_teacher


def test_frozen_mentors_teach_but_have_no_incoming_edges(tmp_path):
    cfg = three_students(tmp_path, "loss.preset=mentored", "students.0.init={init}", "students.0.frozen=true",
                         "students.1.init={init}", "students.1.frozen=true")
    graph = TeachingGraph.from_config(cfg)
    assert graph.learners == ["c"]
    assert edges(graph) == ["a -> c (0.3)", "b -> c (0.3)", "labels -> c (0.1)", "teacher -> c (0.6)"]
    assert graph.term_weights[:2].abs().sum() == 0 and graph.sources_of("c") == ["a", "b"]
    assert graph.peer_shares[2].tolist() == [1, 1, 0]  # exactly: gamma=0.3 weighs the summed KLs


def test_mean_reduction_gives_each_source_an_equal_share(tmp_path):
    graph = TeachingGraph.from_config(three_students(tmp_path, "loss.peer_reduction=mean"))
    expected = torch.tensor([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    torch.testing.assert_close(graph.peer_shares, expected)


def test_preset_and_a_disagreeing_weight_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"preset kd sets alpha=0.1, beta=0.9, gamma=0 but beta=0.5 is also given"):
        three_students(tmp_path, "loss.preset=kd", "loss.beta=0.5")


def test_frozen_student_without_weights_and_all_frozen_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="student a is frozen but has no init"):
        three_students(tmp_path, "students.0.frozen=true")
    with pytest.raises(ConfigError, match="every student is frozen"):
        three_students(tmp_path, *(f"students.{i}.{k}" for i in range(3) for k in ("init={init}", "frozen=true")))


def student_logits(index: int) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(200 + index))


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, C, (B,), generator=g), torch.randn(B, C, generator=g)


def graph_with_one_mentor(tmp_path) -> TeachingGraph:
    return TeachingGraph.from_config(three_students(tmp_path, "loss.preset=mentored", "students.1.init={init}",
                                                    "students.1.frozen=true", f"loss.temperature={T}"))


def _graph_step_on_ranks(graph: TeachingGraph):
    """What loop.StudentTrainer does: local logits, one all-gather, the learners' graph terms."""
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=3)
    groups = Groups.from_mesh(placement.build_mesh("cpu"))
    labels, teacher = batch()
    everyone = all_gather_cat(torch.stack([student_logits(i) for i in placement.local_students]), groups.peer)
    learning = [i for i in placement.local_students if graph.students[i] in graph.learners]
    if not learning:
        return {}
    totals, _ = graph.losses_for(learning)(everyone[learning], labels, teacher, everyone)
    return dict(zip(learning, totals.tolist()))


def test_mentor_logits_join_the_exchange_and_losses_match_one_process(tmp_path):
    graph = graph_with_one_mentor(tmp_path)
    per_rank = run_on_ranks(_graph_step_on_ranks, 3, graph)
    assert per_rank[1] == {}  # the mentor's rank computes no loss
    labels, teacher = batch()
    logits = [student_logits(i) for i in range(3)]
    for student in (0, 2):  # each learner: CE, teacher and both other students (one a mentor), by the plain formula
        peers = torch.stack([logits[j] for j in range(3) if j != student])
        expected = tsp_loss(logits[student], labels, teacher, peers, alpha=0.1, beta=0.6, gamma=0.3, temperature=T)
        assert per_rank[student] == pytest.approx({student: expected.total.item()}, rel=1e-6)
