import copy
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
    assert (
        collapse_reason(**{k.split("/")[1][:-5]: float(v) for k, v in batch_metrics(*healthy()).items()}, dim=dim)
        is None
    )
    reason = collapse_reason(
        **{k.split("/")[1][:-5]: float(v) for k, v in batch_metrics(*collapsed()).items()}, dim=dim
    )
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


def test_progress_bar_counts_epochs_from_one_and_hides_a_negative_total():
    from vidrep.training.progress import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=14)
    assert bar._get_train_description(0).strip() == "Epoch 1/14"
    bar._trainer = SimpleNamespace(max_epochs=-1)  # training bounded by max_steps
    assert bar._get_train_description(2).strip() == "Epoch 3"


def test_report_rows_and_render_folders_have_readable_names(tmp_path):
    from pathlib import Path

    from vidrep.eval.run import checkpoint_name
    from vidrep.viz.render import _folder_names

    run = tmp_path / "2026-12-01_10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- experiment=paper_8M\n- data.root=/data/corpus\n- trainer.devices=4\n"
    )
    assert checkpoint_name(str(run / "checkpoints" / "last.ckpt")) == "experiment=paper_8M"
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      data: demo\n")
    assert checkpoint_name(str(run / "checkpoints" / "last.ckpt")) == "demo"
    assert checkpoint_name("random") == "random" and checkpoint_name("imagenet:/w/alexnet.pth") == "imagenet"
    assert checkpoint_name(str(tmp_path / "bare" / "checkpoints" / "x.ckpt")) == "bare"
    assert _folder_names(
        [Path("/r/svm-run/results.json"), Path("/s/svm-run/results.json"), Path("/t/det/results.json")]
    ) == ["svm-run", "svm-run-2", "det"]


def test_resume_takes_the_runs_own_overrides(tmp_path):
    from vidrep.training.resume import with_run_overrides

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- data=8M\n- data.root=/c\n- trainer.devices=4\n- ckpt_path=/old.ckpt\n"
    )
    argv = [f"resume={run}", "trainer.devices=2"]
    expanded = with_run_overrides(argv)
    assert expanded == ["data=8M", "data.root=/c", f"resume={run}", "trainer.devices=2"]
    assert with_run_overrides(expanded) == expanded  # DDP ranks expand it again to the same
    assert with_run_overrides(["seed=1"]) == ["seed=1"]


def test_the_run_directory_is_new_unless_resume_names_one(tmp_path):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def run_dir(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.run.dir

    assert run_dir().startswith("outputs/train/20")
    assert run_dir(f"resume={tmp_path}") == str(tmp_path)


def test_svm_convergence_warnings_are_summarised_once_per_stage(tmp_path, caplog, recwarn):
    import numpy as np

    from vidrep.eval.svm import svm_class_results

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    labels = np.where(rng.random((40, 2)) < 0.5, 1, -1)
    caplog.set_level(logging.WARNING, logger="vidrep.eval.svm")
    results = svm_class_results(
        x, labels, x, labels, ["a", "b"], [1.0, 10.0], 2, 0, False, tmp_path, max_iter=1, desc="fc7 SVMs"
    )
    assert [r["class"] for r in results] == ["a", "b"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("fc7 SVMs: ") and "max_iter=1" in lines[0]
    from sklearn.exceptions import ConvergenceWarning

    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def _compose_train(overrides, run_dir):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.root_dir = str(run_dir), str(ROOT)
    return cfg


def test_a_resumed_run_logs_into_the_same_wandb_run_and_a_finished_one_opens_none(tmp_path, tiny_corpus, caplog):
    from conftest import TINY

    from vidrep.training.run import train

    run = tmp_path / "run"
    base = [*TINY, f"data.root={tiny_corpus}", "~data.demo", "logger=wandb", "logger.wandb.mode=offline"]
    train(_compose_train([*base, "trainer.max_steps=2"], run))
    run_id = (run / "wandb" / "run-id").read_text()
    train(_compose_train([*base, "trainer.max_steps=4", f"resume={run}"], run))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run, two sittings
    # resuming a finished run: says so, gives its final metrics, opens no W&B run
    caplog.set_level(logging.INFO, logger="vidrep.training.resume")
    metrics = train(_compose_train([*base, "trainer.max_steps=4", f"resume={run}"], run))
    assert "finished at step 4: nothing to resume" in caplog.text and "train/loss_epoch" in metrics
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    # a new run directory gets its own W&B run
    train(_compose_train([*base, "trainer.max_steps=1"], tmp_path / "other"))
    assert (tmp_path / "other" / "wandb" / "run-id").read_text() != run_id


def test_multirun_jobs_share_a_wandb_group_named_after_the_sweep(tmp_path):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from vidrep.common.loggers import sweep_group

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.name, cfg.hydra.sweep.dir = "train", str(tmp_path / "multirun" / "2026-12-05_10-00-00")
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(copy.deepcopy(cfg))
    assert sweep_group() is None
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_group() == "train/2026-12-05_10-00-00"
    finally:
        HydraConfig.instance().cfg = None  # later tests run outside Hydra


def test_learning_is_judged_by_triplet_accuracy_from_step_zero(caplog):
    from vidrep.training.collapse import learning_verdict

    assert learning_verdict([(0, 0.9)]) is None and learning_verdict([(0, 0.9), (0, 0.95)]) is None
    assert learning_verdict([(0, 0.80), (50, 0.70), (100, 0.86)]).startswith("held-out triplets ordered better")
    # the measured case: val/loss fell 0.485 -> 0.245 while triplet accuracy fell 0.92 -> 0.86
    fell = learning_verdict([(0, 0.92), (571, 0.86)])
    assert fell.startswith("no gain") and "0.920 at step 0, 0.860 at step 571" in fell and "run=<run dir>" in fell
    caplog.set_level(logging.INFO, logger="vidrep.training.collapse")
    cb = CollapseWarning()
    for step, acc in ((0, 0.92), (571, 0.86)):
        trainer = SimpleNamespace(
            callback_metrics={"val/triplet_acc": torch.tensor(acc)}, global_step=step, sanity_checking=False
        )
        cb.on_validation_end(trainer, None)
    cb.on_train_end(SimpleNamespace(callback_metrics={}, global_step=571, loggers=[]), None)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "no gain" in caplog.records[0].getMessage()
