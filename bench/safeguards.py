"""What the safeguards of a run cost at the paper's scale: the whole-checkpoint hash (write, checked
load against a plain `torch.load`), the step's shared generator for the random negatives, and the
duplicate index a mining run reads from its corpus's done marks (N and 2N marks, projected to 100K
videos).

    python bench/safeguards.py [--checkpoint-mib 512] [--marks 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _table import markdown_table

from vidrep.common.checkpoint_files import load_verified, save_hashed
from vidrep.mining.identity import mined_content
from vidrep.training.module import step_seed

PAPER_VIDEOS = 100_000


def seconds(fn, repeat: int = 1) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def checkpoint_rows(mib: int, folder: Path) -> list[list[str]]:
    tensors = mib // 64
    ckpt = {
        "state_dict": {f"w{i}": torch.randn(16 * 2**20) for i in range(tensors)},  # 64 MiB each
        "optimizer_states": [],
        "epoch": 1,
        "global_step": 10,
        "hyper_parameters": {"lr": 0.01},
    }
    path = folder / "x.ckpt"
    plain_save = seconds(lambda: torch.save(ckpt, folder / "plain.ckpt"))
    save = seconds(lambda: save_hashed(ckpt, path))
    plain = seconds(lambda: torch.load(path, weights_only=True))
    checked = seconds(lambda: load_verified(path))
    return [
        [
            f"checkpoint of {tensors * 64} MiB: plain torch.save / hashed atomic save",
            f"{plain_save:.2f} / {save:.2f} s",
        ],
        [f"checkpoint of {tensors * 64} MiB: plain torch.load / checked load", f"{plain:.2f} / {checked:.2f} s"],
    ]


def generator_rows() -> list[list[str]]:
    generator = torch.Generator()
    rows = []
    for batch, candidates in ((50, 100), (256, 512)):

        def draw() -> None:
            generator.manual_seed(step_seed(3, 12_345))
            torch.rand(batch, candidates, generator=generator)

        rows.append(
            [
                f"shared generator, one step ({batch} pairs x {candidates} candidates, CPU)",
                f"{seconds(draw, 2000) * 1e6:.0f} us",
            ]
        )
    return rows


def index_rows(marks: int, folder: Path) -> list[list[str]]:
    rows = []
    for n in (marks, 2 * marks):
        paths = []
        for i in range(n):
            path = folder / f"{n}-{i:07d}.parquet"
            digest = hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest()
            pq.write_table(
                pa.table({"video": [f"{i:07d}.mp4"], "content_size": [10**7 + i], "content_blake2b": [digest]}), path
            )
            paths.append(str(path))
        took = seconds(lambda: mined_content(paths))
        rows.append(
            [
                f"duplicate index from {n} done marks",
                f"{took:.2f} s ({took / n * 1e3:.2f} ms a mark; {took / n * PAPER_VIDEOS:.0f} s at 100K videos)",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-mib", type=int, default=512)
    parser.add_argument("--marks", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = checkpoint_rows(args.checkpoint_mib, Path(tmp)) + generator_rows() + index_rows(args.marks, Path(tmp))
    print(markdown_table(["safeguard", "cost"], rows))


if __name__ == "__main__":
    main()
