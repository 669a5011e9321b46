"""Negatives gathered across ranks: 3 processes (gloo, CPU) with unequal shares of one global batch
(4 + 3 + 3 pairs) give the loss and the gradients of one process on the whole batch, for the
ranking loss and for InfoNCE (vidrep.training.ranks wraps any loss)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import torch.nn.functional as F

from vidrep.losses import InfoNCELoss, RankingLoss
from vidrep.training.ranks import loss_across_ranks

SHARES, DIM_IN, DIM = [4, 3, 3], 12, 8
WORLD, GLOBAL = len(SHARES), sum(SHARES)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, GLOBAL, DIM_IN, generator=g)  # anchors, positives
    video_ids = torch.arange(GLOBAL) // 2  # two pairs per video, one of them split across ranks 0 and 1
    return x, video_ids


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM)


def _loss(model, x, video_ids, loss_fn):
    a = F.normalize(model(x[0]), dim=1)
    p = F.normalize(model(x[1]), dim=1)
    return loss_across_ranks(loss_fn, a, p, video_ids, hard_ratio=1.0)[0]


CONFIGS = [
    *(
        RankingLoss(margin=0.5, num_negatives=4, hard_ratio=1.0, symmetric=symmetric, gather_across_ranks=True)
        for symmetric in (False, True)
    ),
    InfoNCELoss(temperature=0.1, symmetric=True, gather_across_ranks=True),
]


def _leave(dist) -> None:
    """End a rank once every rank is done. The exit skips the interpreter's teardown: in about 1 of
    8 runs a rank of this torch (2.14, gloo, CPU) aborted there with "terminate called without an
    active exception" and no Python frame, after its work was done and saved."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _rank(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, video_ids = _data()
    start = sum(SHARES[:rank])
    rows = slice(start, start + SHARES[rank])
    results = []
    for cfg in CONFIGS:  # one start of the processes for every setting (starting them is the slow part)
        model = _model()
        loss = _loss(model, x[:, rows], video_ids[rows], cfg)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for g in grads:  # what DDP does: average the gradients over ranks
            dist.all_reduce(g)
            g /= WORLD
        # each rank's loss is the mean over its own pairs: the global batch's is their weighted mean
        global_loss = loss.detach() * SHARES[rank] / GLOBAL
        dist.all_reduce(global_loss)
        results.append({"loss": global_loss, "grads": grads})
    if rank == 0:
        torch.save(results, out_file)
    _leave(dist)


def test_gathered_negatives_with_unequal_shares_equal_one_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        tmp_mp.spawn(_rank, args=(init, out), nprocs=WORLD, join=True)
        results = torch.load(out)
    x, video_ids = _data()
    for cfg, got in zip(CONFIGS, results):
        model = _model()
        expected = _loss(model, x, video_ids, cfg)  # no process group: the plain loss on all 10 pairs
        expected.backward()
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-5, atol=1e-7, msg=repr(cfg))
        # InfoNCE's gradients are ~10x the ranking loss's (1 / temperature), and so is float32's
        # summation-order noise in them (7e-7 at most, measured)
        atol = 1e-6 if isinstance(cfg, InfoNCELoss) else 1e-7
        for g, p in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=atol, msg=repr(cfg))


def test_without_gathering_each_rank_sees_only_its_own_negatives():
    cfg = RankingLoss(margin=0.5, num_negatives=4, hard_ratio=1.0, gather_across_ranks=False)
    x, video_ids = _data()
    whole = _loss(_model(), x, video_ids, cfg)
    bounds = [0, 5, 10]
    halves = [_loss(_model(), x[:, a:b], video_ids[a:b], cfg) for a, b in zip(bounds, bounds[1:])]
    assert not torch.isclose(sum(halves) / 2, whole)


# ---------------------------------------------------------------- the random phase on many ranks

STEPS = 3
RANDOM = RankingLoss(margin=1.0, num_negatives=4, hard_ratio=0.0, initial_hard_ratio=0.0, symmetric=True)


def _random_phase(rank: int, world: int, shares: list[int], shared_draws: bool) -> list[torch.Tensor]:
    """3 SGD steps in the random phase on this rank's rows of each global batch (DDP's average of
    the gradients done by hand); the weights after them."""
    from vidrep.training.module import step_seed

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = sum(shares[:rank])
    rows = slice(start, start + shares[rank])
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(2, GLOBAL, DIM_IN, generator=g)
        video_ids = torch.randperm(GLOBAL, generator=g) % 6
        torch.manual_seed(7)  # every rank alike, as seed_everything leaves them
        generator = torch.Generator().manual_seed(step_seed(3, step)) if shared_draws else None
        a, p = F.normalize(model(x[0, rows]), dim=1), F.normalize(model(x[1, rows]), dim=1)
        kw = dict(hard_ratio=0.0, shares=shares if world > 1 else None, generator=generator)
        loss = loss_across_ranks(RANDOM, a, p, video_ids[rows], **kw)[0]
        opt.zero_grad()
        loss.backward()
        for param in model.parameters():
            if world > 1:
                dist.all_reduce(param.grad)
                param.grad /= world
        opt.step()
    return [param.detach().clone() for param in model.parameters()]


def _random_rank(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    weights = {shared: _random_phase(rank, WORLD, SHARES, shared) for shared in (True, False)}
    if rank == 0:
        torch.save(weights, out_file)
    _leave(dist)


def test_the_random_phase_on_three_ranks_trains_one_processs_weights():
    """Random negatives drawn from the step's shared generator for the whole global batch, each
    rank its rows: 3 gloo ranks (4 + 3 + 3 pairs) end 3 random-phase steps on one process's
    weights (float32 summation order aside). Drawn from each rank's own global generator (the
    earlier way) the ranks pick other negatives than one process, and the weights differ."""
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        tmp_mp.spawn(_random_rank, args=(init, out), nprocs=WORLD, join=True)
        ranks = torch.load(out)
    one = _random_phase(0, 1, [GLOBAL], shared_draws=True)
    for got, expected in zip(ranks[True], one):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(ranks[False], one))
