"""mine.py's checks before anything starts (vidrep.common.preflight runs them on the composed config)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vidrep.common.preflight import PreflightError, require_path


def check_mine(cfg: DictConfig, swept: set[str]) -> None:
    # verify=true|repair reads the corpus only
    missing = [k for k in (("out",) if cfg.get("verify") else ("videos", "out")) if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise PreflightError(
            f"set {' and '.join(missing)}: `python mine.py videos=<folder or list file> out=<corpus folder>`"
        )
    require_path(
        cfg, "videos", "give a folder of videos (searched recursively) or a text file with one path per line", swept
    )
