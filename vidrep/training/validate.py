"""Settings that would train to nothing, refused before anything starts.

`settings_errors` is a pure function of the composed config. train.py runs it before Hydra starts
(vidrep.training.checks, through vidrep.common.preflight: no run directory yet), and the training task
runs it again first thing (for configs composed in code, and for each job of a multirun, whose
settings are known only when it starts), before loggers, W&B, checkpoints or DDP processes exist.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from vidrep.losses import InfoNCELoss, RankingLoss
from vidrep.losses.base import resolve_target
from vidrep.training.schedule import candidate_pool


class SettingsError(ValueError):
    """One or more settings that cannot train; each line names the key and a valid value."""


def _get(cfg: Mapping, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        try:
            node = node[part]
        except Exception:  # noqa: BLE001 - an unset (???) or unresolvable value: reported as None
            return None
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (NaN and inf are refused on their own, naming the key)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _non_finite(node, prefix: str = ""):
    """(dotted key, value) of every NaN or inf number in nested mappings and sequences."""
    if isinstance(node, Mapping):
        keys = list(node.keys())
    elif isinstance(node, Sequence) and not isinstance(node, str):
        keys = range(len(node))
    else:
        return
    for k in keys:
        key = f"{prefix}.{k}" if prefix else str(k)
        try:
            v = node[k]
        except Exception:  # noqa: BLE001 - an unset (???) or unresolvable value: other checks report it
            continue
        if isinstance(v, float) and not math.isfinite(v):
            yield key, v
        else:
            yield from _non_finite(v, key)


def settings_errors(cfg: Mapping) -> list[str]:
    """What is wrong with a training config (a plain nested mapping), one line per key."""
    errors: list[str] = []
    batch = _get(cfg, "data.batch_size")
    if not _is_int(batch) or batch < 2:
        errors.append(
            f"data.batch_size={batch!r}: a batch needs at least 2 pairs (negatives come from the other pairs' videos); "
            "use data.batch_size=50 (the released code's batch)"
        )
    loss = _loss_class(cfg, errors)
    if loss is not None and issubclass(loss, RankingLoss):
        errors += _ranking_errors(cfg, batch)
    if loss is not None and issubclass(loss, InfoNCELoss):
        t = _get(cfg, "model.loss.temperature")
        if t is not None and (not _is_number(t) or t <= 0):
            errors.append(f"model.loss.temperature={t!r}: must be > 0; use model.loss.temperature=0.1 (SimCLR's)")
    for key, example in (
        ("model.input_size", 227),
        ("model.net.trunk.fc6_dim", 4096),
        ("model.net.trunk.fc7_dim", 1024),
    ):
        v = _get(cfg, key)
        if v is not None and (not _is_int(v) or v < 1):
            errors.append(f"{key}={v!r}: must be a positive integer; use {key}={example}")
    lr = _get(cfg, "model.optimizer.lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        errors.append(f"model.optimizer.lr={lr!r}: must be > 0; use model.optimizer.lr=0.001")
    workers = _get(cfg, "data.num_workers")
    if workers is not None and (not _is_int(workers) or workers < 0):
        errors.append(
            f"data.num_workers={workers!r}: must be >= 0; use data.num_workers=4 (0 loads in the training process)"
        )
    patches = _get(cfg, "data.num_patches")
    if patches is not None and (not _is_int(patches) or patches < 2 * (batch if _is_int(batch) and batch > 0 else 1)):
        errors.append(
            f"data.num_patches={patches!r}: needs at least one batch (2 x data.batch_size patches); "
            "use data.num_patches=null (the whole corpus) or e.g. data.num_patches=1500000"
        )
    val = _get(cfg, "data.val_fraction")
    if val is not None and (not _is_number(val) or not 0.0 <= val < 1.0):
        errors.append(f"data.val_fraction={val!r}: a share in [0, 1); use data.val_fraction=0.05")
    for key in ("trainer.max_epochs", "trainer.max_steps"):
        v = _get(cfg, key)
        if v is not None and (not _is_int(v) or (v == 0 or v < -1)):
            errors.append(f"{key}={v!r}: a positive number, -1 or null (no bound); use {key}=-1")
    every = _get(cfg, "callbacks.periodic_checkpoint.every_n_train_steps")
    if every is not None and (not _is_int(every) or every < 1):
        errors.append(f"callbacks.periodic_checkpoint.every_n_train_steps={every!r}: must be >= 1; use 10000")
    # NaN and inf would pass a `v <= 0` test (a comparison with NaN is false) and train to NaN: every
    # one is refused, by the key's own check above where it has one, else here
    named = {e.split("=", 1)[0] for e in errors}
    errors += [
        f"{key}={v!r}: not a finite number; give it a finite value (or leave it at its default)"
        for key, v in _non_finite({k: cfg[k] for k in ("model", "data", "trainer", "callbacks") if k in cfg})
        if key not in named
    ]
    return errors


def _loss_class(cfg: Mapping, errors: list[str]) -> type | None:
    """The class model.loss instantiates; a config without `_target_` (written before losses were
    objects) holds the ranking loss's settings."""
    target = _get(cfg, "model.loss._target_")
    if target is None:
        return RankingLoss
    try:
        return resolve_target(str(target))
    except ValueError as e:
        errors.append(str(e))
        return None


