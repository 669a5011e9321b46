"""The checkpoint file format, below every layer that writes or reads one (training, evaluation,
the Caffe converter): every tensor and plain value hashed at save and checked at load, loads that
never run code (`torch.load(weights_only=True)`), no file written with non-finite weights.
vidrep/training/checkpoints.py puts it behind Lightning's CheckpointIO; docs/training.md, "What
survives what", says what each check answers.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from vidrep.common.io import write_torch

log = logging.getLogger(__name__)

FORMAT_KEY = "vidrep_checkpoint_format"
HASH_KEY = "vidrep_checkpoint_hashes"
# Format 1 (tensor hashes only, under this key): its non-tensor state was never covered.
TENSOR_HASH_KEY = "vidrep_tensor_hashes"
FORMAT = 2


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, or whose content does not match its stored hashes."""


class UnsafeCheckpointError(DamagedCheckpointError):
    """A file whose pickle needs more than tensors and plain values to load (it could run code)."""


def _leaves(obj: Any, prefix: str = ""):
    """(path, leaf) for every tensor and plain value in nested dicts/lists/tuples, in a fixed order.
    Non-string keys keep their type in the path (an optimiser state's 0 is not "0")."""
    if isinstance(obj, dict):
        if not obj:
            yield prefix, obj
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
        if not prefix:
            items = [kv for kv in items if kv[0] != HASH_KEY]
        for k, v in items:
            name = k if isinstance(k, str) else repr(k)
            yield from _leaves(v, f"{prefix}.{name}" if prefix else name)
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield prefix, obj
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _digest(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.blake2b(data, digest_size=16)
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
    else:
        # repr is exact for the plain values weights_only admits (floats included); a set's order
        # is not stable across processes, so its items are sorted first
        text = repr(sorted(map(repr, value))) if isinstance(value, (set, frozenset)) else repr(value)
        h = hashlib.blake2b(f"{type(value).__name__}:{text}".encode(), digest_size=16)
    return h.hexdigest()


def content_hashes(checkpoint: dict) -> dict[str, str]:
    """{path of every tensor and plain value in the checkpoint: blake2b of it (bytes, dtype and
    shape for a tensor; type and repr for a plain value)}."""
    return {path: _digest(v) for path, v in _leaves(checkpoint)}


def _tensor_hashes_v1(checkpoint: dict) -> dict[str, str]:
    """Format 1's hashes: tensors only (to check checkpoints written before format 2)."""
    return {
        path: _digest(v)
        for path, v in _leaves({k: v for k, v in checkpoint.items() if k != TENSOR_HASH_KEY})
        if isinstance(v, torch.Tensor)
    }


def hash_mismatches(checkpoint: dict) -> list[str] | None:
    """Paths of the values that differ from the hashes stored at save, added or gone included
    (None: a checkpoint from before hashing, without any vidrep key). A format-2 checkpoint
    without its hashes, or with hashes of another shape, is all mismatch."""
    if not isinstance(checkpoint, dict):
        return None
    if FORMAT_KEY in checkpoint or HASH_KEY in checkpoint:
        stored = checkpoint.get(HASH_KEY)
        if not isinstance(stored, dict) or checkpoint.get(FORMAT_KEY) != FORMAT:
            return [f"{HASH_KEY} (missing or not format {FORMAT})"]
        now = content_hashes(checkpoint)
    elif TENSOR_HASH_KEY in checkpoint:
        stored, now = checkpoint[TENSOR_HASH_KEY], _tensor_hashes_v1(checkpoint)
        if not isinstance(stored, dict):
            return [TENSOR_HASH_KEY]
    else:
        strays = [k for k in checkpoint if isinstance(k, str) and k.lower().startswith("vidrep")]
        return [f"{strays[0]} (a vidrep key without the hashes)"] if strays else None
    return sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))


def damaged_message(path: Path, what: str, alternative: str = "") -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    hint = f" (others there: {', '.join(others[:6])})" if others else ""
    return (
        f"checkpoint {path} is damaged{' ' + alternative if alternative else ''} ({what}); it cannot be used. Resume "
        "from another checkpoint of "
        f"{path.parent}{hint} with ckpt_path=<that file>, or start afresh without ckpt_path"
    )


