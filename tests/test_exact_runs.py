"""Runs that must equal another run exactly: a run killed mid-epoch and resumed with loader workers
(the default loader) against the uninterrupted run, and a training step that reads nothing from
the device outside the configured log steps."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from test_configs import compose_train

from vidrep.data.datamodule import ResumableSampler
from vidrep.training.run import train


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL (as `kill -9` would) as step `step` starts, after the
    checkpoints of the step before. Run with tests/ on PYTHONPATH."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(L.Callback):
    """Appends "<step> <loss>" (the float's exact repr) to `path` after every step, flushed, so
    that a killed run keeps what it trained."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step - 1} {float(outputs['loss'])!r}\n")


def _losses(path: Path) -> dict[int, str]:
    rows = [line.split() for line in path.read_text().splitlines()]
    steps = [int(s) for s, _ in rows]
    assert len(steps) == len(set(steps)), f"a step trained twice in one run: {steps}"
    return {int(s): v for s, v in rows}


def _train_cli(args, cwd, expect=0):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("persistent, phase", [(True, "random"), (False, "hard")])
def test_a_run_killed_mid_epoch_with_loader_workers_resumes_to_the_same_losses(
    tmp_path, tiny_corpus, persistent, phase
):
    """kill -9 in the middle of an epoch (flips on, 2 loader workers, persistent or not, with
    batches prefetched past the checkpoint), resume: every step's loss equals the uninterrupted
    run's. Killed in the first epoch (random negatives), the resumed run crosses the switch to hard
    negatives at epoch 1; killed in the second, it resumes inside the hard phase."""
    common = [
        *[a for a in TINY if not a.startswith(("data.num_workers", "data.persistent_workers"))],
        "data.num_workers=2",
        f"data.persistent_workers={str(persistent).lower()}",
        "data.flip_p=0.5",
        f"data.root={tiny_corpus}",
        "~data.demo",
        "logger=csv",
        "seed=3",
        "trainer.max_epochs=2",
        "trainer.max_steps=-1",
        "model.loss.hard_after_epochs=1",
        "model.loss.hard_after_pairs=null",
        "callbacks.periodic_checkpoint.every_n_train_steps=3",
        "+callbacks.record._target_=test_exact_runs.RecordLosses",
    ]
    full, run = tmp_path / "full.txt", tmp_path / "run"
    _train_cli([*common, f"+callbacks.record.path={full}", f"hydra.run.dir={tmp_path}/full"], tmp_path)
    expected = _losses(full)
    steps_per_epoch = len(expected) // 2
    assert steps_per_epoch > 4, "the kill must fall inside an epoch"
    # In the second epoch, 3 steps in: a periodic checkpoint (every 3 steps) lies after the epoch's
    # start and no later than the kill, so the run resumes mid-epoch in the hard phase.
    kill = 4 if phase == "random" else steps_per_epoch + 3
    killed = [*common, f"hydra.run.dir={run}"]
    _train_cli(
        [
            *killed,
            f"+callbacks.record.path={tmp_path}/killed.txt",
            "+callbacks.kill._target_=test_exact_runs.KillAtStep",
            f"+callbacks.kill.step={kill}",
        ],
        tmp_path,
        -9,
    )
    before = _losses(tmp_path / "killed.txt")
    assert before == {s: expected[s] for s in range(kill)}
    # last.ckpt is from the last multiple of 3 steps trained; the steps after it were trained, and
    # the workers had read further still, when the run died: the resumed run trains from there on
    resume = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert resume == 3 * (kill // 3) and (resume > steps_per_epoch) == (phase == "hard")
    _train_cli(
        [*killed, f"+callbacks.record.path={tmp_path}/resumed.txt", f"ckpt_path={run}/checkpoints/last.ckpt"], tmp_path
    )
    assert _losses(tmp_path / "resumed.txt") == {s: v for s, v in expected.items() if s >= resume}


def test_the_sampler_draws_flips_for_the_global_batch_and_resumes_with_them():
    """Flips belong to the global batch (seed, epoch, batch): the ranks' shares together are one
    process's pairs and flips; a resumed sampler gives the same, whatever iterators came first."""
    one = ResumableSampler(47, 10, seed=5, flip_p=0.5)
    one.set_epoch(2)
    reference = list(one)
    flips = np.array([f for b in reference for _, *f in b])
    assert 0.3 < flips.mean() < 0.7 and (flips[:, 0] != flips[:, 1]).any()  # anchor and positive apart
    for world in (1, 3):
        ranks = [ResumableSampler(47, 10, world, rank, seed=5, flip_p=0.5) for rank in range(world)]
        for r in ranks:
            r.set_epoch(2)
        assert [sum(parts, []) for parts in zip(*(list(r) for r in ranks))] == reference
        resumed = [
            ResumableSampler(47, 10, world, rank, seed=0, flip_p=0.5, resume={"epoch": 2, "seed": 5, "batches": 1})
            for rank in range(world)
        ]
        for r in resumed:
            iter(r), iter(r)  # torch's multi-process loader starts with two iterators
        assert [sum(parts, []) for parts in zip(*(list(r) for r in resumed))] == reference[1:]


# ---------------------------------------------------------------- host syncs

SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__", "unique", "nonzero")


class _SyncCounter:
    """Counts calls that read a tensor on the host (each a wait for the GPU there), per training
    batch, on the main thread, while training batches run (validation and setup left out)."""

    def __init__(self, monkeypatch) -> None:
        self.trainer = None
        self.batch = -1
        self.calls: dict[int, list[str]] = {}
        main = threading.main_thread()
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                t = self.trainer
                if (
                    threading.current_thread() is main
                    and t is not None
                    and t.training
                    and not t.sanity_checking
                    and self.batch >= 0
                ):
                    self.calls.setdefault(self.batch, []).append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def callback(self) -> L.Callback:
        counter = self

        class _Batches(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                counter.trainer, counter.batch = trainer, trainer.global_step

            def on_train_end(self, trainer, pl_module) -> None:
                counter.batch = -1

        return _Batches()


def test_no_host_sync_outside_the_log_steps(tmp_path, tiny_corpus, monkeypatch):
    """20 steps of the default training (progress bar, NaN check, loader workers, learning-rate
    monitor, ranking loss in its random phase): the host reads the device only on the steps that
    Lightning logs (log_every_n_steps=5: steps 4, 9, 14, 19)."""
    cfg = compose_train(
        [
            *[a for a in TINY if not a.startswith(("data.num_workers", "data.persistent_workers", "~callbacks.prog"))],
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "data.batch_size=2",
            "model.loss.num_negatives=2",
            "data.num_workers=2",
            "trainer.max_steps=20",
            "trainer.log_every_n_steps=5",
            "callbacks.stop_on_nan.every_n_steps=5",
            "model.loss.hard_after_pairs=null",
        ],
        tmp_path,
    )
    counter = _SyncCounter(monkeypatch)
    original = L.Trainer.__init__

    def with_counter(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[counter.callback(), *(callbacks or [])], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", with_counter)
    train(cfg)
    assert counter.trainer is not None and counter.trainer.global_step == 20
    log_steps = {s for s in range(20) if (s + 1) % 5 == 0}
    outside = {step: calls for step, calls in counter.calls.items() if step not in log_steps}
    assert not outside, f"host reads outside the log steps: {outside}"
    assert set(counter.calls) == log_steps  # the log steps do read (the counter works)


# ---------------------------------------------------------------- what cannot resume, DDP BatchNorm


def test_a_checkpoint_of_another_global_batch_is_refused_naming_the_device_count(tiny_corpus):
    """scaling=linear on 2 devices trains global batches of 2 x 4 pairs: its position and LR
    schedule mean nothing to a run of 4-pair batches, which is told to resume on 2 devices."""
    from vidrep.data.datamodule import PairDataModule

    dm = PairDataModule(str(tiny_corpus), batch_size=4, num_workers=0, input_size=67, val_fraction=0.25)
    saved = ResumableSampler(40, 8, world=2, rank=0).position(batches=3)
    with pytest.raises(ValueError, match=r"global batches of 8 pairs on 2 device\(s\).*trainer.devices=2"):
        dm.load_state_dict({"train_position": saved})
    dm.load_state_dict({"train_position": ResumableSampler(40, 4, world=2, rank=1).position(batches=3)})  # paper
    dm.load_state_dict({"train_position": {"epoch": 0, "seed": 0, "batches": 3}})  # written before the check


def test_batchnorm_is_synchronised_across_gpu_ranks_only(caplog):
    from vidrep.models.resnet import ResNet18Trunk
    from vidrep.training.module import batchnorm_across_ranks

    def count(net, kind):
        return sum(isinstance(m, kind) for m in net.modules())

    net = ResNet18Trunk(input_size=67, fc6_dim=16, fc7_dim=8)
    batchnorms = count(net, torch.nn.BatchNorm2d)
    assert batchnorms > 0
    assert batchnorm_across_ranks(net, 1, "cuda") is net and count(net, torch.nn.SyncBatchNorm) == 0
    with caplog.at_level("WARNING"):
        assert batchnorm_across_ranks(net, 2, "cpu") is net and count(net, torch.nn.SyncBatchNorm) == 0
    assert "per rank on 2 CPU processes" in caplog.text
    keys = set(net.state_dict())
    synced = batchnorm_across_ranks(net, 2, "cuda")
    assert count(synced, torch.nn.SyncBatchNorm) == batchnorms and set(synced.state_dict()) == keys
