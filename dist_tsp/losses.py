"""The Teacher-Student-Peer loss, as a pure function of logits."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


class TSPLoss(NamedTuple):
    """The weighted total and each unweighted term (kd and peer already include T^2)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    peer: torch.Tensor


def weighted_kl(source_logits: torch.Tensor, weights: torch.Tensor, student_log_probs: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """sum_s weights[k, s] * T^2 * KL(softmax(source_s/T) || student_k), batch mean, for each of K students.

    `source_logits` [S, B, C] (constants: no gradient flows into them); `weights` [K, S]; `student_log_probs`
    [K, B, C] at temperature T. KL(p||q) = sum p log p - sum p log q is linear in p, so the sum over sources
    goes through their weighted mixture: no [K, S, B, C] pairs are formed.
    """
    # The two sums are close (both about -log C at a high T) and their difference is small: float64 keeps it exact.
    source_log_probs = F.log_softmax(source_logits.detach().float() / temperature, dim=-1).double()
    source_probs = source_log_probs.exp()
    # p log p is 0 where p is: a top-k cached teacher's classes outside its top k (logit -inf) add nothing
    neg_entropy = torch.where(source_probs > 0, source_probs * source_log_probs, 0).sum(dim=-1).mean(dim=-1)  # [S]
    mixture = torch.einsum("ks,sbc->kbc", weights.double(), source_probs)
    cross_entropy = (mixture * student_log_probs.double()).sum(dim=-1).mean(dim=-1)  # [K]
    return ((weights.double() @ neg_entropy - cross_entropy) * temperature**2).float()


def graph_terms(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                source_logits: torch.Tensor | None, shares: torch.Tensor, temperature: float) -> torch.Tensor:
    """The unweighted terms [K, 3] (CE, T^2*KL(teacher||s), sum_j share_j * T^2*KL(source_j||s)) of K students.

    `student_logits` [K, B, C]; `labels` [B]; `teacher_logits` [B, C] or None (its term is then 0);
    `source_logits` [N, B, C] or None (no student sources), with `shares` [K, N] weighing each source for each
    student (see graph.TeachingGraph.peer_shares). Teacher and sources are constants: no gradient flows into them.
    """
    k, b, c = student_logits.shape
    student_logits = student_logits.float()  # once: the terms' gradients add up in float32, rounded once to bf16
    zero = student_logits.new_zeros(k)
    ce = F.cross_entropy(student_logits.reshape(k * b, c), labels.repeat(k), reduction="none")
    ce = ce.view(k, b).mean(dim=1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    kd = zero if teacher_logits is None else weighted_kl(teacher_logits.unsqueeze(0), zero.new_ones(k, 1),
                                                         student_log_probs, temperature)
    if source_logits is None or source_logits.shape[0] == 0:
        peer = zero
    else:
        peer = weighted_kl(source_logits, shares.float(), student_log_probs, temperature)
    return torch.stack([ce, kd, peer], dim=1)


def tsp_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    peer_logits: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    peer_reduction: Literal["sum", "mean"] = "sum",
) -> TSPLoss:
    """L = alpha*CE(z, y) + beta*T^2*KL(teacher||z) + gamma*reduce_j T^2*KL(peer_j||z).

    `student_logits` [B, C]; `labels` [B]; `teacher_logits` [B, C] (None only when beta == 0);
    `peer_logits` [P, B, C] with P >= 0, treated as constants (no gradient flows into a peer).
    """
    if teacher_logits is None and beta != 0:
        raise ValueError("tsp_loss: teacher_logits is None but beta != 0")
    if peer_reduction not in ("sum", "mean"):
        raise ValueError(f"tsp_loss: peer_reduction must be 'sum' or 'mean', not {peer_reduction!r}")
    peers = peer_logits.shape[0]
    share = 1 / peers if peer_reduction == "mean" and peers else 1.0
    shares = student_logits.new_full((1, peers), share, dtype=torch.float32)
    ce, kd, peer = graph_terms(student_logits.unsqueeze(0), labels, teacher_logits, peer_logits, shares,
                               temperature)[0]
    return TSPLoss(total=alpha * ce + beta * kd + gamma * peer, ce=ce, kd=kd, peer=peer)
