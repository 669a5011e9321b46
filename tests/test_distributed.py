"""Negatives gathered across ranks: 2 processes (gloo, CPU) with gathering give the loss and the
gradients of one process on the concatenated batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import torch.nn.functional as F

from vidrep.training.module import LossConfig

N_PER_RANK, WORLD, DIM_IN, DIM = 6, 2, 12, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, WORLD * N_PER_RANK, DIM_IN, generator=g)  # anchors, positives
    video_ids = torch.arange(WORLD * N_PER_RANK) // 2  # two pairs per video: some same-video patches
    return x, video_ids


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM)


def _loss(model, x, video_ids, cfg):
    a = F.normalize(model(x[0]), dim=1)
    p = F.normalize(model(x[1]), dim=1)
    return cfg.loss(a, p, video_ids, cfg.hard_ratio)[0]


def _rank(rank, init_file, out_file, cfg):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, video_ids = _data()
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    model = _model()
    loss = _loss(model, x[:, rows], video_ids[rows], cfg)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:  # what DDP does: average the gradients over ranks
        dist.all_reduce(g)
        g /= WORLD
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads}, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("symmetric", [False, True])
def test_gathered_negatives_equal_one_process_on_the_whole_batch(symmetric):
    cfg = LossConfig(margin=0.5, num_negatives=4, hard_ratio=1.0, symmetric=symmetric, gather_across_ranks=True)
    x, video_ids = _data()
    model = _model()
    expected = _loss(model, x, video_ids, cfg)  # no process group: the plain loss on all 12 pairs
    expected.backward()
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        tmp_mp.spawn(_rank, args=(init, out, cfg), nprocs=WORLD, join=True)
        got = torch.load(out)
    torch.testing.assert_close(got["loss"], expected.detach())
    for g, p in zip(got["grads"], model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_without_gathering_each_rank_sees_only_its_own_negatives():
    cfg = LossConfig(margin=0.5, num_negatives=4, hard_ratio=1.0)
    x, video_ids = _data()
    whole = _loss(_model(), x, video_ids, cfg)
    halves = [_loss(_model(), x[:, r * N_PER_RANK : (r + 1) * N_PER_RANK], video_ids[r * N_PER_RANK : (r + 1) * N_PER_RANK], cfg)
              for r in range(WORLD)]
    assert not torch.isclose(sum(halves) / WORLD, whole)
