"""resume=<run dir>: continue a run in its own directory with its own settings."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

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
