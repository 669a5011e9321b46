"""The input pipeline: JPEG decode + resize + flip per core for each decoder, and the loader's rate.

    source /work/venv/bin/activate && cd /work/main && python bench/loader.py
    python bench/loader.py --corpus /data/corpus --input-size 227 --workers 0 2 8

(a) Decoders, one process, one thread, on the same corpus patches (227x227 JPEGs), to a uint8
[3, S, S] RGB tensor as `PatchTransform` returns it: OpenCV (`cv2.imdecode`), PIL,
and `torchvision.io.decode_jpeg` on the CPU (and on the GPU, batched as `data.decoder=device`
does it, when one exists).
(b) The DataLoader of `PairDataModule` (shuffled reads from the shards + the default transform) with
each `--workers` count: patches/s, against what training consumes at the issue's target of
20,000 patches/s per GPU (how many loader cores one GPU needs).
Without --corpus the demo corpus is used (built into the cache on first use).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _table import markdown_table

from vidrep.data.corpus import PairIndex
from vidrep.data.datamodule import PairDataModule
from vidrep.data.transforms import PatchTransform, decode_batch

TARGET = 20_000  # patches/s one H200 should train on (issue: scale and speed)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--patches", type=int, default=600, help="patches decoded per decoder in (a)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds in (a); the median is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=12, help="batches of 50 pairs read per worker count in (b)")
    return p.parse_args()


def pil_decode(jpeg: bytes, size: int) -> torch.Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    arr = np.asarray(img)
    if torch.rand(()) < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def rate(fn, jpegs: list[bytes]) -> float:
    start = time.perf_counter()
    for j in jpegs:
        fn(j)
    return len(jpegs) / (time.perf_counter() - start)


def interleaved_rates(decoders: dict, jpegs: list[bytes], rounds: int) -> dict[str, float]:
    """Median over rounds that alternate the decoders, so a neighbour's load hits all alike."""
    for fn in decoders.values():
        rate(fn, jpegs[:20])
    runs = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, fn in decoders.items():
            runs[name].append(rate(fn, jpegs))
    return {name: float(np.median(r)) for name, r in runs.items()}


def demo_corpus() -> Path:
    """The demo corpus (227x227 JPEGs), built into the cache on first use."""
    from vidrep.demo.corpus import build_demo_corpus

    return build_demo_corpus(Path(os.environ.get("VIDREP_CACHE_DIR", Path.home() / ".cache/vidrep")) / "demo-corpus-v3")


def loader_rate(dm: PairDataModule, batches: int, device: str = "cpu") -> float:
    """Patches/s of the training loader, its workers started, restarting epochs as needed; with
    data.decoder=device, including the batched decode on `device`."""

    def fetch(loader):
        batch = next(loader)
        if dm.decoder == "device":
            batch = dm.decode(batch, device, dm.flip_p)
            if device == "cuda":
                torch.cuda.synchronize()
        return batch

    loader = iter(dm.train_dataloader())
    fetch(loader)
    start, patches = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = fetch(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = fetch(loader)
        patches += 2 * len(batch["anchor"])
    return patches / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    root = args.corpus or demo_corpus()
    index = PairIndex(root)
    jpegs = [index.read_pair(i % len(index))[i % 2] for i in range(args.patches)]
    s = args.input_size
    decoders = {
        "OpenCV `cv2.imdecode` (data.decoder=opencv)": PatchTransform(s, 0.5, decoder="opencv"),
        "PIL": lambda j: pil_decode(j, s),
        "torchvision.io.decode_jpeg, CPU (data.decoder=torchvision)": PatchTransform(s, 0.5, decoder="torchvision"),
    }
    rows = []
    reference = PatchTransform(s, 0.0, decoder="opencv")(jpegs[0]).float()
    rates = interleaved_rates(decoders, jpegs, args.rounds)
    for name, fn in decoders.items():
        r = rates[name]
        check = fn(jpegs[0]).float()
        same = min((check - reference).abs().mean().item(), (check.flip(-1) - reference).abs().mean().item())
        rows.append([name, f"{r:,.0f}", f"{TARGET / r:.1f}", f"{same:.2f}"])
    if torch.cuda.is_available():
        # The training path of data.decoder=device: one batched nvJPEG call per 100 patches + resize.
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        gpu = lambda chunk: decode_batch(chunk, s, "cuda")  # noqa: E731
        gpu(data[:8])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(data), 100):
            gpu(data[i : i + 100])
        torch.cuda.synchronize()
        r = len(data) / (time.perf_counter() - start)
        same = (gpu(data[:1])[0].cpu().float() - reference).abs().mean().item()
        rows.append(["nvJPEG, GPU, batches of 100 (data.decoder=device)", f"{r:,.0f}", "-", f"{same:.2f}"])
    print(
        f"(a) decode + resize to {s} + flip, one core ({len(jpegs)} patches of {root}, median of {args.rounds} "
        "interleaved rounds)"
    )
    print(
        markdown_table(
            ["decoder", "patches/s per core", f"cores for {TARGET:,}/s", "mean |diff| vs OpenCV (0-255)"], rows
        )
    )

    rows = []
    for workers in args.workers:
        dm = PairDataModule(
            str(root),
            batch_size=50,
            num_workers=workers,
            input_size=s,
            val_fraction=0.0,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        dm.setup()
        r = loader_rate(dm, args.batches)
        rows.append([str(workers), f"{r:,.0f}", f"{r / max(workers, 1):,.0f}", f"{TARGET / (r / max(workers, 1)):.0f}"])
    print(f"\n(b) PairDataModule loader, batches of 50 pairs, shuffled over {len(index)} pairs")
    print(markdown_table(["workers", "patches/s", "per worker", f"workers for {TARGET:,}/s"], rows))


if __name__ == "__main__":
    main()
