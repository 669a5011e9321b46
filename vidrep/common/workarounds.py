"""Every place vidrep works around a Lightning, Hydra, W&B or PyTorch behaviour, each beside the
behaviour it answers, so that an upgrade that fixes one can drop it here without a search.

Three uses of private API live with the code they serve and are listed here:
- vidrep/training/progress.py, `ProgressBar._get_train_description` (Lightning's RichProgressBar):
  epochs counted from 1 and no "/-1" total in a run bounded by steps. Lightning >= 2.4.
- vidrep/mining/run.py, `_pool`: inside a job of Hydra's joblib launcher the start method is
  joblib's 'loky', which a spawned child cannot resolve; the mining pool resets it to 'spawn'.
- vidrep/training/start.py, `ValidateAtStart`: the validation loop run before the first step saves
  and restores `trainer._logger_connector._first_loop_iter`, as Lightning's own mid-epoch
  validation does (tests/test_start.py fails if that changes).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

# Variables Lightning sets when it starts the other DDP ranks itself.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class EpochForwarder:
    """Lightning calls set_epoch on `dataloader.sampler` and `dataloader.batch_sampler.sampler`,
    never on a batch sampler itself: a batch sampler that shuffles per epoch exposes one of these
    as its `.sampler`, or every epoch repeats epoch 0's order."""

    def __init__(self, owner) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


def quiet_mid_epoch_resume_warning() -> None:
    """Lightning looks for a mid-epoch resume state on the DataLoader only, and warns that such a
    resume is unreliable; vidrep keeps the position in the datamodule's state, where it is exact."""
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def without_anonymous_setting(logger):
    """Lightning's WandbLogger passes `anonymous=None` to wandb.init whatever it is given, and W&B
    (>= 0.19) warns "The anonymous setting has no effect" for any value but unset: drop the key."""
    logger._wandb_init.pop("anonymous", None)
    return logger


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """What Lightning prints that a user of vidrep cannot act on: the tips that advertise its cloud
    services (litlogger, litmodels) at every fit (Lightning >= 2.5), and torch 2.14's FutureWarning
    for the `LeafSpec` that Lightning 2.6's `utilities/_pytree.py` still builds."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def ddp_children_run_this_job_only() -> None:
    """In a Hydra multirun, make the processes Lightning starts for the other DDP ranks run this
    job, in this job's directory, rather than the whole sweep again.

    Lightning starts rank k as `python train.py <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>`: in
    a multirun that is the sweep (`-m` and every value) and a fresh timestamped directory. Here
    argv becomes this job's own overrides, and hydra.run.dir this job's output directory (Hydra
    keeps its config read-only, hence the unlock)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *hc.overrides.task]
    OmegaConf.set_readonly(hc, False)
    with open_dict(hc):
        hc.run.dir = hc.runtime.output_dir


def end_distributed(env_before: set[str]) -> None:
    """Close this job's process group and drop the DDP variables Lightning put in the environment
    when it started the other ranks, so that the next job of a multirun (same process) starts its
    own ranks: with LOCAL_RANK left set, Lightning would take the processes as launched already
    and wait for ranks that never come. Variables set by an outer launcher (srun, torchrun) stay."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for var in DDP_ENV:
        if var not in env_before:
            os.environ.pop(var, None)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV ExperimentWriter deletes an existing metrics.csv ("Previous log files will be
    deleted"); this one reads its header and appends, so a resumed run keeps its curves."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """At module level so that it pickles (the detection protocol's fine-tuning spawns its DDP ranks)."""

    @property
    def experiment(self):
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment
