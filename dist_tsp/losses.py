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


def distill_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target/T) || softmax(student/T)), batch mean; `target_logits` may be [..., B, C].

    Leading dimensions of `target_logits` beyond [B, C] are kept: [P, B, C] gives P values.
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    target_log_probs = F.log_softmax(target_logits.float() / temperature, dim=-1)
    pointwise = target_log_probs.exp() * (target_log_probs - student_log_probs)
    return pointwise.sum(dim=-1).mean(dim=-1) * temperature**2


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
    zero = student_logits.new_zeros((), dtype=torch.float32)
    ce = F.cross_entropy(student_logits.float(), labels)
    kd = zero if teacher_logits is None else distill_kl(teacher_logits.detach(), student_logits, temperature)
    if peer_logits.shape[0] == 0:
        peer = zero
    else:
        per_peer = distill_kl(peer_logits.detach(), student_logits, temperature)
        peer = per_peer.sum() if peer_reduction == "sum" else per_peer.mean()
    total = alpha * ce + beta * kd + gamma * peer
    return TSPLoss(total=total, ce=ce, kd=kd, peer=peer)
