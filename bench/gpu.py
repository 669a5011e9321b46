"""Training throughput on a GPU: compute alone, the loader alone, and the whole step with the loader.

    python bench/gpu.py                                   # on a GPU machine; ~3 min on one H200
    # a smoke run:
    python bench/gpu.py --device cpu --input-size 67 --pairs 4 8 --steps 3 --warmup 1 --workers 2 --synthetic-pairs 200

For each batch size (pairs; 50 pairs = 100 patches, the paper's batch; 256 pairs = 512 patches),
all rates timed over the steps after `--warmup` as training runs them (no synchronisation between
steps; see `Timer`):
(a) compute: `lightning.Trainer.fit` of the paper's model (vidrep/conf/model/caffenet.yaml, 227 input,
    `--precision`, default bf16-mixed; `--channels-last`, `--compile` as in the model config) on a
    batch already in memory: patches/s of the whole optimisation step;
(b) the loader alone: `PairDataModule` over `--corpus` (default: `--synthetic-pairs` pairs of
    227x227 JPEGs written to a temporary folder by bench/synthetic_corpus.py; the demo corpus's
    357 pairs are too few for batches of 256) with `--workers` processes and pinned memory, for
    each of `--decoders` (opencv: decoded in the workers; device: the workers read bytes, batches
    are decoded on the GPU by nvJPEG): patches/s;
(c) both together: patches/s, and the share of the wall time the main thread spends getting the
    next batch (fetching it from the workers, transferring it, decoding it with data.decoder=device).
Target (issue "scale and speed"): >= 20,000 patches/s per H200 for (c).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from _table import markdown_table
from hydra import compose, initialize_config_dir
from loader import loader_rate
from synthetic_corpus import PAIRS_PER_VIDEO, make_pairs, write_corpus
from torch.utils.data import DataLoader, Dataset

CONF_DIR = Path(__file__).resolve().parents[1] / "vidrep" / "conf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--pairs", type=int, nargs="+", default=[50, 256])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps dropped (cuDNN autotuning, compilation)")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="more config overrides of the model, e.g. model.net.trunk.lrn=slices model.net.trunk.conv1_in_channels=4",
    )
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument(
        "--synthetic-pairs",
        type=int,
        default=20_000,
        help="pairs of the synthetic corpus made when --corpus is not given",
    )
    p.add_argument(
        "--decoders",
        nargs="*",
        default=["opencv", "device"],
        help="data.decoder values for (b) and (c): opencv (in the workers) | device (nvJPEG, batched); none: (a) only",
    )
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} leaves nothing to time after --warmup {args.warmup}; raise --steps")
    return args


class Timer(L.Callback):
    """Patches/s over the steps after `warmup`, timed as training runs: one synchronisation at the
    start and one at the end, none between steps, so the CPU queues step n+1 while the GPU still
    runs step n. `wait`: main-thread time from the end of one step to the start of the next (the
    next batch fetched, transferred and, with data.decoder=device, decoded)."""

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.steps, self.wait, self.wall, self._start, self._end = 0, 0.0, 0.0, 0.0, None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self._sync()
            self._start = now = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.wait += now - self._end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync()
        self.wall = time.perf_counter() - self._start

    def rate(self, patches_per_step: int) -> float:
        return patches_per_step * self.steps / self.wall


class Repeat(Dataset):
    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batch


def module(args):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=corpus",
                f"model.input_size={args.input_size}",
                f"model.channels_last={args.channels_last}",
                f"model.compile={args.compile}",
                *args.override,
            ],
        )
    return hydra.utils.instantiate(cfg.model)


def fit(args, data) -> Timer:
    """`data`: a DataLoader, or a PairDataModule (its batch hooks, e.g. decoding on the device, run)."""
    timer = Timer(args.device, args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if isinstance(data, DataLoader):
        trainer.fit(module(args), train_dataloaders=data)
    else:
        trainer.fit(module(args), datamodule=data)
    return timer


def datamodule(args, corpus, pairs, decoder):
    from vidrep.data.datamodule import PairDataModule

    dm = PairDataModule(
        str(corpus),
        batch_size=pairs,
        num_workers=args.workers,
        input_size=args.input_size,
        val_fraction=0.0,
        pin_memory=args.device == "cuda",
        persistent_workers=True,
        decoder=decoder,
    )
    dm.setup()
    return dm


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu for a smoke run")
    if args.corpus is not None:
        return measure(args, args.corpus)
    with tempfile.TemporaryDirectory(prefix="vidrep-bench-gpu-") as tmp:
        start = time.perf_counter()
        write_corpus(Path(tmp), make_pairs(args.synthetic_pairs, PAIRS_PER_VIDEO, os.cpu_count() or 1))
        print(f"synthetic corpus: {args.synthetic_pairs} pairs in {time.perf_counter() - start:.0f} s")
        measure(args, Path(tmp))


def measure(args, corpus: Path) -> None:
    torch.backends.cudnn.benchmark = True
    rows = []
    for pairs in args.pairs:
        g = torch.Generator().manual_seed(0)

        def patches():
            return torch.randint(0, 256, (pairs, 3, args.input_size, args.input_size), generator=g, dtype=torch.uint8)

        batch = {"anchor": patches(), "positive": patches(), "video_id": torch.arange(pairs)}
        compute = fit(args, DataLoader(Repeat(batch, args.steps), batch_size=None)).rate(2 * pairs)
        if not args.decoders:
            rows.append([str(2 * pairs), f"{compute:,.0f}", "-", "-", "-", "-"])
        for decoder in args.decoders:
            dm = datamodule(args, corpus, pairs, decoder)
            rate = loader_rate(dm, max(args.steps // 2, 2), args.device)
            both = fit(args, dm)
            rows.append(
                [
                    str(2 * pairs),
                    f"{compute:,.0f}",
                    decoder,
                    f"{rate:,.0f}",
                    f"{both.rate(2 * pairs):,.0f}",
                    f"{100 * both.wait / both.wall:.0f} %",
                ]
            )
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{name}, {args.precision}, {args.input_size}x{args.input_size}, channels_last={args.channels_last}, "
        f"compile={args.compile}, {args.workers} loader workers, overrides {args.override or 'none'}"
    )
    print(
        markdown_table(
            [
                "patches per batch",
                "compute alone (patches/s)",
                "data.decoder",
                "loader alone (patches/s)",
                "step with loader (patches/s)",
                "main thread getting data",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