# How torch names what a weights_only load refused: "unsupported GLOBAL posix.system whose module
# ...", "Unsupported global: GLOBAL foo.Bar was not an allowed global". Without it, the file is
# not a pickle of plain values at all (garbage, truncation): damage, not code.
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _unsafe_message(path: Path, error: Exception) -> str:
    named = _GLOBAL.search(str(error))
    return (
        f"checkpoint {path} needs more than tensors and plain values to load (its pickle names "
        f"{named.group(1)}); vidrep loads checkpoints with "
        "torch.load(weights_only=True) and never runs what a file names. Use a checkpoint written by train.py "
        "(outputs/train/<run>/checkpoints/last.ckpt); a file from elsewhere must be re-saved as plain values "
        "and tensors by a program you trust"
    )


def load_verified(path: str | Path, map_location=None, weights_only: bool | None = True) -> dict:
    """torch.load(weights_only=True), then every stored hash checked; DamagedCheckpointError names
    the file. `weights_only` is accepted for Lightning's signature and ignored: nothing is ever
    unpickled in full."""
    del weights_only
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a directory; pass its file, e.g. ckpt_path={path}/checkpoints/last.ckpt "
            f"(or resume={path} to continue that run in its own directory)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(damaged_message(path, "0 bytes"))
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _GLOBAL.search(str(e)):
            raise UnsafeCheckpointError(_unsafe_message(path, e)) from None
        said = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Unsupported", "Trying"))]
        what = f"not a pickle of tensors and plain values: {(said or [str(e)])[0][:200]}"
        raise DamagedCheckpointError(damaged_message(path, what, "or not a checkpoint")) from None
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file raises anything from unpickling
        what = f"unreadable: {type(e).__name__}: {str(e)[:200]}"
        raise DamagedCheckpointError(damaged_message(path, what, "or not a checkpoint")) from None
    if not isinstance(ckpt, dict):
        raise DamagedCheckpointError(damaged_message(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict"))
    bad = hash_mismatches(ckpt)
    if bad:
        raise DamagedCheckpointError(
            damaged_message(path, f"{len(bad)} values differ from their hashes at save, e.g. {', '.join(bad[:3])}")
        )
    if bad is None:
        log.warning(
            "checkpoint %s was written before vidrep hashed its checkpoints: its content cannot be checked "
            "for damage; loading it as it is",
            path,
        )
    elif TENSOR_HASH_KEY in ckpt:
        log.warning(
            "checkpoint %s was written before vidrep hashed whole checkpoints: its tensors match their hashes, "
            "its other state (optimiser settings, schedule, loop counters) cannot be checked",
            path,
        )
    return ckpt


def non_finite_tensors(checkpoint: dict) -> list[str]:
    """Paths of the weights and optimiser-state tensors holding NaN or inf (callbacks keep inf on
    purpose, e.g. ModelCheckpoint's kth_value, and are not looked at)."""
    learned = {k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}
    return [
        p
        for p, v in _leaves(learned)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def save_hashed(checkpoint: dict, path: str | Path) -> bool:
    """Write `checkpoint` to `path` atomically with the hashes of everything it holds; False (and
    nothing written, an error logged) when its weights or optimiser state are not finite."""
    bad = non_finite_tensors(checkpoint)
    if bad:
        log.error(
            "not writing %s: %d tensors are not finite (e.g. %s); the checkpoints already written keep the "
            "last finite state",
            path,
            len(bad),
            ", ".join(bad[:3]),
        )
        return False
    checkpoint.pop(TENSOR_HASH_KEY, None)
    checkpoint[FORMAT_KEY] = FORMAT
    checkpoint[HASH_KEY] = content_hashes(checkpoint)
    write_torch(
        path,
        checkpoint,
        advice="the previous file there is intact. Free space on that disk and resume from the last checkpoint",
    )
    return True
