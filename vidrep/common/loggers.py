"""Loggers that never prompt or hang: W&B goes offline by itself without credentials or network."""

from __future__ import annotations

import logging
import netrc
import os
import socket
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


def wandb_logger(save_dir: str, project: str = "vidrep", mode: str | None = None, **kwargs):
    """A Lightning WandbLogger whose mode was settled before wandb.init can prompt or wait."""
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    os.environ["WANDB_MODE"] = mode  # for anything else in this process that calls wandb.init
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, mode=mode, **kwargs)


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
