"""The collectives of a training step: the peer all-gather and the metric reduction."""

from __future__ import annotations

from functools import reduce

import torch
import torch.distributed as dist

# all_gather_single is the newer name of all_gather_into_tensor (deprecated from torch 2.14).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in a group; None stands for this rank alone."""
    return 1 if group is None else dist.get_world_size(group)


def all_gather_cat(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `local` ([k, ...], same shape everywhere) along dim 0, in group-rank order.

    One collective; the result carries no gradient. Used for the peer logits ([K, B, C] -> [N, B, C])
    and for the batch-sharded teacher ([B/G, C] -> [B, C]).
    """
    local = local.detach().contiguous()
    if group is None:
        return local
    gathered = local.new_empty((group_size(group) * local.shape[0], *local.shape[1:]))
    _all_gather_single(gathered, local, group=group)
    return gathered


def all_gather_cat_parts(parts: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """`all_gather_cat` of each of `parts` in a single collective: one message per rank, the parts flattened
    side by side (in their common promoted dtype for the trip, each returned in its own)."""
    if group is None:
        return [part.detach() for part in parts]
    if len(parts) == 1:  # nothing to pack: no flattening copy
        return [all_gather_cat(parts[0], group)]
    common = reduce(torch.promote_types, (part.dtype for part in parts))
    message = torch.cat([part.detach().reshape(-1).to(common) for part in parts])
    gathered = all_gather_cat(message[None], group)  # [G, message]
    columns = gathered.split([part.numel() for part in parts], dim=1)
    return [c.reshape(-1, *part.shape[1:]).to(part.dtype) for c, part in zip(columns, parts)]


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over a group in place (identity for a single rank)."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
