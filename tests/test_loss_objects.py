"""The losses as objects (vidrep/losses): model.loss instantiates them by `_target_`, the ranking loss
keeps its numbers, InfoNCE matches a brute-force reference and plugs in by config alone. Copy this
file's InfoNCE tests for a new loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from hydra.utils import instantiate
from test_configs import compose_train

from vidrep.losses import (
    Candidates,
    InfoNCELoss,
    NegativeSchedule,
    PairLoss,
    RankingLoss,
    loss_from_config,
    ranking_loss_from_mask,
    select_negatives,
    switch_step,
    triplet_stats,
)
from vidrep.training import plan
from vidrep.training.validate import settings_errors


def make_batch(n=12, d=16, videos=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1)
    p = F.normalize(a + 0.8 * torch.randn(n, d, generator=g), dim=1)
    return a, p, torch.randint(0, videos, (n,), generator=g)


# --- the ranking loss: the same numbers as its pieces ---------------------------------------------


@pytest.mark.parametrize(
    "hard_ratio,symmetric,violators_only", [(0.0, False, False), (0.5, True, True), (1.0, False, True)]
)
@pytest.mark.parametrize("gathered", [False, True])
def test_ranking_object_equals_select_then_score(hard_ratio, symmetric, violators_only, gathered):
    """The object's loss, gradients and stats are those of the functions it calls, with the same
    random draws, on the batch's own patches and on extra candidates (what a DDP rank passes)."""
    a, p, vid = make_batch()
    extra_a, extra_p, extra_vid = make_batch(seed=1)
    kw = dict(margin=0.5, num_negatives=4, violators_only=violators_only)
    loss_fn = RankingLoss(**kw, hard_ratio=1.0, symmetric=symmetric)
    results = []
    for use_object in (True, False):
        a1, p1 = a.clone().requires_grad_(), p.clone().requires_grad_()
        patches = torch.cat([a1, extra_a, p1, extra_p]) if gathered else torch.cat([a1, p1])
        ids = torch.cat([vid, extra_vid, vid, extra_vid]) if gathered else torch.cat([vid, vid])
        torch.manual_seed(3)
        if use_object:
            loss, stats = loss_fn(a1, p1, vid, hard_ratio=hard_ratio, candidates=Candidates(patches, ids))
        else:
            mask = select_negatives(a1, p1, vid, **kw, hard_ratio=hard_ratio, patches=patches, patch_ids=ids)
            loss = ranking_loss_from_mask(
                a1, p1, mask, margin=0.5, num_negatives=4, symmetric=symmetric, patches=patches
            )
            s = triplet_stats(a1, p1, mask, patches.detach())
            stats = {name: getattr(s, name) for name in RankingLoss.stat_names}
        loss.backward()
        results.append((loss.detach(), stats, a1.grad, p1.grad))
    (l1, s1, ga1, gp1), (l2, s2, ga2, gp2) = results
    assert torch.equal(l1, l2) and torch.equal(ga1, ga2) and torch.equal(gp1, gp2)
    assert s1.keys() == s2.keys() == set(RankingLoss.stat_names) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_negative_schedule_switches_once_by_step_or_epoch():
    s = NegativeSchedule(initial_hard_ratio=0.0, hard_ratio=1.0, hard_after_epochs=2, hard_after_steps=30)
    assert [s.phase(0, step) for step in (0, 29, 30)] == ["random", "random", "hard"]
    assert (s.ratio(0, 29), s.ratio(0, 30)) == (0.0, 1.0)
    assert NegativeSchedule(hard_after_epochs=2).phase(2, 0) == "hard"  # no step: the epoch bound
    # 10 epochs of 1.5M patches (15K steps of 50 pairs each) vs 7.5M pairs: the paper's 150K steps
    assert switch_step(10, 7_500_000, 15_000, 50) == 150_000
    assert switch_step(0.5, None, 7, 32) == 4 and switch_step(None, None, 7, 32) is None
    assert RankingLoss(hard_after_steps=5, initial_hard_ratio=0.5).schedule.ratio(0, 4) == 0.5


# --- InfoNCE against a brute-force reference -----------------------------------------------------


def brute_infonce(a, p, vid, patches, ids, t, symmetric):
    """Per query: -log(exp(s(q, p)/t) / (exp(s(q, p)/t) + sum over other-video candidates))."""
    terms = []
    for queries in [a, p] if symmetric else [a]:
        for i in range(a.shape[0]):
            pos = torch.exp(a[i] @ p[i] / t)
            neg = sum(
                (torch.exp(queries[i] @ patches[j] / t) for j in range(len(ids)) if ids[j] != vid[i]), torch.zeros(())
            )
            terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gathered", [False, True])
