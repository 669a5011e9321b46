"""Checks that run before Hydra starts a job: before a run directory, a W&B run or a process
exists. The entry points compose their config once here (Hydra's compose API, the same overrides)
and stop with one line naming the key when a key is unknown or a path does not exist, instead of
failing after the run has started, at the end of a long traceback.

A multirun is checked with the first value of each swept key (the keys are what can be wrong in
every job); the paths of swept keys are left to each job.

What fails after the job has started is reported the same way (`one_line_errors`): one line, no
traceback (HYDRA_FULL_ERROR=1 shows it), and a run directory that holds nothing of the job's own is
removed, so that a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class PreflightError(ValueError):
    """A setting that would fail the run: the message names the key and what to do."""


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config (nested dicts walked, values not resolved)."""
    keys = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        node = cfg._get_node(key)
        if (
            isinstance(node, DictConfig)
            and not node._is_missing()
            and not node._is_none()
            and not node._is_interpolation()
        ):
            keys.extend(config_keys(node, full + "."))
    return keys


def did_you_mean(key: str, keys: Iterable[str]) -> list[str]:
    """The valid keys nearest to a mistyped one: its siblings whose name is within 0.1 of the best
    match, else the nearest dotted keys anywhere."""
    keys = list(keys)
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    scored = sorted(((difflib.SequenceMatcher(None, name, s).ratio(), s) for s in siblings), reverse=True)
    if scored and scored[0][0] >= 0.6:
        return [siblings[s] for r, s in scored if r >= scored[0][0] - 0.1][:3]
    if parent in keys:
        return []
    return difflib.get_close_matches(key, keys, n=2, cutoff=0.75)


_UNKNOWN = (
    re.compile(r"Could not override '([^']+)'"),
    re.compile(r"Could not delete from config\. '?([^'\s]+)'? does not exist"),
    re.compile(r"Key '([^']+)' is not in struct"),
)


def _unknown_key(message: str) -> str | None:
    for pattern in _UNKNOWN:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


def first_values(overrides: list[str]) -> tuple[list[str], set[str]]:
    """The overrides with each sweep (a,b / range(...) / glob) replaced by its first value, and
    the keys that were swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out, swept = [], set()
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            out.append(f"{parsed.get_key_element()}={first}")
            swept.add(parsed.key_or_group)
        else:
            out.append(text)
    return out, swept


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The job's config as Hydra would compose it (an unknown key raises PreflightError)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name, overrides=overrides)
        except HydraException as e:
            key = _unknown_key(str(e))
            if key is None:
                text = str(e).split("Config search path")[0]
                raise PreflightError(" ".join(line.strip() for line in text.splitlines() if line.strip())) from None
            bare = key.lstrip("+~")
            base = hydra_compose(
                config_name,
                overrides=[
                    o for o in overrides if not o.lstrip("+~").startswith(bare + "=") and o.lstrip("+~") != bare
                ],
            )
            near = did_you_mean(bare, config_keys(base))
            hint = f"did you mean {' or '.join(near)}?" if near else "no key of that name exists here"
            raise PreflightError(
                f"unknown key {bare}: {hint} (`python {config_name}.py --cfg job` lists every key)"
            ) from None


def is_missing(cfg: DictConfig, key: str) -> bool:
    """A dotted key whose value is ??? (OmegaConf.is_missing takes direct children only)."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and node._get_node(name) is not None and OmegaConf.is_missing(node, name)


def require_path(cfg: DictConfig, key: str, what: str, swept: set[str]) -> None:
    """The path at `key` (if set) exists; `what` says how to make it."""
    if key in swept or is_missing(cfg, key):
        return
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    for v in values:
        if v not in (None, "") and not Path(str(v)).expanduser().exists():
            raise PreflightError(f"{key}={v} does not exist: {what}")


def _hydra_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(argv)[0]


def preflight(config_name: str, checks: Callable[[DictConfig, set[str]], None], argv: list[str] | None = None) -> None:
    """Compose the job's config from the command line and run `checks(cfg, swept_keys)`; on a
    PreflightError print it as one line and exit with status 2. Hydra's own flags (--help,
    --cfg, --info, shell completion) pass straight through."""
    args = _hydra_args(sys.argv[1:] if argv is None else argv)
    if (
        args.help
        or args.hydra_help
        or args.cfg
        or args.info
        or args.shell_completion
        or getattr(args, "version", False)
    ):
        return
    try:
        overrides, swept = first_values(list(args.overrides))
        checks(compose(config_name, overrides), swept)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a check that failed on its own: still one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


# Errors whose message is written for the user (the input it concerns and what to do); anything
# else is a fault of vidrep's and is named by its type.
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError)


class JobFailed(CompactHydraException):
    """A multirun job's error: Hydra prints a CompactHydraException as its message alone."""


def error_line(e: BaseException) -> str:
    """`e` as one line: its message with the line breaks folded, led by its type when unexpected."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, EXPECTED_ERRORS):
        return text
    return f"{type(e).__name__}: {text} (HYDRA_FULL_ERROR=1 shows where; please report it)"


def remove_if_only_hydras(run_dir: Path, job_name: str) -> bool:
    """Remove `run_dir` when it holds nothing but what Hydra wrote at the job's start (.hydra/ and
    the job's log): a job that failed before writing anything leaves no directory behind."""
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= {".hydra", f"{job_name}.log"}:
        return False
    logging.shutdown()  # the job's log file is open
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Around a Hydra task's body: an exception becomes `error: <message>` on stderr and exit
    status 1, instead of Hydra's traceback; with HYDRA_FULL_ERROR=1 it propagates unchanged."""
    try:
        yield
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        line = error_line(e)
        # the job's log file keeps the traceback; the console gets the line
        record = logging.LogRecord("vidrep", logging.ERROR, __file__, 0, "error: %s", (line,), sys.exc_info())
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            remove_if_only_hydras(Path(hc.runtime.output_dir), hc.job.name)
        if multirun:  # the other jobs still run; Hydra prints this job's overrides and this line, exit status 1
            raise JobFailed(f"error: {line}") from None
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)
