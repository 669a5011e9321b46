"""Time the retrieval protocol's ranks (vidrep.eval.retrieval.retrieval_ranks) with hard candidates
(8 distractors a pair, same-video pairs >= 90 frames apart) on the CPU and, where there is one, a
GPU; project the time to the paper's held-out set (200K pairs) as time x (200K / N)^2.

    python bench/retrieval_ranks.py [--pairs 2000 4000] [--dims 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _table import markdown_table

from vidrep.eval.retrieval import retrieval_ranks

PAPER_PAIRS = 200_000


def case(n: int, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    unit = lambda k: (x := rng.normal(size=(k, dims)).astype(np.float32)) / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    video = np.repeat(np.arange(n // 40 + 1), 40)[:n]  # 40 pairs a video, as a long mined video gives
    frame = rng.integers(0, 3000, size=n)
    owner = np.repeat(np.arange(n), 8)
    return unit(n), unit(n), video, frame, unit(8 * n), owner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[2000, 4000])
    p.add_argument("--dims", type=int, default=1024)
    args = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for n in args.pairs:
        q, t, video, frame, d, owner = case(n, args.dims)
        for device in devices:
            retrieval_ranks(q[:64], t[:64], video[:64], frame[:64], 90, d[:512], owner[:512], device=device)  # warm-up
            start = time.perf_counter()
            retrieval_ranks(q, t, video, frame, 90, d, owner, device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            projected = seconds * (PAPER_PAIRS / n) ** 2
            rows.append([str(n), str(args.dims), device, f"{seconds:.2f}", f"{projected / 60:.0f}"])
    print(markdown_table(["pairs", "dims", "device", "seconds", "projected to 200K pairs (min)"], rows))


if __name__ == "__main__":
    main()
