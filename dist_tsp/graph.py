"""Who teaches whom: every learner's loss weights on the labels, the teacher and the other students.

Scratch, vanilla KD, TSP, the phases of alternate learning and online mutual learning are presets of this
one mechanism. A learner s has the edges labels -> s (alpha), teacher -> s (beta) and j -> s for every other
student j (gamma; the student edges into s are summed, or averaged with peer_reduction=mean). A frozen
student (a "mentor", trained in an earlier run) has no incoming edges: it only teaches, with its logits
computed in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_tsp.config import LABELS, TEACHER, RunConfig
from dist_tsp.losses import graph_terms


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
    """The students in config order, the learners among them, and the weights of every learner's loss, built from
    the loss config alone: `term_weights` [N, 3] (CE, teacher KL, peer KL; a zero row for a frozen student) and
    `peer_shares` [N, N] (row s, column j: 1 when j teaches s, 1/P of s's P sources when averaged)."""

    students: list[str]
    learners: list[str]
    term_weights: torch.Tensor
    peer_shares: torch.Tensor
    temperature: float
    uses_teacher: bool = field(init=False)  # some learner has a teacher term: every step needs the teacher's logits
    uses_peers: bool = field(init=False)  # some student teaches another: every step needs the logit all-gather

    def __post_init__(self) -> None:
        object.__setattr__(self, "uses_teacher", bool((self.term_weights[:, 1] > 0).any()))
        object.__setattr__(self, "uses_peers", bool((self.peer_shares > 0).any()))

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TeachingGraph:
        loss, names = cfg.loss, cfg.student_names
        learners = [s.name for s in cfg.students if not s.frozen]
        term_weights = torch.zeros(len(names), 3)
        peer_shares = torch.zeros(len(names), len(names))
        for s, name in enumerate(names):
            if name not in learners:
                continue
            term_weights[s] = torch.tensor([loss.alpha, loss.beta, loss.gamma])
            sources = [j for j in range(len(names)) if j != s] if loss.gamma > 0 else []
            for j in sources:
                peer_shares[s, j] = 1 / len(sources) if loss.peer_reduction == "mean" else 1
        return cls(students=names, learners=learners, term_weights=term_weights, peer_shares=peer_shares,
                   temperature=loss.temperature)

    def sources_of(self, target: str) -> list[str]:
        """The students that teach `target`, in config order."""
        row = self.peer_shares[self.students.index(target)]
        return [name for name, share in zip(self.students, row.tolist()) if share > 0]

    @property
    def edges(self) -> list[Edge]:
        """The graph as edges into every learner (those of weight 0 left out), for reading."""
        edges = []
        for target in self.learners:
            alpha, beta, gamma = self.term_weights[self.students.index(target)].tolist()
            edges += [Edge(LABELS, target, alpha), Edge(TEACHER, target, beta)]
            edges += [Edge(source, target, gamma) for source in self.sources_of(target)]
        return [e for e in edges if e.weight > 0]

    def losses_for(self, learners: list[int], device: torch.device | None = None) -> LearnerLosses:
        """The step's loss for the learners at these config indices, with its weights on `device`."""
        return LearnerLosses(self.term_weights[learners].to(device), self.peer_shares[learners].to(device),
                             self.temperature)


@dataclass(frozen=True, slots=True)
class LearnerLosses:
    """The pure core of a step for K learners: their logits, the labels, the teacher's logits and every student's
    exchanged logits give each learner's weighted total [K] and its unweighted terms [K, 3] (CE, teacher KL, peer
    KL, at the temperature, with T^2)."""

    term_weights: torch.Tensor  # [K, 3]
    peer_shares: torch.Tensor  # [K, N]
    temperature: float

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 everyone: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        terms = graph_terms(logits, labels, teacher_logits, everyone, self.peer_shares, self.temperature)
        return (self.term_weights * terms).sum(dim=1), terms
