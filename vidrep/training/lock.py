"""One run per run directory: `hold_run_dir` takes an exclusive lock on <run dir>/.lock for as long
as a run trains there, so a second train.py (a resume started twice, a copy-pasted command) stops
at once, naming the holder, instead of interleaving two histories in metrics.csv and racing on
last.ckpt.

The lock is flock(2) on an open file: the kernel drops it when the holder's process ends in any
way (kill -9, a crash, the OOM killer), so a dead run never leaves its directory stuck. Only rank 0
takes it, before DDP starts; the ranks Lightning starts are its children and never ask. (flock
holds across hosts on local disks and on NFSv4; on a file system without it, flock fails and the
run says so.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live run holds the run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose pid and host could not be read"


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold `run_dir` for the duration of the block; RunDirLockedError when a live run holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(
                f"run directory {run_dir} is in use by another run ({_holder(path)}); one run trains in a run "
                f"directory at a time. Wait for it to end (or stop it), or start a new run elsewhere (without "
                f"resume=, or with ckpt_path={run_dir}/checkpoints/last.ckpt to branch from it)"
            ) from None
        except OSError as e:
            raise RunDirLockedError(
                f"cannot lock run directory {run_dir} ({e.strerror}): its file system offers no flock; "
                "put the run directory (hydra.run.dir) on a local disk"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)
