import subprocess
import sys

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from conftest import ROOT
from vidrep.training.run import check_config

CONF = str(ROOT / "conf")
GROUPS = {
    "data": ["demo", "corpus", "1.5M", "5M", "8M"],
    "model": ["caffenet", "torchvision_alexnet"],
    "model/loss": ["paper", "code_faithful"],
    "trainer": ["default", "cpu", "gpu", "ddp"],
    "logger": ["wandb", "csv", "none"],
    "callbacks": ["default"],
    "experiment": ["paper_1.5M", "paper_5M", "paper_8M", "code_faithful"],
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
        on_disk = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        assert on_disk == sorted(options), group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", "data.root=" + str(tmp_path / "corpus")]
    cfg = compose_train(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    check_config(cfg)
    hydra.utils.instantiate(cfg.data)
    for part in ("logger", "callbacks"):
        for c in (cfg.get(part) or {}).values():
            if part == "logger" and "wandb" in c._target_:
                continue  # instantiating starts a run; covered in test_train
            hydra.utils.instantiate(c)
    if group in ("model", "model/loss", "experiment"):
        with open_dict(cfg):
            cfg.model.input_size = 67
        module = hydra.utils.instantiate(cfg.model)
        assert module.net.out_dim == cfg.model.net.trunk.fc7_dim


def test_presets_hold_the_documented_settings(tmp_path):
    paper = compose_train(["experiment=paper_8M", "data.root=/x"], tmp_path)
    assert paper.data.num_patches == 8_000_000 and paper.data.batch_size == 50
    assert paper.model.loss.margin == 0.5 and not paper.model.loss.symmetric and not paper.model.loss.violators_only
    assert paper.model.loss.hard_after_steps == 150_000 and paper.model.loss.hard_ratio == 1.0
    assert paper.model.input_size == 227 and paper.model.net.trunk.fc6_dim == 4096 and paper.model.net.trunk.fc7_dim == 1024
    assert paper.trainer.max_steps == 400_000
    assert compose_train(["experiment=paper_1.5M", "data.root=/x"], tmp_path).model.loss.hard_after_epochs == 10
    code = compose_train(["experiment=code_faithful", "data=8M", "data.root=/x"], tmp_path)
    assert (code.model.loss.margin, code.model.loss.hard_ratio, code.model.loss.initial_hard_ratio) == (1.0, 0.5, 0.5)
    assert code.model.loss.symmetric and code.model.loss.violators_only and code.model.loss.hard_after_epochs == 0
    opt = paper.model.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, paper.model.bias_lr_mult) == (0.001, 0.9, 0.0005, 2.0)
    assert paper.model.scheduler.step_size == 100_000 and paper.model.scheduler.gamma == 0.1


def test_paper_scale_command_composes():
    out = subprocess.run([sys.executable, "train.py", "data=8M", "data.root=/data/corpus", "trainer.devices=4", "--cfg", "job", "--resolve"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
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
    """conf/mine.yaml documents every miner setting; it must agree with MinerConfig's defaults."""
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
        cfg = compose("train", overrides=["hydra/launcher=slurm_gpu", "trainer.devices=4", "trainer.num_nodes=2",
                                          "data=8M", "data.root=/x"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
