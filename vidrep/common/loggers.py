"""Loggers that never prompt or hang: W&B goes offline by itself without credentials or network."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import socket
import string
from pathlib import Path

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc").authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _can_reach(url: str, timeout: float) -> bool:
    host_port = url.split("://")[-1].split("/")[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str | None = None, timeout: float = 2.0) -> str:
    """'online' only when asked for (or by default) and both credentials and the server are there."""
    mode = requested or os.environ.get("WANDB_MODE") or "online"
    if mode in ("offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if not _has_wandb_credentials():
        log.warning("W&B: no API key found (WANDB_API_KEY or ~/.netrc); logging offline. Sync later with `wandb sync`.")
        return "offline"
    if not _can_reach(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout):
        log.warning("W&B: server unreachable; logging offline. Sync later with `wandb sync`.")
        return "offline"
    return "online"


# The W&B run id of a run directory, kept in it: a run resumed there (resume=<run dir>) logs into the
# W&B run it started, and `wandb sync` uploads all its offline-run-* folders as that one run.
RUN_ID_FILE = Path("wandb") / "run-id"


def kept_run_id(save_dir: str | Path, given: str | None = None) -> str:
    """The W&B run id of the run directory `save_dir`: `given` (logger.wandb.id) when set, else the
    one kept in <save_dir>/wandb/run-id, else a new one; what is returned is kept there (by rank 0)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from vidrep.common.io import atomic_write

    path = Path(save_dir) / RUN_ID_FILE
    kept = path.read_text().strip() if path.is_file() else None
    if given:
        run_id = str(given)
    elif kept:
        return kept
    else:  # W&B's own form: 8 characters of [a-z0-9]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if run_id != kept and rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def sweep_group() -> str | None:
    """In a Hydra multirun, the W&B group its jobs share: `<job name>/<sweep directory's name>`
    (train/2026-12-05_10-00-00); None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return f"{hc.job.name}/{Path(hc.sweep.dir).name}"


def wandb_logger(
    save_dir: str,
    project: str = "vidrep",
    mode: str | None = None,
    id: str | None = None,
    group: str | None = None,
    **kwargs,
):
    """A Lightning WandbLogger whose mode was settled before wandb.init can prompt or wait, that logs
    into the run directory's own W&B run (`kept_run_id`) and, in a multirun, into the sweep's group
    unless logger.wandb.group names one."""
    from lightning.pytorch.loggers import WandbLogger

    from vidrep.common.workarounds import without_anonymous_setting

    mode = resolve_wandb_mode(mode)
    os.environ["WANDB_MODE"] = mode  # for anything else in this process that calls wandb.init
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs = {k: v for k, v in kwargs.items() if not (k == "resume" and v is None)}  # Lightning's default: allow
    logger = WandbLogger(
        save_dir=save_dir,
        project=project,
        mode=mode,
        id=id if mode == "disabled" else kept_run_id(save_dir, id),
        group=group or sweep_group(),
        **kwargs,
    )
    return without_anonymous_setting(logger)


def finish_wandb() -> None:
    """Close the W&B run of this job, so the next job of a multirun starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def csv_logger(save_dir: str, name: str = "", version: str = "", **kwargs):
    """Lightning's CSVLogger, except that it appends to an existing metrics.csv instead of deleting
    it: train.py's `prepare_run_dir` has already cut the file to the history this run continues."""
    from vidrep.common.workarounds import AppendingCSVLogger

    return AppendingCSVLogger(save_dir=save_dir, name=name, version=version, **kwargs)
