import itertools

import pytest
import torch
import torch.nn.functional as F

from vidrep.losses import ranking_loss, ranking_loss_from_mask, select_negatives, triplet_stats


def make_batch(n=12, d=16, videos=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1)
    p = F.normalize(a + 0.8 * torch.randn(n, d, generator=g), dim=1)
    vid = torch.randint(0, videos, (n,), generator=g)
    return a, p, vid


def brute_candidates(a, p, vid, margin, violators_only):
    n = a.shape[0]
    patches = torch.cat([a, p])
    ids = torch.cat([vid, vid])
    out = []
    for i in range(n):
        s_ap = float(a[i] @ p[i])
        cands = []
        for j in range(2 * n):
            if ids[j] == vid[i]:
                continue
            if violators_only and max(0.0, margin - s_ap + float(a[i] @ patches[j])) <= 0:
                continue
            cands.append(j)
        out.append(cands)
    return out


def brute_loss(a, p, vid, mask, margin, k, symmetric):
    """The released layer's loops: a plain sum over pairs and selected negatives."""
    n = a.shape[0]
    patches = torch.cat([a, p])
    total = a.new_zeros(())
    for i in range(n):
        s_ap = a[i] @ p[i]
        for j in range(2 * n):
            if not mask[i, j]:
                continue
            total = total + torch.clamp(margin - s_ap + a[i] @ patches[j], min=0)
            if symmetric:
                total = total + torch.clamp(margin - s_ap + p[i] @ patches[j], min=0)
    return total / (n * k * (2 if symmetric else 1))


MODES = list(itertools.product([0.5, 1.0], [1, 4], [0.0, 0.5, 1.0], [False, True], [False, True]))


@pytest.mark.parametrize("margin,k,hard_ratio,symmetric,violators_only", MODES)
def test_loss_and_gradients_match_brute_force(margin, k, hard_ratio, symmetric, violators_only):
    a, p, vid = make_batch()
    kw = dict(margin=margin, num_negatives=k, hard_ratio=hard_ratio, violators_only=violators_only)
    a1, p1 = a.clone().requires_grad_(), p.clone().requires_grad_()
    torch.manual_seed(7)
    loss = ranking_loss(a1, p1, vid, symmetric=symmetric, **kw)
    loss.backward()
    torch.manual_seed(7)  # same random draws -> same selection
    mask = select_negatives(a, p, vid, **kw)
    a2, p2 = a.clone().requires_grad_(), p.clone().requires_grad_()
    ref = brute_loss(a2, p2, vid, mask, margin, k, symmetric)
    ref.backward()
    assert loss.ndim == 0
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("violators_only", [False, True])
@pytest.mark.parametrize("hard_ratio", [0.0, 0.25, 0.5, 1.0])
def test_selection_rules(hard_ratio, violators_only):
    margin, k = 0.5, 4
    for seed in range(5):
        a, p, vid = make_batch(n=10, seed=seed, videos=4)
        mask = select_negatives(
            a, p, vid, margin=margin, num_negatives=k, hard_ratio=hard_ratio, violators_only=violators_only
        )
        cands = brute_candidates(a, p, vid, margin, violators_only)
        patches = torch.cat([a, p])
        hard = int(k * hard_ratio)
        for i, c in enumerate(cands):
            chosen = set(mask[i].nonzero().flatten().tolist())
            assert chosen <= set(c), "a selected negative is not a candidate (same video or not violating)"
            if len(c) <= k:
                assert chosen == set(c)
                continue
            assert len(chosen) == k
            sims = sorted(c, key=lambda j: -float(a[i] @ patches[j]))
            top = set(sims[:k])
            if hard == k:
                assert chosen == top
            # the hard part comes from the top K; the rest of the top K may also be drawn at random
            assert len(chosen & top) >= hard


def test_same_video_never_selected():
    a, p, vid = make_batch(n=20, videos=3)
    for ratio in (0.0, 0.5, 1.0):
        mask = select_negatives(a, p, vid, margin=1.0, num_negatives=4, hard_ratio=ratio, violators_only=False)
        same = vid[:, None] == torch.cat([vid, vid])[None, :]
        assert not (mask & same).any()


def test_too_few_candidates_uses_all_and_keeps_denominator():
    a, p, _ = make_batch(n=4)
    vid = torch.tensor([0, 0, 0, 1])  # pairs 0-2 have 2 candidates, pair 3 has 6
    mask = select_negatives(a, p, vid, margin=0.5, num_negatives=4, hard_ratio=1.0, violators_only=False)
    assert mask.sum(dim=1).tolist() == [2, 2, 2, 4]
    loss = ranking_loss_from_mask(a, p, mask, margin=0.5, num_negatives=4, symmetric=False)
    torch.testing.assert_close(loss, brute_loss(a, p, vid, mask, 0.5, 4, False))
    # one video only: no candidate anywhere, loss 0
    one = torch.zeros(4, dtype=torch.long)
    assert (
        ranking_loss(a, p, one, margin=0.5, num_negatives=4, hard_ratio=1.0, symmetric=True, violators_only=False) == 0
    )


def test_paper_example_value():
    # orthogonal unit vectors: s(a,p)=1 for identical, s(a,n)=0 -> hinge max(0, 0.5 - 1 + 0) = 0
    a = torch.eye(4)
    assert (
        ranking_loss(
            a,
            a.clone(),
            torch.arange(4),
            margin=0.5,
            num_negatives=2,
            hard_ratio=1.0,
            symmetric=False,
            violators_only=False,
        )
        == 0
    )
    # anchors equal to every negative: each hinge is the margin
    b = F.normalize(torch.ones(3, 2), dim=1)
    loss = ranking_loss(
        b, b.clone(), torch.arange(3), margin=0.5, num_negatives=2, hard_ratio=1.0, symmetric=True, violators_only=False
    )
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_selection_has_no_gradient_path():
    a, p, vid = make_batch()
    a.requires_grad_()
    mask = select_negatives(a, p, vid, margin=0.5, num_negatives=4, hard_ratio=1.0, violators_only=True)
    assert not mask.requires_grad


def test_stats():
    a, p, vid = make_batch(n=8)
    mask = select_negatives(a, p, vid, margin=0.5, num_negatives=4, hard_ratio=1.0, violators_only=False)
    stats = triplet_stats(a, p, mask)
    patches = torch.cat([a, p])
    correct = total = 0
    for i in range(8):
        for j in mask[i].nonzero().flatten().tolist():
            total += 1
            correct += float(a[i] @ p[i]) > float(a[i] @ patches[j])
    assert stats.triplet_acc.item() == pytest.approx(correct / total)
    collapsed = triplet_stats(F.normalize(torch.ones(8, 16), dim=1), F.normalize(torch.ones(8, 16), dim=1), mask)
    assert collapsed.embed_std.item() == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_named():
    a, p, vid = make_batch()
    with pytest.raises(ValueError, match="video_ids"):
        ranking_loss(a, p, vid[:-1], margin=0.5, num_negatives=4, hard_ratio=1.0, symmetric=False, violators_only=False)
    with pytest.raises(ValueError, match="hard_ratio"):
        ranking_loss(a, p, vid, margin=0.5, num_negatives=4, hard_ratio=2.0, symmetric=False, violators_only=False)