def test_infonce_matches_brute_force(symmetric, gathered):
    a, p, vid = make_batch()
    extra_a, extra_p, extra_vid = make_batch(seed=1)
    grads = []
    for reference in (False, True):
        a1, p1 = a.clone().double().requires_grad_(), p.clone().double().requires_grad_()
        patches = torch.cat([a1, extra_a.double(), p1, extra_p.double()]) if gathered else torch.cat([a1, p1])
        ids = torch.cat([vid, extra_vid, vid, extra_vid]) if gathered else torch.cat([vid, vid])
        if reference:
            loss = brute_infonce(a1, p1, vid, patches, ids, 0.1, symmetric)
        else:
            loss_fn = InfoNCELoss(temperature=0.1, symmetric=symmetric)
            loss, stats = loss_fn(a1, p1, vid, candidates=Candidates(patches, ids))
            other = (vid[:, None] != ids[None, :]).sum(dim=1).double()
            assert stats["negatives_per_pair"] == pytest.approx(float(other.mean()))
            assert set(stats) == set(InfoNCELoss.stat_names) and 0.0 <= float(stats["top1_acc"]) <= 1.0
        loss.backward()
        grads.append((loss.detach(), a1.grad, p1.grad))
    (l1, ga1, gp1), (l2, ga2, gp2) = grads
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(ga1, ga2)
    torch.testing.assert_close(gp1, gp2)


def test_infonce_edge_cases():
    a = F.normalize(torch.randn(3, 8), dim=1)
    loss, stats = InfoNCELoss()(a, a.clone(), torch.zeros(3, dtype=torch.long))  # one video: no negatives at all
    assert float(loss) == 0.0 and float(stats["negatives_per_pair"]) == 0 and float(stats["top1_acc"]) == 1.0
    # orthogonal pairs, each its own video: the positive wins every row, the loss is log(1 + 4 e^{-1/t}) per query
    e = torch.eye(6)
    loss, stats = InfoNCELoss(temperature=0.5, symmetric=False)(e[:3], e[:3].clone(), torch.arange(3))
    assert float(loss) == pytest.approx(math.log(1 + 4 * math.exp(-2.0)), rel=1e-6) and float(stats["top1_acc"]) == 1.0
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="video_ids"):
        InfoNCELoss()(a, a, torch.arange(2))


# --- by config -----------------------------------------------------------------------------------


def test_losses_round_trip_through_their_config():
    for loss in (RankingLoss(margin=1.0, symmetric=True, hard_after_steps=7), InfoNCELoss(temperature=0.2)):
        assert isinstance(loss, PairLoss) and loss_from_config(loss.config()) == loss
    # checkpoints written before losses were objects: the ranking loss's settings, no _target_
    assert loss_from_config({"margin": 1.0, "num_negatives": 2}) == RankingLoss(margin=1.0, num_negatives=2)
    with pytest.raises(ValueError, match="model.loss._target_"):
        loss_from_config({"_target_": "vidrep.losses.NoSuchLoss"})


def test_presets_instantiate_their_loss(tmp_path):
    paper = instantiate(compose_train([], tmp_path).model.loss)
    assert paper == RankingLoss(
        margin=0.5,
        num_negatives=4,
        hard_ratio=1.0,
        initial_hard_ratio=0.0,
        hard_after_epochs=10,
        hard_after_pairs=7_500_000,
    )  # data=demo keeps the paper's switch; its 20 steps (~3 epochs) never reach it
    code = instantiate(compose_train(["model/loss=code_faithful"], tmp_path).model.loss)
    assert (code.margin, code.symmetric, code.violators_only, code.schedule.ratio(0, 0)) == (1.0, True, True, 0.5)
    # A data config written for the ranking loss may set the switch whichever loss is chosen.
    cfg = compose_train(
        ["model/loss=infonce", "model.loss.temperature=0.2", "+model.loss.hard_after_epochs=6"], tmp_path
    )
    assert "hard_after_epochs" in cfg.model.loss
    cfg = plan.drop_unused_schedule_keys(cfg)
    assert instantiate(cfg.model.loss) == InfoNCELoss(temperature=0.2)


def test_settings_checks_follow_the_loss(tmp_path):
    infonce = compose_train(["model/loss=infonce"], tmp_path)
    assert settings_errors(infonce) == []  # no margin, no num_negatives: nothing to refuse
    bad = settings_errors(compose_train(["model/loss=infonce", "model.loss.temperature=0"], tmp_path))
    assert len(bad) == 1 and bad[0].startswith("model.loss.temperature=0")
    ranking = settings_errors(compose_train(["model.loss.margin=0", "model.loss.num_negatives=100"], tmp_path))
    assert [e.split("=")[0] for e in ranking] == ["model.loss.margin", "model.loss.num_negatives"]


def test_infonce_trains_by_config(tmp_path, tiny_corpus):
    """model/loss=infonce, nothing else: the run trains with InfoNCE (its stats logged, every
    other-video patch a negative, no negative schedule) and its checkpoint rebuilds it."""
    from vidrep.training.run import train

    cfg = compose_train(
        [
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "model/loss=infonce",
            "trainer.max_steps=-1",
            "trainer.max_epochs=1",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert {"train/top1_acc_step", "val/top1_acc", "val/loss"} <= metrics.keys()
    assert "train/triplet_acc_step" not in metrics and "train/hard_phase_step" not in metrics
    # batches of 8 pairs from ~9 videos: ~13 other-video patches per query, not the ranking loss's K = 4
    assert metrics["train/negatives_per_pair_step"] > 8
    # near log(1 + negatives) at the start (untrained embeddings are alike), far above the ranking loss's ~margin
    assert 1.0 < metrics["train/loss_epoch"] < math.log(1 + 2 * 8) and 0.0 <= metrics["val/top1_acc"] <= 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert loss_from_config(ckpt["hyper_parameters"]["loss"]) == InfoNCELoss() and "negative_phase" not in ckpt
