import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, TINY
from test_configs import compose_train

from vidrep.common.loggers import resolve_wandb_mode
from vidrep.training.run import train


def tiny_cfg(tmp_path, corpus, *extra):
    return compose_train([*TINY, f"data.root={corpus}", "~data.demo", "logger=csv", *extra], tmp_path)


def run_cli(args, cwd, timeout=300, env=None):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_metrics(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def train_pairs(corpus) -> int:
    """Training pairs of the tiny corpus under TINY's split (mined, so not a round number)."""
    from vidrep.data.datamodule import PairDataModule

    dm = PairDataModule(str(corpus), batch_size=8, num_workers=0, input_size=67, val_fraction=0.25)
    dm.setup()
    return len(dm.train_set)


def test_fast_dev_run(tmp_path, tiny_corpus):
    metrics = train(tiny_cfg(tmp_path, tiny_corpus, "+trainer.fast_dev_run=2"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert 0.0 <= metrics["train/triplet_acc_step"] <= 1.0
    # 8 pairs of ~9 training videos of ~5 pairs: ~6 distinct expected when shuffled, 2 in order
    assert metrics["train/videos_per_batch_step"] >= 4


def test_resume_continues_step_scheduler_and_negative_phase(tmp_path, tiny_corpus):
    common = [
        "model.loss.hard_after_epochs=1",
        "model.scheduler.step_size=3",
        "callbacks.periodic_checkpoint.every_n_train_steps=1000",
    ]
    first = tmp_path / "first"
    train(tiny_cfg(first, tiny_corpus, *common, "trainer.max_epochs=2"))
    last = first / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    steps_per_epoch = ckpt["global_step"] // 2
    assert steps_per_epoch == train_pairs(tiny_corpus) // 8  # batches of 8, last partial batch dropped
    assert ckpt["negative_phase"] == "hard"
    second = tmp_path / "second"
    train(tiny_cfg(second, tiny_corpus, *common, "trainer.max_epochs=3", f"ckpt_path={last}"))
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 3 * steps_per_epoch and resumed["epoch"] == ckpt["epoch"] + 1
    assert resumed["negative_phase"] == "hard"
    assert resumed["lr_schedulers"][0]["last_epoch"] == 3 * steps_per_epoch
    weights, biases = resumed["optimizer_states"][0]["param_groups"]
    assert weights["lr"] == pytest.approx(weights["initial_lr"] * 0.1 ** (3 * steps_per_epoch // 3))
    assert biases["initial_lr"] == pytest.approx(2 * weights["initial_lr"]) and biases["weight_decay"] == 0
    assert resumed["optimizer_states"][0]["state"], "momentum buffers restored and kept"
    # the CSV log of the resumed run starts at the checkpoint's step
    steps = [int(r["step"]) for r in read_metrics(second / "metrics.csv") if r.get("train/loss_step")]
    assert min(steps) >= 2 * steps_per_epoch


def test_wandb_offline_without_credentials_or_network(tmp_path, tiny_corpus, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert resolve_wandb_mode(timeout=1.0) == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_BASE_URL")
    cfg = compose_train(
        [*TINY, f"data.root={tiny_corpus}", "~data.demo", "logger=wandb", "trainer.max_steps=2"], tmp_path
    )
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert (tmp_path / "metrics.csv").exists()


def test_train_cli_writes_run_dir(tmp_path, tiny_corpus):
    out = run_cli(
        [
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer.max_epochs=2",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / ".hydra" / "config.yaml").exists()
    rows = read_metrics(run / "metrics.csv")
    assert any(r.get("val/loss") for r in rows) and any(r.get("lr-SGD/pg1") for r in rows)
    assert "last checkpoint" in out.stderr + out.stdout
    # the schedule: printed at the start, written beside the run, logged with the config
    schedule = json.loads((run / "schedule.json").read_text())
    assert "hard_negatives_from_step" in out.stdout and schedule["steps_per_epoch"] == train_pairs(tiny_corpus) // 8
    assert yaml.safe_load((run / "hparams.yaml").read_text())["schedule"] == schedule


@pytest.mark.slow
@pytest.mark.parametrize("gather", [False, True])
def test_ddp_two_cpu_processes(tmp_path, tiny_corpus, gather):
    run_cli(
        [
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=2",
            f"model.loss.gather_across_ranks={gather}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # ranks made no folders of their own
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    # global batches of 8 pairs (4 per rank), as many as one process trains, for 2 epochs
    assert ckpt["global_step"] == 2 * (train_pairs(tiny_corpus) // 8)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    negatives = [float(r["train/negatives_per_pair_step"]) for r in rows if r.get("train/negatives_per_pair_step")]
    # K = 4 found among the 16 gathered patches; a rank's own 8 patches may hold fewer candidates
    assert negatives and (all(n == 4 for n in negatives) if gather else min(negatives) >= 2)


@pytest.mark.slow
def test_multirun_finishes_each_wandb_run_even_after_a_failure(tmp_path, tiny_corpus):
    env = {"HOME": str(tmp_path / "home"), "WANDB_MODE": ""}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=wandb",
            "trainer.max_steps=2",
            "model.optimizer.momentum=-1,0.9,0.8",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    # (a negative momentum fails in the optimiser, after W&B started; settings refused before anything starts are in
    # test_settings_that_train_to_nothing_stop_before_anything_starts)
    assert out.returncode != 0 and "Invalid momentum value" in out.stderr  # the failed job is reported
    sweep = tmp_path / "sweep"
    runs = {job: list((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1", "2")}
    assert all(len(r) == 1 for r in runs.values())
    assert len({r[0].name for r in runs.values()}) == 3  # one run per job, not merged
    assert (sweep / "1" / "checkpoints" / "last.ckpt").exists() and (sweep / "2" / "checkpoints" / "last.ckpt").exists()
    # nothing a user cannot act on (common.workarounds): W&B's anonymous-setting warning, Lightning's
    # tips, its unset-weights_only line per checkpoint, torch's LeafSpec deprecation inside Lightning
    for noise in ("anonymous setting", "Tip:", "weights_only` was not set", "LeafSpec"):
        assert noise not in out.stdout + out.stderr, noise


@pytest.mark.slow
def test_demo_loss_goes_down(tmp_path):
    """The Quickstart's `python train.py` (data=demo's world and settings) on half the demo's videos
    (building all 128 took most of this test's 7 minutes; the whole demo is the Quickstart's own
    check), cut to the first 4 epochs (random negatives) to keep the suite short."""
    run_cli(
        [
            "logger=csv",
            "~callbacks.progress",
            "data.demo.num_videos=64",
            "trainer.max_epochs=4",
            "trainer.max_steps=-1",  # the demo's own 20 steps end within epoch 3
            "~callbacks.demo_check",  # the test world's build and scoring: tests/test_demo_check.py
            f"hydra.run.dir={tmp_path}/run",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        cwd=tmp_path,
        timeout=1500,
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    by_epoch = {int(r["epoch"]): float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")}
    assert sorted(by_epoch) == [0, 1, 2, 3]
    # the world of demo v4 (one palette for all videos) is harder than v3's, whose loss fell below
    # 0.7x epoch 0's by epoch 3; a falling training loss is plumbing, not evidence of learning
    assert min(by_epoch[e] for e in (1, 2, 3)) < by_epoch[0], by_epoch
    assert all(torch.isfinite(torch.tensor(list(by_epoch.values()))))
    # the demo cuts its corpus's distractors: the retrieval monitor runs the hard protocol from step 0
    monitor = [(int(r["step"]), r["monitor/hard/recall_at_1"]) for r in rows if r.get("monitor/hard/recall_at_1")]
    assert monitor and monitor[0][0] == 0 and not any(k.startswith("monitor/other_videos") for k in rows[0])


@pytest.mark.slow
def test_validation_metrics_do_not_change_with_the_number_of_devices(tmp_path, tiny_corpus):
    common = [
        *TINY,
        f"data.root={tiny_corpus}",
        "~data.demo",
        "logger=csv",
        "trainer.accelerator=cpu",
        "data.batch_size=5",
    ]
    run_cli([*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/train"], cwd=tmp_path)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    values = {}
    for devices in (1, 2):
        extra = ["trainer=ddp", "trainer.devices=2"] if devices == 2 else []
        run_cli(
            [*common, *extra, "validate_only=true", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/val{devices}"],
            cwd=tmp_path,
        )
        rows = [r for r in read_metrics(tmp_path / f"val{devices}" / "metrics.csv") if r.get("val/loss")]
        values[devices] = {k: float(rows[-1][k]) for k in ("val/loss", "val/triplet_acc", "val/sim_neg")}
    assert values[1] == pytest.approx(values[2], rel=1e-5), values


@pytest.mark.slow
def test_ddp_run_resumes(tmp_path, tiny_corpus):
    common = [
        *TINY,
        f"data.root={tiny_corpus}",
        "~data.demo",
        "logger=csv",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model.loss.hard_after_epochs=1",
    ]
    run_cli([*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/first"], cwd=tmp_path)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    # The 2-rank epoch is one process's epoch (random negatives and flips drawn for the global batch,
    # gradients averaged): the same weights and the same train/* curves over both ranks' pairs, up
    # to float32 summation order.
    one = [a for a in common if not a.startswith(("trainer=ddp", "trainer.devices"))]
    run_cli([*one, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/one"], cwd=tmp_path)
    single = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, weight in single["state_dict"].items():
        torch.testing.assert_close(first["state_dict"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    curves = {}
    for run in ("first", "one"):
        rows = read_metrics(tmp_path / run / "metrics.csv")
        curves[run] = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(curves["one"]) == 1 and curves["first"] == pytest.approx(curves["one"], rel=1e-5)
    run_cli([*common, "trainer.max_epochs=2", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}/second"], cwd=tmp_path)
    second = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    per_epoch = train_pairs(tiny_corpus) // 8
    assert first["global_step"] == per_epoch and second["global_step"] == 2 * per_epoch
    assert second["epoch"] == first["epoch"] + 1 and second["negative_phase"] == "hard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "one", "second"]


@pytest.mark.slow
def test_multirun_of_ddp_jobs(tmp_path, tiny_corpus):
    """Lightning restarts the script for rank 1 with the command line: in a multirun that would be
    the whole sweep again, in a new timestamped folder. Each job's rank 1 must run that job only."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "seed=0,1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("Launching 2 jobs") == 1
    sweeps = list((tmp_path / "outputs" / "train" / "multirun").iterdir())
    assert len(sweeps) == 1 and sorted(
        p.name for p in sweeps[0].iterdir() if not p.name.startswith(".") and p.is_dir()
    ) == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "outputs" / "train").iterdir()) == ["multirun"]
    for job in ("0", "1"):
        assert (sweeps[0] / job / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_training_decodes_batches_on_the_device(tiny_corpus, tmp_path):
    """data.decoder=device: the workers only read; each batch is decoded where the model runs (here
    the CPU; nvJPEG on a GPU) with flips in training, none in validation."""
    run_cli(
        [
            *TINY,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer.max_epochs=1",
            "data.decoder=device",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert val and train and all(math.isfinite(v) for v in val + train)


class _Recorder(L.LightningModule):
    """Trains nothing that matters; records a signature of every training pair it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[tuple[int, int]]] = []

    def training_step(self, batch, batch_idx):
        sums = batch["anchor"].flatten(1).long().sum(1)
        self.seen.append(list(zip(batch["video_id"].tolist(), sums.tolist())))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_recorded(corpus, tmp_path, max_epochs, ckpt_path=None, every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vidrep.data.datamodule import PairDataModule

    L.seed_everything(0)
    dm = PairDataModule(
        str(corpus),
        batch_size=4,
        num_workers=0,
        input_size=67,
        flip_p=0.0,
        val_fraction=0.25,
        pin_memory=False,
        persistent_workers=False,
    )
    callbacks = (
        [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}")]
        if every
        else []
    )
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, len(dm.train_dataloader())


def test_a_run_resumed_mid_epoch_trains_the_rest_of_that_epochs_order(tiny_corpus, tmp_path):
    full, n = _fit_recorded(tiny_corpus, tmp_path / "full", max_epochs=2, every=1)
    assert n > 4 and len(full) == 2 * n
    assert len(set(sum(full[:n], []))) == 4 * n  # one epoch: every pair once
    assert full[n:] != full[:n]  # each epoch its own order (Lightning's set_epoch reaches the batch sampler)
    resumed, _ = _fit_recorded(
        tiny_corpus, tmp_path / "resumed", max_epochs=2, ckpt_path=tmp_path / "full" / "step=3.ckpt"
    )
    # the 3 batches trained before the checkpoint are not trained again; the rest of epoch 0 comes
    # in the same order, then all of epoch 1
    assert resumed[: n - 3] == full[3:n]
    assert len(resumed) == 2 * n - 3 and resumed[n - 3 :] == full[n:]
    # a checkpoint at the end of an epoch resumes with the whole next epoch, in its order
    nxt, _ = _fit_recorded(tiny_corpus, tmp_path / "next", max_epochs=2, ckpt_path=tmp_path / "full" / f"step={n}.ckpt")
    assert nxt == full[n:]


def test_the_resumable_sampler_resumes_each_ranks_share():
    from vidrep.data.datamodule import ResumableSampler

    for world in (1, 3):
        for rank in range(world):
            full = ResumableSampler(43, 6, world, rank, seed=5)
            full.set_epoch(4)
            expected = list(full)
            position = {"epoch": 4, "seed": 5, "batches": 2, "global_batch": 6, "world": world}
            assert len(expected) == 7 and full.position(batches=2) == position
            resumed = ResumableSampler(43, 6, world, rank, seed=0, resume=full.position(batches=2))
            assert list(resumed) == expected[2:] and resumed.epoch == 4 and resumed.seed == 5
            boundary = ResumableSampler(43, 6, world, rank, seed=5, resume={"epoch": 4, "seed": 5, "batches": 7})
            full.set_epoch(5)
            assert list(boundary) == list(full) and boundary.epoch == 5


# ---------------------------------------------------------------- settings, checkpoints, history


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.loss.margin=-1", "model.loss.margin"),
        ("data.batch_size=1", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.loss.num_negatives=1000", "model.loss.num_negatives"),
        ("model.net.trunk.fc7_dim=0", "model.net.trunk.fc7_dim"),
    ],
)
def test_settings_that_train_to_nothing_stop_before_anything_starts(tmp_path, tiny_corpus, override, key):
    from vidrep.training.validate import SettingsError

    with pytest.raises(SettingsError, match=key.replace(".", r"\.") + r"=.*use " + key.replace(".", r"\.")):
        train(tiny_cfg(tmp_path, tiny_corpus, override))
    assert not list(tmp_path.iterdir()), "nothing written: no checkpoints, logs or W&B run"


def test_train_cli_refuses_bad_settings_before_making_the_run_dir(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model.loss.num_negatives=1000", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2 and "model.loss.num_negatives=1000" in out.stderr and "at most 62" in out.stderr
    assert not (tmp_path / "run").exists()


def test_every_shipped_option_passes_the_settings_check(tmp_path):
    from test_configs import GROUPS

    from vidrep.training.validate import settings_errors

    for group, options in GROUPS.items():
        for option in options:
            cfg = compose_train([f"{group}={option}", f"data.root={tmp_path}"], tmp_path)
            assert settings_errors(cfg) == [], (group, option)


def test_candidate_pool_bound_matches_a_brute_force_count():
    from vidrep.training.validate import candidate_pool

    for n in (2, 5, 32, 50):
        ids = torch.arange(n)  # every pair its own video: the largest pool
        patch_ids = torch.cat([ids, ids])
        assert candidate_pool(n) == int((patch_ids != ids[0]).sum())


def _tiny_state():
    return {
        "global_step": 7,
        "state_dict": {"w": torch.full((64,), 1.2345, dtype=torch.float32), "b": torch.zeros(3)},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(4)}}}],
    }


def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path):
    from vidrep.training.checkpoints import DamagedCheckpointError, HashedCheckpointIO, load_verified

    io = HashedCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_tiny_state(), path)
    assert load_verified(path)["global_step"] == 7
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary left behind"
    data = bytearray(path.read_bytes())
    at = data.find(torch.full((64,), 1.2345).numpy().tobytes())
    assert at > 0
    data[at + 40 : at + 48] = b"\x00" * 8  # 8 bytes of a tensor overwritten: still a valid zip/pickle
    damaged = tmp_path / "checkpoints" / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=r"damaged.ckpt is damaged .*state_dict\.w.*ckpt_path="):
        load_verified(damaged)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n" * 10)
    for name in ("empty.ckpt", "text.ckpt"):
        with pytest.raises(DamagedCheckpointError, match=f"{name} is damaged"):
            load_verified(tmp_path / name)


def test_resume_moves_an_abandoned_future_aside_and_keeps_earlier_history(tmp_path):
    from vidrep.training.checkpoints import HashedCheckpointIO, prepare_run_dir

    ckpts = tmp_path / "checkpoints"
    io = HashedCheckpointIO()
    for step in (10, 20, 30):
        io.save_checkpoint({**_tiny_state(), "global_step": step}, ckpts / f"step{step:07d}.ckpt")
    io.save_checkpoint({**_tiny_state(), "global_step": 35}, ckpts / "last.ckpt")
    rows = "\n".join(f"{s},{s / 100}" for s in range(0, 35, 5))
    (tmp_path / "metrics.csv").write_text(f"step,train/loss_step\n{rows}\n")
    aside = prepare_run_dir(tmp_path, ckpts / "step0000020.ckpt")
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step0000010.ckpt", "step0000020.ckpt"]
    assert sorted(p.name for p in aside.glob("*.ckpt")) == ["last.ckpt", "step0000030.ckpt"]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "metrics.csv")] == [0, 5, 10, 15]
    assert [int(r["step"]) for r in read_metrics(aside / "metrics.csv")] == [20, 25, 30]
    assert prepare_run_dir(tmp_path, ckpts / "step0000020.ckpt") is None  # nothing more to move


@pytest.mark.slow
def test_kill_9_after_the_second_epoch_then_resume_into_the_same_run_dir(tmp_path, tiny_corpus):
    run = tmp_path / "run"
    args = [
        *TINY,
        f"data.root={tiny_corpus}",
        "~data.demo",
        "logger=csv",
        "trainer.max_epochs=3",
        "callbacks.periodic_checkpoint.every_n_train_steps=1000",
        f"hydra.run.dir={run}",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    killed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *args,
            "+callbacks.kill._target_=conftest.KillAfterEpoch",
            "+callbacks.kill.epoch=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    steps_per_epoch = train_pairs(tiny_corpus) // 8
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * steps_per_epoch
    before = read_metrics(run / "metrics.csv")

    def validations(rows):  # (step 0's pass of ValidateAtStart, the epoch ends)
        val = [r for r in rows if r.get("val/loss")]
        return [int(r["step"]) for r in val if int(r["step"]) == 0], sorted(
            float(r["epoch"]) for r in val if int(r["step"]) > 0
        )

    assert validations(before) == ([0], [0, 1])
    run_cli([*args, f"ckpt_path={last}"], cwd=tmp_path, env=env)
    after = read_metrics(run / "metrics.csv")
    assert validations(after) == ([0], [0, 1, 2]), "earlier rows kept, one per epoch, no second start pass"
    assert [r["train/loss_step"] for r in after[: len(before)] if r.get("train/loss_step")] == [
        r["train/loss_step"] for r in before if r.get("train/loss_step")
    ]
    assert torch.load(last, weights_only=False)["global_step"] == 3 * steps_per_epoch


def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, tiny_corpus):
    from vidrep.training.checkpoints import DamagedCheckpointError

    bad = tmp_path / "old" / "last.ckpt"
    bad.parent.mkdir()
    bad.write_text("not a checkpoint\n")
    with pytest.raises(DamagedCheckpointError, match=r"last.ckpt is damaged .*ckpt_path="):
        train(tiny_cfg(tmp_path / "run", tiny_corpus, "trainer.max_epochs=1", f"ckpt_path={bad}"))


def test_damaged_pairs_stop_training_or_are_skipped_and_counted(tmp_path, tiny_corpus):
    import shutil

    import pyarrow.parquet as pq

    from vidrep.data.corpus import DamagedCorpusError

    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    for manifest in sorted((root / "manifest").glob("*.parquet")):  # every pair but a video's last one damaged
        for row in pq.read_table(manifest).to_pylist()[:-1]:
            with open(root / "shards" / row["shard"], "r+b") as f:
                f.seek(row["query_offset"] + 300)
                f.write(bytes(600))

    def cfg(*extra):
        return compose_train(
            [
                *TINY,
                f"data.root={root}",
                "~data.demo",
                "logger=csv",
                "trainer.max_epochs=1",
                "+trainer.limit_train_batches=2",
                "+trainer.limit_val_batches=0",
                *extra,
            ],
            tmp_path / extra[0].split("=")[-1],
        )

    with pytest.raises(DamagedCorpusError, match=r"pair \w+ in shard .*\.tar is damaged .*verify=true"):
        train(cfg("data.skip_damaged=false"))
    train(cfg("data.skip_damaged=true"))
    skipped = [
        float(r["data/damaged_skipped"])
        for r in read_metrics(tmp_path / "true" / "metrics.csv")
        if r.get("data/damaged_skipped")
    ]
    assert len(skipped) == 1 and skipped[0] >= 1


def test_weights_that_are_not_finite_never_overwrite_last_ckpt(tmp_path):
    from types import SimpleNamespace

    from vidrep.training.checkpoints import LastCheckpoint

    saved = []
    trainer = SimpleNamespace(
        sanity_checking=False, global_step=5, loggers=[], save_checkpoint=lambda path, **kw: saved.append(path)
    )
    cb = LastCheckpoint(str(tmp_path), every_n_train_steps=5)
    net = torch.nn.Linear(2, 2)
    cb.on_train_batch_end(trainer, net, None, None, 4)
    cb.on_train_epoch_end(trainer, net)  # the same step: not written twice
    assert saved == [tmp_path / "last.ckpt"]
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    trainer.global_step = 10
    cb.on_train_epoch_end(trainer, net)
    assert saved == [tmp_path / "last.ckpt"]
