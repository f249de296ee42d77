"""Who teaches whom: every student's loss as weighted edges from the labels, the teacher and other students.

Scratch, vanilla KD, TSP, the phases of alternate learning and online mutual learning are presets of this
one mechanism. A learner s has the edges labels -> s (alpha), teacher -> s (beta) and j -> s for every other
student j (gamma; the student edges into s are summed, or averaged with peer_reduction=mean). A frozen
student (a "mentor", trained in an earlier run) has no incoming edges: it only teaches, with its logits
computed in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_tsp.config import RunConfig

LABELS, TEACHER = "labels", "teacher"


@dataclass(frozen=True, slots=True)
class Edge:
    """`source` (labels, teacher or a student name) teaches `target` with `weight` in the target's loss."""

    source: str
    target: str
    weight: float

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.weight:g})"


@dataclass(frozen=True, slots=True)
class TeachingGraph:
    """The students in config order and the edges into every learner (none into a frozen student); the student
    edges into one learner share one weight, its peer weight."""

    students: list[str]
    learners: list[str]
    edges: list[Edge]
    peer_reduction: str = "sum"

    def __post_init__(self) -> None:
        for target in self.learners:
            weights = sorted({e.weight for e in self.edges if e.target == target and e.source in self.students})
            if len(weights) > 1:
                raise ValueError(f"the student edges into {target} weigh {weights}: give them one peer weight")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TeachingGraph:
        loss, names = cfg.loss, cfg.student_names
        learners = [s.name for s in cfg.students if not s.frozen]
        edges = []
        for target in learners:
            edges += [Edge(LABELS, target, loss.alpha), Edge(TEACHER, target, loss.beta)]
            edges += [Edge(source, target, loss.gamma) for source in names if source != target]
        return cls(students=names, learners=learners, edges=[e for e in edges if e.weight > 0],
                   peer_reduction=loss.peer_reduction)

    @property
    def uses_teacher(self) -> bool:
        return any(e.source == TEACHER for e in self.edges)

    @property
    def uses_peers(self) -> bool:
        """True when some student teaches another: the step needs the logit all-gather."""
        return any(e.source in self.students for e in self.edges)

    def sources_of(self, target: str) -> list[str]:
        """The students that teach `target`, in config order."""
        return [e.source for e in self.edges if e.target == target and e.source in self.students]

    def term_weights(self, device: torch.device | None = None) -> torch.Tensor:
        """[N, 3]: each student's weights of its CE, teacher-KL and peer-KL terms (0 for a frozen student)."""
        weights = torch.zeros(len(self.students), 3)
        for edge in self.edges:
            weights[self.students.index(edge.target), {LABELS: 0, TEACHER: 1}.get(edge.source, 2)] = edge.weight
        return weights.to(device)

    def peer_shares(self, device: torch.device | None = None) -> torch.Tensor:
        """[N, N]: row s, column j = 1 when student j teaches s, 1/P (s's P sources) when averaged."""
        shares = torch.zeros(len(self.students), len(self.students))
        for edge in self.edges:
            if edge.source in self.students:
                count = len(self.sources_of(edge.target)) if self.peer_reduction == "mean" else 1
                shares[self.students.index(edge.target), self.students.index(edge.source)] = 1 / count
        return shares.to(device)
