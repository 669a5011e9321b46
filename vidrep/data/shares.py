"""How one global batch is dealt to the ranks: the sampler deals it, the schedule reports it."""

from __future__ import annotations


def rank_shares(global_batch: int, world: int) -> list[int]:
    """Pairs per rank of one global batch: as equal as possible, the larger shares first
    (50 on 4 ranks -> [13, 13, 12, 12])."""
    if global_batch < world:
        raise ValueError(
            f"a global batch of {global_batch} pairs cannot be dealt to {world} ranks (each needs >= 1 pair); "
            "raise data.batch_size or use fewer devices"
        )
    base, extra = divmod(global_batch, world)
    return [base + (r < extra) for r in range(world)]
