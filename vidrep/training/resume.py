"""resume=<run dir>: continue a run in its own directory with its own settings; a run that has
finished says so instead (its directory keeps finished.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from vidrep.common.io import write_json

log = logging.getLogger(__name__)

FINISHED = "finished.json"
# The metrics a finished run names (all of them are in finished.json), as the run's own last line does.
SUMMARY = ("train/loss_epoch", "train/triplet_acc_epoch", "val/loss", "val/triplet_acc")

# Overrides of the earlier run that do not carry over: where and from what it started.
_NOT_CARRIED = ("resume", "ckpt_path", "hydra.run.dir", "hydra.sweep.")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def with_run_overrides(argv: list[str]) -> list[str]:
    """argv with the earlier run's own overrides (<run>/.hydra/overrides.yaml) put before the
    command line's when it says resume=<run>, so that the run continues with the data, model and
    schedule it started with; a key given on the command line wins. Idempotent (DDP ranks started
    by Lightning get the expanded argv and expand it again to the same)."""
    resume = [a for a in argv if a.startswith("resume=")]
    if not resume:
        return argv
    saved_file = Path(resume[-1].split("=", 1)[1]).expanduser() / ".hydra" / "overrides.yaml"
    if not saved_file.exists():
        return argv
    given = {_key(a) for a in argv if not a.startswith("-")}
    saved = [str(o) for o in OmegaConf.load(saved_file)]
    carried = [o for o in saved if not _key(o).startswith(_NOT_CARRIED) and _key(o) not in given]
    return carried + argv


def mark_finished(run_dir: str | Path, global_step: int, metrics: dict[str, float]) -> None:
    """Record in <run_dir>/finished.json that the run trained to its last step, with its final metrics."""
    write_json(Path(run_dir) / FINISHED, {"global_step": int(global_step), "final_metrics": metrics})


def finished_run(run_dir: str | Path, max_steps: int) -> dict[str, float] | None:
    """The final metrics of the run in `run_dir` when it has finished the `max_steps` it would now
    train to, logged with how to train on; None when there is something left to train."""
    path = Path(run_dir) / FINISHED
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if int(record["global_step"]) < max_steps:
        return None
    metrics = {k: float(v) for k, v in record.get("final_metrics", {}).items()}
    log.info(
        "run %s finished at step %s: nothing to resume (W&B and the checkpoints left as they are). Final metrics: %s. "
        "To train on, resume with a larger trainer.max_steps (or trainer.max_epochs)",
        run_dir,
        f"{int(record['global_step']):,}",
        ", ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY if k in metrics) or "none recorded",
    )
    return metrics
