"""Host synchronisations of real training steps on a GPU, by torch.cuda.set_sync_debug_mode.

    python bench/sync_debug.py                       # a GPU: ~1 min (a synthetic corpus, 60 steps at 227)
    python bench/sync_debug.py --device cpu --input-size 67 --steps 12 --log-every 4 --pairs 8 --synthetic-pairs 200

`train()` runs the default training configuration (progress bar, NaN check every log step, loader
workers, the learning-rate monitor, the ranking loss's random phase) on a synthetic corpus
(bench/synthetic_corpus.py). From step `--from-step` on, torch warns at every synchronising CUDA
call; each warning is counted against the step it happened in. The table gives the steps that
Lightning logs (log_every_n_steps, where reads are expected) and the others (where there should be
none: tests/test_exact_runs.py checks the same on CPU by instrumenting the tensor reads). On a CPU
nothing is counted (there is nothing to wait for): the CPU form only checks the script runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from _table import markdown_table
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from synthetic_corpus import PAIRS_PER_VIDEO, make_pairs, write_corpus

ROOT = Path(__file__).resolve().parents[1]
INSTANCES: list[SyncCounter] = []  # what Hydra made (from the module `sync_debug`, not `__main__`)


class SyncCounter(L.Callback):
    """Turns sync debugging on from step `start` and files each warning under its step."""

    def __init__(self, start: int) -> None:
        self.start, self.step = start, -1
        self.per_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self._show = warnings.showwarning
        INSTANCES.append(self)

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if "synchroniz" in text and self.step >= self.start:
            self.per_step[self.step][f"{Path(filename).name}:{lineno}"] += 1
        else:
            self._show(message, category, filename, lineno, file, line)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        if self.step == self.start and torch.cuda.is_available():
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        self.step = -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--pairs", type=int, default=50, help="global batch (pairs)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=20, help="trainer.log_every_n_steps (and the NaN check's)")
    p.add_argument("--from-step", type=int, default=5, help="steps before it are not counted (warm-up)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--synthetic-pairs", type=int, default=4000)
    args = p.parse_args()

    from vidrep.training.run import train

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = Path(tmp) / "corpus"
        write_corpus(corpus, make_pairs(args.synthetic_pairs, PAIRS_PER_VIDEO, os.cpu_count() or 1))
        print(f"synthetic corpus: {args.synthetic_pairs} pairs in {time.perf_counter() - start:.0f} s", flush=True)
        overrides = [
            "data=corpus",
            f"data.root={corpus}",
            f"data.batch_size={args.pairs}",
            f"data.num_workers={args.workers}",
            "data.val_fraction=0.05",
            f"model.input_size={args.input_size}",
            "logger=csv",
            f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
            f"trainer.max_steps={args.steps}",
            "+trainer.limit_val_batches=0",
            f"trainer.log_every_n_steps={args.log_every}",
            f"callbacks.stop_on_nan.every_n_steps={args.log_every}",
            "callbacks.pictures.every_n_epochs=0",
            "model.loss.hard_after_pairs=null",
            "warmup_pairs=0",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(tmp) / "run")
            cfg.paths.root_dir = str(ROOT)
            cfg.paths.cache_dir = str(Path(tmp) / "cache")
            cfg.callbacks.sync_counter = {"_target_": "sync_debug.SyncCounter", "start": args.from_step}
        train(cfg)
    import sync_debug

    counter = sync_debug.INSTANCES[-1]
    steps = range(args.from_step, args.steps)
    logged = [s for s in steps if (s + 1) % args.log_every == 0]
    other = [s for s in steps if (s + 1) % args.log_every]
    where = collections.Counter()
    for s in other:
        where.update(counter.per_step.get(s, {}))
    rows = [
        ["steps counted", len(steps)],
        ["syncs on logged steps (expected)", sum(sum(counter.per_step.get(s, {}).values()) for s in logged)],
        ["logged steps", len(logged)],
        ["syncs on the other steps (target 0)", sum(where.values())],
        ["other steps", len(other)],
        ["where (other steps)", ", ".join(f"{k} x{v}" for k, v in where.most_common(5)) or "-"],
    ]
    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    print(f"\nsync_debug ({device}, {args.pairs} pairs, {args.input_size}px, log every {args.log_every}):")
    print(markdown_table(["measure", "value"], [[k, str(v)] for k, v in rows]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
