"""What a run records before its first step, so that its curves and its evaluation start from the
initialisation: a validation pass logged at step 0, the initial weights (checkpoints/init.ckpt)
and the held-out videos (held_out.json). A resumed run (global step > 0) does none of them again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np

from vidrep.common.io import write_json

log = logging.getLogger(__name__)

INIT = "init.ckpt"
HELD_OUT = "held_out.json"


class ValidateAtStart(L.Callback):
    """Runs the validation loop once before the first training step, so that metrics.csv and W&B
    hold val/* at step 0: what training changed is then read against the initialisation."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 or getattr(trainer, "fast_dev_run", False):
            return
        loop = trainer.fit_loop.epoch_loop
        # As Lightning's own mid-epoch validation does (training_epoch_loop.on_advance_end): the
        # loop and the logger connector's state are saved around the run (private API, pinned in
        # pyproject's lightning<3; tests/test_start.py fails if it changes).
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter


class SaveInitialisation(L.Callback):
    """Before the first step: `<dirpath>/init.ckpt` through the trainer's checkpoint writer (atomic,
    tensors hashed, as last.ckpt), and `<output_dir>/held_out.json`: the corpus and the names of the
    videos the data module held out for validation, which `evaluate.py protocol=retrieval run=<run
    dir>` evaluates on. Cost: one checkpoint (CaffeNet: 44M float32 parameters, ~180 MB) and one read of the manifest's
    video columns on rank 0."""

    def __init__(self, dirpath: str, output_dir: str) -> None:
        self.dirpath, self.output_dir = Path(dirpath), Path(output_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 or getattr(trainer, "fast_dev_run", False):
            return
        # every rank calls it; rank 0 writes. weights_only said: Lightning logs a line per save when unset
        trainer.save_checkpoint(self.dirpath / INIT, weights_only=False)
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.is_global_zero and getattr(datamodule, "val_set", None) is not None:
            write_json(self.output_dir / HELD_OUT, held_out_record(datamodule))


def held_out_record(datamodule) -> dict:
    """{"corpora": [roots], "video_ids": [...], "videos": [names] (one corpus), "num_pairs"}."""
    from vidrep.data.corpus import read_manifest

    roots = [str(Path(r).resolve()) for r in datamodule.roots]
    ids = np.unique(datamodule.val_set.video_ids())
    record = {"corpora": roots, "video_ids": [int(v) for v in ids], "num_pairs": len(datamodule.val_set)}
    if len(roots) == 1:
        table = read_manifest(roots[0]).select(["video", "video_id"])
        names = np.asarray(table.column("video").to_pylist(), dtype=object)
        wanted = np.isin(table.column("video_id").to_numpy(), ids)
        record["videos"] = sorted(set(names[wanted]))
    return record
