"""Atomic writes: a file appears whole under its name or not at all, so an interrupted run (kill,
disk full, pre-emption) leaves nothing half-written for the rerun to trip over."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

RERUN_ADVICE = (
    "nothing partial was left there. Free space (or fix permissions) and rerun the same command: finished work is kept"
)


def atomic_write(path: Path, write, advice: str = RERUN_ADVICE) -> None:
    """`write(file)` into a temporary beside `path`, synced, then renamed over it; on an OSError
    (disk full, read-only) the error names the path and `advice`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # Disk full or read-only: nothing half-written is visible (the temporary is removed below).
        raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); {advice}") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    """Atomically (temporary name, then rename), creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=2).encode()))


def write_array(path: str | Path, array: np.ndarray) -> None:
    """An .npy file, atomically, creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: np.save(f, array))


def write_bytes(path: str | Path, data: bytes) -> None:
    """A file, atomically, creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: f.write(data))


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz file of `arrays`, atomically, creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def write_torch(path: str | Path, obj, advice: str = RERUN_ADVICE) -> None:
    """torch.save(obj), atomically, creating the folder if needed."""
    import torch

    def save(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (a full disk) into a RuntimeError about stream
            # positions; it is the same failed write as any other here, with the same advice
            free = shutil.disk_usage(Path(path).parent).free
            raise OSError(
                errno.ENOSPC if free < 64 << 20 else errno.EIO,
                f"torch.save failed ({str(e).splitlines()[0][:200]}; {free >> 20} MiB free on that disk)",
            ) from e

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), save, advice)