def _ranking_errors(cfg: Mapping, batch) -> list[str]:
    """The ranking loss's settings (vidrep.losses.RankingLoss)."""
    errors: list[str] = []
    margin = _get(cfg, "model.loss.margin")
    if not _is_number(margin) or margin <= 0:
        errors.append(
            f"model.loss.margin={margin!r}: must be > 0 (with margin <= 0 the loss is 0 from the first step); "
            "use model.loss.margin=0.5 (the paper) or 1.0 (the released code)"
        )
    k = _get(cfg, "model.loss.num_negatives")
    if not _is_int(k) or k < 1:
        errors.append(f"model.loss.num_negatives={k!r}: must be >= 1; use model.loss.num_negatives=4 (the paper)")
    elif _is_int(batch) and batch >= 2:
        # Negatives come from the whole global batch when gathered across ranks; rank-local, from
        # a rank's share: under scaling=paper the global batch of data.batch_size pairs is dealt
        # across the ranks (the smallest share batch // world); under scaling=linear every rank
        # keeps data.batch_size pairs of its own.
        gather = bool(_get(cfg, "model.loss.gather_across_ranks"))
        devices = _get(cfg, "trainer.devices")
        nodes = _get(cfg, "trainer.num_nodes")
        world = (devices if _is_int(devices) and devices > 0 else 1) * (nodes if _is_int(nodes) and nodes > 0 else 1)
        linear = _get(cfg, "scaling") == "linear"
        pool = candidate_pool((batch * world if linear else batch) if gather else batch if linear else batch // world)
        if k > pool:
            errors.append(
                f"model.loss.num_negatives={k}: a batch of {batch} pairs offers each pair at most {pool} negatives "
                f"(2 x (pairs - 1)); use model.loss.num_negatives=4 or at most {pool}, or raise data.batch_size"
            )
    for key, low in (("model.loss.hard_ratio", 0.0), ("model.loss.initial_hard_ratio", 0.0)):
        v = _get(cfg, key)
        if v is not None and (not _is_number(v) or not low <= v <= 1.0):
            errors.append(f"{key}={v!r}: a share, in [0, 1]; use {key}=0.5")
    return errors


def validate_settings(cfg: Mapping) -> None:
    """Raise SettingsError listing every bad setting (of a nested mapping: a DictConfig or a dict)."""
    errors = settings_errors(cfg)
    if errors:
        raise SettingsError("settings that cannot train (nothing was started):\n  " + "\n  ".join(errors))
