"""evaluate.py's checks before anything starts (vidrep.common.preflight runs them on the composed config)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vidrep.common.preflight import PreflightError, is_missing, require_path
from vidrep.eval.retrieval import BASELINES
from vidrep.models.caffe import spec_files

# What ckpt= takes besides a checkpoint file: evaluate.py's networks that need no file.
CKPT_FORMS = (
    "ckpt=outputs/train/<run>/checkpoints/last.ckpt (a train.py checkpoint), ckpt=random (the untrained "
    "network of model=<caffenet|resnet18|...>, CaffeNet by default), ckpt=imagenet:<torchvision AlexNet "
    "weights file>, ckpt=caffe:<net.caffemodel>[+mean:<mean.binaryproto>][+gray] (Caffe files), or "
    "ckpt='[a,b,c]' (an ensemble); protocol=retrieval also takes ckpt=colour_histogram or "
    "ckpt=pixels"
)
KEYWORDS = ("random", *BASELINES)


def checkpoint_files(ckpt) -> list[str]:
    """The file paths among ckpt's values (keywords and imagenet:<file> resolved to their files)."""
    values = list(ckpt) if OmegaConf.is_list(ckpt) or isinstance(ckpt, list | tuple) else [ckpt]
    files = [str(v).removeprefix("imagenet:") for v in values if str(v) not in KEYWORDS]
    return [f for v in files for f in (spec_files(v) if v.startswith("caffe:") else [v])]


def _check_checkpoints(ckpt) -> None:
    """Every train.py checkpoint among ckpt's values read and checked before anything starts:
    damaged, altered since it was written, or naming code in its pickle, it is refused here (the
    load is weights_only=True, so nothing in the file runs)."""
    from vidrep.training.checkpoints import DamagedCheckpointError, load_verified

    values = list(ckpt) if OmegaConf.is_list(ckpt) or isinstance(ckpt, list | tuple) else [ckpt]
    for v in map(str, values):
        if v in KEYWORDS or v.startswith(("imagenet:", "caffe:")):  # not train.py checkpoints
            continue
        try:
            load_verified(v)
        except DamagedCheckpointError as e:
            raise PreflightError(f"ckpt: {e}") from None


def check_evaluate(cfg: DictConfig, swept: set[str]) -> None:
    if OmegaConf.is_missing(cfg, "ckpt") and not cfg.get("run"):
        raise PreflightError(f"ckpt is not set: {CKPT_FORMS}")
    if "ckpt" not in swept and not OmegaConf.is_missing(cfg, "ckpt"):
        for path in checkpoint_files(cfg.ckpt):
            if not path or not Path(path).expanduser().exists():
                raise PreflightError(f"ckpt: {path!r} does not exist; ckpt takes {CKPT_FORMS}")
            if Path(path).expanduser().is_dir():
                raise PreflightError(
                    f"ckpt: {path!r} is a directory, not a checkpoint file; pass one of its files, e.g. "
                    f"ckpt={path}/checkpoints/last.ckpt for a train.py run directory (ckpt takes {CKPT_FORMS})"
                )
        _check_checkpoints(cfg.ckpt)
    given = [] if OmegaConf.is_missing(cfg, "ckpt") else cfg.ckpt
    random = "random" in [str(v) for v in (list(given) if OmegaConf.is_list(given) else [given])]
    if random and OmegaConf.select(cfg, "model.net.trunk.weights") is not None:  # a key only some trunks have
        require_path(
            cfg,
            "model.net.trunk.weights",
            "ckpt=random builds model.net.trunk: give a local weights file "
            "(nothing is downloaded), or model.net.trunk.weights=null",
            swept,
        )
    if cfg.protocol.get("name") == "retrieval":
        if is_missing(cfg, "retrieval.corpus") and not cfg.get("run"):
            raise PreflightError(
                "retrieval.corpus is not set: retrieval.corpus=<a mine.py corpus>, or run=<train.py run dir> (its "
                "held-out videos)"
            )
        require_path(cfg, "run", "give a train.py run directory (holding checkpoints/ and held_out.json)", swept)
        require_path(
            cfg, "retrieval.corpus", "give a corpus made by `python mine.py videos=<videos> out=<corpus>`", swept
        )
        require_path(
            cfg, "retrieval.videos", "give a text file with one video per line, or leave it unset for all", swept
        )
        return
    if is_missing(cfg, "voc.root"):
        raise PreflightError(
            "voc.root is not set: voc.root=<the VOCdevkit folder holding VOC2007/ or VOC2012/>, or a "
            "synthetic VOC-format set written by `python -m vidrep.data.synthetic_voc <folder>`"
        )
    require_path(cfg, "voc.root", "give the VOCdevkit folder (holding VOC2007/ or VOC2012/)", swept)
