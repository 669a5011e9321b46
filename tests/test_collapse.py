import logging
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vidrep.losses import select_negatives, triplet_stats
from vidrep.training.collapse import CollapseWarning, collapse_reason


def batch_metrics(anchor, positive):
    ids = torch.arange(anchor.shape[0])
    mask = select_negatives(anchor, positive, ids, margin=0.5, num_negatives=4, hard_ratio=1.0, violators_only=False)
    s = triplet_stats(anchor, positive, mask)
    return {"train/embed_std_step": s.embed_std, "train/sim_pos_step": s.sim_pos, "train/sim_neg_step": s.sim_neg}


def healthy(n=50, dim=256):
    a = F.normalize(torch.randn(n, dim), dim=1)
    return a, F.normalize(a + 0.3 * torch.randn(n, dim) / math.sqrt(dim), dim=1)


def collapsed(n=50, dim=256):
    # the released init at a small input: one direction plus a 1e-4 wobble
    centre = torch.randn(dim)
    a = F.normalize(centre + 1e-4 * torch.randn(n, dim) * centre.norm(), dim=1)
    return a, F.normalize(centre + 1e-4 * torch.randn(n, dim) * centre.norm(), dim=1)


def fake_trainer(metrics, step):
    return SimpleNamespace(callback_metrics=metrics, global_step=step, loggers=[], is_global_zero=True)


def run(callback, batches, dim=256):
    module = SimpleNamespace(net=SimpleNamespace(out_dim=dim))
    for step, (a, p) in enumerate(batches):
        callback.on_train_batch_end(fake_trainer(batch_metrics(a, p), step), module, None, None, step)
    callback.on_train_end(fake_trainer(batch_metrics(*batches[-1]), len(batches)), module)


def test_collapse_reason_names_the_sign():
    dim = 256
    assert collapse_reason(**{k.split("/")[1][:-5]: float(v) for k, v in batch_metrics(*healthy()).items()}, dim=dim) is None
    reason = collapse_reason(**{k.split("/")[1][:-5]: float(v) for k, v in batch_metrics(*collapsed()).items()}, dim=dim)
    assert reason is not None and "embed_std" in reason
    # without the dimension, the similarity gap alone still tells
    assert "no gap" in collapse_reason(1e-4, 0.99999, 0.99998, None)


def test_callback_warns_once_on_collapse_and_stays_silent_when_healthy(caplog):
    caplog.set_level(logging.WARNING, logger="vidrep.training.collapse")
    quiet = CollapseWarning(every_n_steps=2, warmup_steps=4, patience=2)
    run(quiet, [healthy() for _ in range(12)])
    assert not caplog.records and quiet.warned_at is None

    loud = CollapseWarning(every_n_steps=2, warmup_steps=4, patience=2)
    run(loud, [collapsed() for _ in range(12)])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and loud.warned_at == 6  # checks at steps 4 and 6: two in a row
    assert "experiment=cpu" in warnings[0] and "model.optimizer.lr" in warnings[0]


def test_callback_warns_at_the_end_of_a_short_collapsed_run(caplog):
    caplog.set_level(logging.WARNING, logger="vidrep.training.collapse")
    run(CollapseWarning(warmup_steps=1000), [collapsed() for _ in range(3)])
    assert len(caplog.records) == 1 and "at the end of training" in caplog.records[0].getMessage()
