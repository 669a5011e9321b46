"""Any loss of vidrep.losses under DDP, as one process would compute it on the global batch.

Each rank holds a share of the global batch's pairs. With the loss's `gather_across_ranks`, every
rank's patches and video ids are gathered (`gather_candidates`) and passed to the loss as its
candidates; each rank scores its own pairs against all of them. `weigh_by_share` then makes DDP's
average of the ranks' gradients equal one process's gradient on the global batch, also when the
shares are unequal (tested with 4 + 3 + 3 pairs on 3 ranks, tests/test_distributed.py). The losses
themselves know nothing of processes.

Random draws (`Draws`): every rank draws from the step's generator, seeded alike on all ranks, for
the whole global batch and keeps its own pairs' rows, so the random phase too is one process's run.
The shares come from `rank_shares` (the sampler deals them so): no collective or host read for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vidrep.losses import Candidates, Draws, PairLoss


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def weigh_by_share(loss: Tensor, share: int, total: int, world: int) -> Tensor:
    """`loss` (the mean over this rank's `share` pairs) with its gradient scaled by
    world x share / total and its value unchanged. DDP averages the ranks' gradients; with this
    weight every pair of the global batch of `total` weighs 1 / total, as in one process, also
    when the shares are unequal (50 pairs on 4 ranks: 13 + 13 + 12 + 12)."""
    weight = world * share / total
    return loss * weight - (loss * (weight - 1)).detach()


def share_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's number of pairs, gathered (a collective and a host read: for callers that do
    not know the shares; training passes `rank_shares`)."""
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    return [int(s) for s in sizes]


def gather_candidates(
    anchor: Tensor, positive: Tensor, video_ids: Tensor, sizes: Sequence[int] | None = None
) -> tuple[Candidates, int]:
    """The global batch's patches (every rank's anchors, then every rank's positives, in rank
    order: the candidates of one process on that batch) and its number of pairs. `sizes`: every
    rank's pairs (None: gathered, `share_sizes`).

    all_gather needs equal sizes: every rank pads its share to the largest with zero rows, and the
    padding is cut out of the gathered tensors. The gather of the embeddings keeps autograd (its
    backward sums every rank's gradient into the local embeddings)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world, n = dist.get_world_size(), anchor.shape[0]
    sizes = share_sizes(n, anchor.device) if sizes is None else list(sizes)
    if len(sizes) != world or sizes[dist.get_rank()] != n:
        raise ValueError(f"rank {dist.get_rank()} holds {n} pairs but the shares are {sizes} on {world} ranks")
    pad = max(sizes) - n

    def gathered(x: Tensor) -> Tensor:
        parts = all_gather(torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    patches = torch.cat([gathered(anchor), gathered(positive)])
    ids = [torch.empty(max(sizes), dtype=video_ids.dtype, device=video_ids.device) for _ in range(world)]
    dist.all_gather(ids, torch.cat([video_ids, video_ids.new_zeros(pad)]) if pad else video_ids)
    all_ids = torch.cat([i[:size] for i, size in zip(ids, sizes)])
    return Candidates(patches, torch.cat([all_ids, all_ids])), sum(sizes)


def loss_across_ranks(
    loss_fn: PairLoss,
    anchor: Tensor,
    positive: Tensor,
    video_ids: Tensor,
    *,
    gather: bool = True,
    hard_ratio: float | None = None,
    shares: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`loss_fn` on this rank's pairs; under DDP (`gather=True`) against the global batch's
    patches when the loss gathers across ranks, else against this rank's own, with the gradient
    weighed by share either way. `gather=False` keeps negatives local and skips every collective
    (validation: its ranks may hold different numbers of batches, and a collective there would
    hang).

    `shares`: every rank's pairs in this global batch (`rank_shares`; None: gathered, a host
    read). `generator`: the step's generator, seeded alike on every rank; the loss draws from it for
    the whole global batch and keeps this rank's rows (None: torch's global generator, this
    rank's pairs only, which differs from one process under DDP)."""
    world = world_size() if gather else 1
    n = anchor.shape[0]
    if world == 1:
        draws = None if generator is None else Draws(generator)
        return loss_fn(anchor, positive, video_ids, hard_ratio=hard_ratio, draws=draws)
    rank = torch.distributed.get_rank()
    sizes = share_sizes(n, anchor.device) if shares is None else list(shares)
    total = sum(sizes)
    draws = None if generator is None else Draws(generator, sum(sizes[:rank]), total)
    candidates = gather_candidates(anchor, positive, video_ids, sizes)[0] if loss_fn.gather_across_ranks else None
    loss, stats = loss_fn(anchor, positive, video_ids, hard_ratio=hard_ratio, candidates=candidates, draws=draws)
    return weigh_by_share(loss, n, total, world), stats
