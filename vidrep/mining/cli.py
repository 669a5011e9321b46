"""The task behind mine.py: resolve the config, mine, print and store the summary."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vidrep import usable_cores
from vidrep.mining.run import RunSummary, mine_corpus

log = logging.getLogger(__name__)


def resolve_workers(workers: int | None) -> int:
    """An explicit count, else one per core, shared among the shards that the joblib launcher
    runs at the same time (each of them is a mining run with its own worker pool)."""
    if workers is not None:
        return int(workers)
    cores = usable_cores()
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        launcher = hc.launcher.get("_target_", "") if hc.launcher else ""
        if str(hc.mode) == "RunMode.MULTIRUN" and "joblib" in launcher.lower():
            n_jobs = hc.launcher.get("n_jobs") or -1
            parallel = cores if n_jobs < 0 else min(n_jobs, cores)
            return max(1, cores // parallel)
    return cores


def verify(cfg: DictConfig) -> int:
    """verify=true: the damage table, exit status 1 when anything is damaged; verify=repair: and
    remove the damaged videos' files, so the next mining run re-mines them."""
    from vidrep.mining.verify import damage_table, repair_corpus, verify_corpus

    mode = cfg.verify
    if mode not in (True, "true", "repair"):
        raise ValueError(
            f"verify={mode!r}: use verify=true (report) or verify=repair (report and remove the damaged videos' files)"
        )
    if OmegaConf.is_missing(cfg, "out"):
        raise ValueError("verify needs the corpus: `python mine.py out=/data/corpus verify=true`")
    damaged = verify_corpus(cfg.out, workers=resolve_workers(cfg.workers))
    print(damage_table(cfg.out, damaged))
    if mode == "repair" and damaged:
        removed = repair_corpus(cfg.out, damaged)
        print(
            f"repaired: removed {len(removed)} files of {len(damaged)} videos and rewrote summary.json; now run "
            f"`python mine.py videos=<the same videos> out={cfg.out}` to mine exactly those videos again"
        )
        return 1 if any(d.video == "mining.json" for d in damaged) else 0  # not repairable here: see its line
    return 1 if damaged else 0


def mine(cfg: DictConfig, draw: Callable[[DictConfig], None] | None = None) -> RunSummary:
    """Mine (or verify) as the config says; with viz=true, `draw(cfg)` (mine.py passes
    vidrep.viz.mining.draw_run_pictures) draws this run's videos."""
    if cfg.get("verify"):
        status = verify(cfg)
        if status:
            raise SystemExit(status)
        return RunSummary()
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(
            f"set {' and '.join(sorted(missing))} on the command line, e.g. "
            "`python mine.py videos=/data/videos out=/data/corpus`"
        )
    miner = hydra.utils.instantiate(cfg.miner)
    summary = mine_corpus(
        cfg.videos,
        cfg.out,
        miner,
        shard=cfg.shard,
        num_shards=cfg.num_shards,
        workers=resolve_workers(cfg.workers),
        retry_failures=cfg.retry_failures,
        extensions=tuple(cfg.extensions),
        progress=cfg.progress,
    )
    print(summary.table())
    print(f"corpus: {Path(cfg.out).resolve()} (summary.json, failures/ for skipped videos)")
    if cfg.get("viz") and draw is not None:
        draw(cfg)
    if HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir) / "summary.json"
        out.write_text(json.dumps({"run": dict(summary.run), "corpus": summary.corpus}, indent=2))
    return summary
