import json
import subprocess
import sys

import hydra
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from vidrep.training import plan
from vidrep.training.run import check_config

CONF = str(ROOT / "vidrep" / "conf")
GROUPS = {
    "data": ["demo", "corpus", "1.5M", "5M", "8M"],
    "model": ["caffenet", "torchvision_alexnet", "resnet18"],
    "model/loss": ["paper", "code_faithful", "infonce"],
    "trainer": ["default", "cpu", "gpu", "ddp"],
    "logger": ["wandb", "csv", "none"],
    "callbacks": ["default"],
    "experiment": ["paper_1.5M", "paper_5M", "paper_8M", "code_faithful", "cpu"],
}


def compose_train(overrides, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_every_group_option_is_listed():
    for group, options in GROUPS.items():
        on_disk = sorted(p.stem for p in (ROOT / "vidrep" / "conf" / group).glob("*.yaml"))
        assert on_disk == sorted(options), group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", "data.root=" + str(tmp_path / "corpus")]
    cfg = compose_train(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    check_config(cfg)
    plan.data_module(cfg.data)
    for part in ("logger", "callbacks"):
        for c in (cfg.get(part) or {}).values():
            if part == "logger" and "wandb" in c._target_:
                continue  # instantiating starts a run; covered in test_train
            hydra.utils.instantiate(c)
    if group in ("model", "model/loss", "experiment"):
        with open_dict(cfg):
            cfg.model.input_size = 67
        cfg = plan.drop_unused_schedule_keys(cfg)  # as train() does: data=demo's switch is the ranking loss's
        module = hydra.utils.instantiate(cfg.model)
        assert module.net.out_dim == cfg.model.net.trunk.fc7_dim


def test_presets_hold_the_documented_settings(tmp_path):
    paper = compose_train(["experiment=paper_8M", "data.root=/x"], tmp_path)
    assert paper.data.num_patches == 8_000_000 and paper.data.batch_size == 50
    assert paper.model.loss.margin == 0.5 and not paper.model.loss.symmetric and not paper.model.loss.violators_only
    assert paper.model.loss.hard_after_pairs == 7_500_000 and paper.model.loss.hard_after_epochs == 10
    assert paper.model.loss.hard_ratio == 1.0 and paper.model.loss.gather_across_ranks and paper.scaling == "paper"
    assert (
        paper.model.input_size == 227
        and paper.model.net.trunk.fc6_dim == 4096
        and paper.model.net.trunk.fc7_dim == 1024
    )
    assert paper.trainer.max_steps == 400_000
    assert compose_train(["experiment=paper_1.5M", "data.root=/x"], tmp_path).model.loss.hard_after_epochs == 10
    code = compose_train(["experiment=code_faithful", "data=8M", "data.root=/x"], tmp_path)
    assert (code.model.loss.margin, code.model.loss.hard_ratio, code.model.loss.initial_hard_ratio) == (1.0, 0.5, 0.5)
    assert code.model.loss.symmetric and code.model.loss.violators_only and code.model.loss.hard_after_epochs == 0
    opt = paper.model.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, paper.model.bias_lr_mult) == (0.001, 0.9, 0.0005, 2.0)
    assert paper.model.scheduler.step_size == 100_000 and paper.model.scheduler.gamma == 0.1


def test_paper_scale_command_composes():
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=8M",
            "data.root=/data/corpus",
            "trainer.devices=4",
            "--cfg",
            "job",
            "--resolve",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.trainer.devices == 4 and cfg.data.num_patches == 8_000_000 and cfg.data.root == "/data/corpus"


def test_unknown_data_size_lists_the_options():
    out = subprocess.run([sys.executable, "train.py", "data=3M"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "data/3M" in out.stderr and "1.5M" in out.stderr and "8M" in out.stderr


def test_paper_size_without_root_names_the_fix(tmp_path):
    cfg = compose_train(["data=8M"], tmp_path)
    with pytest.raises(ValueError, match=r"data.root=/path/to/corpus"):
        check_config(cfg)


def _compose_mine(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("mine", overrides=overrides, return_hydra_config=True)


def test_mine_config_states_the_miner_defaults():
    """vidrep/conf/mine.yaml documents every miner setting; it must agree with MinerConfig's defaults."""
    from vidrep.mining.miner import MinerConfig

    cfg = _compose_mine(["videos=/v", "out=/c"])
    assert hydra.utils.instantiate(cfg.miner) == MinerConfig()
    assert set(cfg.miner) - {"_target_"} == set(MinerConfig().to_dict())
    assert "joblib" in cfg.hydra.launcher._target_.lower()


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_mine(["videos=/v", "out=/c", "hydra/launcher=slurm"])
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.cpus_per_task == 32


def test_slurm_gpu_launcher_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm_gpu",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "data=8M",
                "data.root=/x",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def _schedule(overrides, tmp_path, world, train_pairs, val_pairs=0):
    from vidrep.training.plan import settings_of
    from vidrep.training.schedule import compute_schedule

    cfg = compose_train(overrides, tmp_path)
    return compute_schedule(settings_of(cfg), world, cfg.scaling, train_pairs, val_pairs)


def test_one_negative_switch_for_every_preset_data_size_and_gpu_count(tmp_path):
    """Random negatives for 10 epochs of the training pairs or 7.5M pairs, whichever comes first."""
    for world in (1, 4, 8):
        alone = _schedule(["data=8M", "data.root=/x", f"trainer.devices={world}"], tmp_path, world, 4_000_000)
        preset = _schedule(
            ["experiment=paper_8M", "data.root=/x", f"trainer.devices={world}"], tmp_path, world, 4_000_000
        )
        assert alone.hard_negatives_from_step == preset.hard_negatives_from_step == 150_000
        assert alone == preset
        for size, pairs in (("1.5M", 750_000), ("5M", 2_500_000)):
            s = _schedule([f"experiment=paper_{size}", "data.root=/x"], tmp_path, world, pairs)
            assert s.hard_negatives_from_step == 150_000  # 10 epochs of 1.5M = 7.5M pairs; 3 epochs of 5M
        linear = _schedule(["data=8M", "data.root=/x", "scaling=linear"], tmp_path, world, 4_000_000)
        assert linear.hard_negatives_from_step * linear.global_batch_pairs == 7_500_000
    small = _schedule(["data=corpus", "data.root=/x"], tmp_path, 1, 100_000)
    assert small.hard_negatives_from_step == 10 * 2_000  # 10 epochs come first


def test_data_sizes_count_training_patches(tmp_path):
    import numpy as np

    from vidrep.data.corpus import CorpusError, select_pairs

    cfg = compose_train(["data=1.5M", "data.root=/x"], tmp_path)
    videos = np.repeat(np.arange(20_000), 40)  # 800K pairs
    sel = select_pairs(
        videos, np.tile(np.arange(40), 20_000), cfg.data.num_patches // 2, cfg.data.val_fraction, cfg.data.seed
    )
    assert 2 * len(sel.train) == 1_500_000
    assert 0.04 < len(sel.val) / len(sel.train) < 0.065  # 5 % of the videos, on top
    assert not set(videos[sel.val]) & set(videos[sel.train])
    with pytest.raises(CorpusError, match=r"800,000 pairs: .* in training videos"):
        select_pairs(videos, np.tile(np.arange(40), 20_000), 790_000, cfg.data.val_fraction, cfg.data.seed)


def _dry_run(tmp_path, corpus, *extra):
    import json

    from conftest import TINY

    from vidrep.training.run import train

    out = tmp_path / "_".join(e.replace("=", "-") for e in extra)
    # data=corpus: the paper's settings (its 400K steps), not the demo's
    tiny = [o for o in TINY if o not in ("~callbacks.demo_check", "trainer.max_steps=-1")]
    cfg = compose_train(["data=corpus", *tiny, f"data.root={corpus}", "logger=csv", "dry_run=true", *extra], out)
    assert train(cfg) == {}
    assert sorted(p.name for p in out.iterdir()) == ["schedule.json"]  # no checkpoints, no logs: nothing ran
    return json.loads((out / "schedule.json").read_text())


KEYS = [
    "world_size",
    "scaling",
    "global_batch_pairs",
    "per_rank_pairs",
    "lr",
    "max_steps",
    "lr_drops_at_steps",
    "train_pairs",
    "val_pairs",
    "steps_per_epoch",
    "epochs",
    "hard_negatives_from_step",
    "negative_pool",
]


def test_dry_run_schedule_for_1_2_and_4_devices(tmp_path, tiny_corpus):
    paper = {d: _dry_run(tmp_path, tiny_corpus, f"trainer.devices={d}") for d in (1, 2, 4)}
    for d, s in paper.items():
        assert list(s) == KEYS
        assert s["world_size"] == d and len(s["per_rank_pairs"]) == d and sum(s["per_rank_pairs"]) == 8
        rest = {k: v for k, v in s.items() if k not in ("world_size", "per_rank_pairs")}
        assert rest == {k: v for k, v in paper[1].items() if k not in ("world_size", "per_rank_pairs")}
    one = paper[1]
    assert (one["global_batch_pairs"], one["lr"], one["max_steps"], one["lr_drops_at_steps"]) == (
        8,
        0.001,
        400_000,
        [100_000, 200_000, 300_000],
    )
    assert one["steps_per_epoch"] == one["train_pairs"] // 8 and one["negative_pool"] == 14
    assert one["hard_negatives_from_step"] == 10 * one["steps_per_epoch"]
    assert one["epochs"] == pytest.approx(400_000 * 8 / one["train_pairs"])
    for d in (2, 4):
        s = _dry_run(tmp_path, tiny_corpus, f"trainer.devices={d}", "scaling=linear")
        assert s["global_batch_pairs"] == 8 * d and s["per_rank_pairs"] == [8] * d
        assert s["lr"] == pytest.approx(0.001 * d) and s["max_steps"] == 400_000 // d
        assert s["lr_drops_at_steps"] == [100_000 // d * k for k in (1, 2, 3)]
        assert s["steps_per_epoch"] == one["train_pairs"] // (8 * d)
        assert s["hard_negatives_from_step"] == 10 * s["steps_per_epoch"]
        assert s["epochs"] == pytest.approx(one["epochs"], rel=0.01)  # the same pairs seen


def _plan(tmp_path, *overrides):
    from vidrep.training.run import train

    cfg = compose_train(["logger=csv", "dry_run=true", *overrides], tmp_path)
    assert train(cfg) == {}
    return json.loads((tmp_path / "schedule.json").read_text())


def test_dry_run_plans_the_papers_run_without_a_corpus(tmp_path):
    """data=8M on 4 GPUs, no data.root: the README's table, from the data size alone."""
    s = _plan(tmp_path, "data=8M", "trainer.devices=4")
    assert s["train_pairs"] == 4_000_000 and s["val_pairs"] is None
    assert (s["world_size"], s["global_batch_pairs"], s["per_rank_pairs"]) == (4, 50, [13, 13, 12, 12])
    assert (s["lr"], s["max_steps"], s["lr_drops_at_steps"]) == (0.001, 400_000, [100_000, 200_000, 300_000])
    assert (s["epochs"], s["hard_negatives_from_step"], s["negative_pool"]) == (5.0, 150_000, 98)
    linear = _plan(tmp_path / "linear", "data=8M", "trainer.devices=8", "scaling=linear")
    assert (linear["lr"], linear["max_steps"], linear["hard_negatives_from_step"]) == (0.008, 50_000, 18_750)


def test_dry_run_plans_a_corpus_not_mined_yet_or_too_small(tmp_path, tiny_corpus, caplog):
    s = _plan(tmp_path, "data=corpus", "data.train_pairs=1000000", "data.root=/not/mined/yet")
    assert s["train_pairs"] == 1_000_000 and s["steps_per_epoch"] == 20_000
    # a corpus smaller than the data size: the plan is the data size's, with a warning that says so
    small = _plan(tmp_path / "small", "data=8M", f"data.root={tiny_corpus}")
    assert small["train_pairs"] == 4_000_000 and "planning from data.num_patches=8000000" in caplog.text
    with pytest.raises(ValueError, match=r"data.train_pairs=<"):
        _plan(tmp_path / "none", "data=corpus")


def test_train_pairs_is_for_planning_only(tmp_path, capsys):
    from vidrep.common.preflight import preflight
    from vidrep.training.checks import check_train

    with pytest.raises(SystemExit) as stop:
        preflight("train", check_train, ["data=corpus", f"data.root={tmp_path}", "data.train_pairs=100"])
    assert stop.value.code == 2 and "only goes with dry_run=true" in capsys.readouterr().err
    preflight("train", check_train, ["data=8M", "trainer.devices=4", "dry_run=true"])  # no corpus: planning is fine


def test_dry_run_needs_an_integer_device_count(tmp_path, tiny_corpus):
    with pytest.raises(ValueError, match="trainer.devices=4"):
        _dry_run(tmp_path, tiny_corpus, "trainer.devices=auto")


def test_linear_scaling_warms_up_then_drops_the_lr(tmp_path):
    from vidrep.training.plan import apply_schedule

    cfg = compose_train(["data=8M", "data.root=/x", "scaling=linear", "trainer.devices=4"], tmp_path)
    schedule = _schedule(["data=8M", "data.root=/x", "scaling=linear"], tmp_path, 4, 4_000_000)
    run = apply_schedule(cfg, schedule, warmup=5_000)
    assert run.trainer.max_steps == 100_000 and run.model.optimizer.lr == pytest.approx(0.004)
    assert run.model.loss.hard_after_steps == 37_500
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.model.optimizer.lr)
    scheduler = hydra.utils.instantiate(run.model.scheduler)(optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # the warm-up starts at one GPU's lr
    factor = scheduler.lr_lambdas[0]
    assert factor(0) == pytest.approx(0.25) and factor(2_500) == pytest.approx(0.625) and factor(5_000) == 1.0
    assert factor(24_999) == 1.0 and factor(25_000) == pytest.approx(0.1) and factor(75_000) == pytest.approx(0.001)


def test_experiment_cpu_is_the_demos_scale_for_any_corpus(tmp_path):
    demo = compose_train([], tmp_path)
    cpu = compose_train(["experiment=cpu", "data=corpus", f"data.root={tmp_path}"], tmp_path)
    for key in (
        "model.input_size",
        "model.net.trunk.fc6_dim",
        "model.net.trunk.fc7_dim",
        "model.net.trunk.init",
        "model.net.trunk.bias_one",
        "model.optimizer.lr",
        "data.batch_size",
        "trainer.max_epochs",
    ):
        assert OmegaConf.select(cpu, key) == OmegaConf.select(demo, key), key
    assert cpu.model.input_size == 99 and cpu.data.root == str(tmp_path)
