"""vidrep: visual representations learned from tracked patches in unlabelled video."""

import importlib
import os
from importlib.metadata import PackageNotFoundError, version

from omegaconf import ListConfig, OmegaConf

try:  # one version source: pyproject.toml's, as installed
    __version__ = version("vidrep")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and SLURM set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ${vidrep.workers:8} in the configs: 8 loader workers, or fewer on a machine with fewer cores
# (PyTorch warns, and the workers only contend, when there are more). Registered on import, as
# every entry point imports vidrep before it composes a config.
OmegaConf.register_new_resolver(
    "vidrep.workers", lambda at_most=8: max(1, min(int(at_most), usable_cores())), replace=True
)
# ckpt_path's default: resume=<run dir> resumes from that run's last checkpoint.
OmegaConf.register_new_resolver(
    "vidrep.last_checkpoint", lambda run: None if run is None else f"{run}/checkpoints/last.ckpt", replace=True
)
# hydra.run.dir's default: the run directory given by resume=<run dir>, else a new one.
OmegaConf.register_new_resolver(
    "vidrep.or", lambda value, default: default if value in (None, "") else value, replace=True
)


def _trunk_pixel_mean(target: str):
    """The `pixel_mean` the trunk class `target` declares, found by name: the root package sits
    below every layer and imports none of them (tests/test_layers.py)."""
    module_name, _, name = target.rpartition(".")
    try:
        mean = getattr(importlib.import_module(module_name), name).pixel_mean
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"model.pixel_mean: the trunk {target!r} declares no pixel_mean ({e}); set model.pixel_mean=[r,g,b]"
        ) from None
    # a ListConfig, not a list: OmegaConf.resolve() writes resolved values back into the config
    return ListConfig([float(v) for v in mean])


# model.pixel_mean's default: the mean the configured trunk class expects (vidrep.models.Trunk.pixel_mean),
# stated once, in the trunk; `model.pixel_mean=[r,g,b]` still overrides it.
OmegaConf.register_new_resolver("vidrep.pixel_mean", _trunk_pixel_mean, replace=True)
