"""What a method computes over "the batch" is computed over the global batch, whatever the number
of processes: statistics (the triplet's harmful mean, scale-relative margins, calibrations) are
global, any module trained inside a step that is shared by the batch (the triplet's miner) is
trained on gradients averaged across data-parallel ranks, and a share of the batch is a share of the
global batch (``leading_rows``). Training on N processes then takes the steps one process takes on
the union of their batches (when every rank's batch holds as many tokens), which is what the sharded
tests check.

Per-example quantities (LAT's perturbation of each example) stay local: averaging them would mix
examples. Outside ``torch.distributed`` every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def mean_across_ranks_(tensors: list[Tensor]) -> list[Tensor]:
    """Replace each tensor in place by its mean over ranks (no gradient); returns ``tensors``."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world_size())
    return tensors


def leading_rows(fraction: float, rows: int) -> int:
    """How many of this rank's first ``rows`` examples make up the global batch's first
    round(``fraction`` x global batch): rank r holds global rows r, r + W, r + 2W, ... (``data.order``
    shards so), so every process count mines the rows one process would."""
    world = world_size()
    wanted = round(fraction * rows * world)
    return max(0, -(-(wanted - rank()) // world))


def sum_across_ranks(x: Tensor) -> Tensor:
    """Differentiable sum over ranks: the gradient of every rank's loss reaches every rank's input."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def global_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, T, ...] over the positions ``mask`` [B, T] marks, over every rank's batch,
    with gradient (zeros where nothing is marked anywhere)."""
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    total = sum_across_ranks((x * m).sum(dim=(0, 1)))
    count = sum_across_ranks(m.sum(dim=(0, 1)))
    return total / count.clamp_min(1)
