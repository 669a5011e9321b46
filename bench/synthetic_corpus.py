"""A corpus of synthetic pairs for benchmarks that need more pairs than the demo corpus has.

    python bench/synthetic_corpus.py /tmp/bench-corpus --pairs 20000 --processes 16

Each video is a `SyntheticVideo` cut along its true object tracks (a perfect miner): 227x227
JPEGs of ~11 KB at quality 90, the consecutive pairs of one video together, a few videos per shard
as mining writes them. Quicker to make than mining, and the same on every machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import cv2
import numpy as np

from vidrep.data.corpus import PairRecord, write_shard
from vidrep.data.synthetic import SyntheticVideo

# As mining writes them: a few videos' consecutive pairs per shard.
PAIRS_PER_VIDEO = 20
PAIRS_PER_SHARD = 500


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def ground_truth_pairs(seed: int, num_pairs: int) -> list[PairRecord]:
    """Pair m follows object m mod (objects) of video `seed` from frame 31m to 31m + 30."""
    video = SyntheticVideo(seed, num_frames=num_pairs * 31)
    records = []
    for m in range(num_pairs):
        boxes = []
        for t in (31 * m, 31 * m + 30):
            x, y, w, h = video.boxes(t)[m % len(video.sizes)]
            boxes.append(
                (
                    min(max(x + w // 2 - 113, 0), video.width - 227),
                    min(max(y + h // 2 - 113, 0), video.height - 227),
                    227,
                    227,
                )
            )
        (qx, qy, _, _), (tx, ty, _, _) = boxes
        records.append(
            PairRecord(
                video=f"synthetic://bench/{seed:05d}",
                query_frame=31 * m,
                tracked_frame=31 * m + 30,
                query_box=boxes[0],
                tracked_box=boxes[1],
                num_points=0,
                num_moving=0,
                query_jpeg=_jpeg(video.frame(31 * m)[qy : qy + 227, qx : qx + 227]),
                tracked_jpeg=_jpeg(video.frame(31 * m + 30)[ty : ty + 227, tx : tx + 227]),
            )
        )
    return records


def _video(job: tuple[int, int]) -> list[PairRecord]:
    return ground_truth_pairs(*job)


def make_pairs(num_pairs: int, pairs_per_video: int, processes: int = 1) -> list[PairRecord]:
    """`num_pairs` pairs, `pairs_per_video` per video (the last video takes the rest); videos are
    rendered in `processes` processes, and the result does not depend on how many."""
    jobs = [
        (seed, min(pairs_per_video, num_pairs - start))
        for seed, start in enumerate(range(0, num_pairs, pairs_per_video))
    ]
    if processes <= 1:
        videos = map(_video, jobs)
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            videos = pool.map(_video, jobs, chunksize=max(1, len(jobs) // (4 * processes)))
    return [r for video in videos for r in video]


def write_corpus(root: Path, records: list[PairRecord], pairs_per_shard: int = PAIRS_PER_SHARD) -> None:
    for start in range(0, len(records), pairs_per_shard):
        write_shard(root, f"bench-{start // pairs_per_shard:05d}", records[start : start + pairs_per_shard])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="corpus folder to write (must not hold a corpus yet)")
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--pairs-per-video", type=int, default=PAIRS_PER_VIDEO)
    p.add_argument("--pairs-per-shard", type=int, default=PAIRS_PER_SHARD)
    p.add_argument("--processes", type=int, default=mp.cpu_count())
    args = p.parse_args()
    if min(args.pairs, args.pairs_per_video, args.pairs_per_shard, args.processes) < 1:
        p.error("--pairs, --pairs-per-video, --pairs-per-shard and --processes must be at least 1")
    if (args.root / "shards").exists():
        p.error(f"{args.root} already holds a corpus; pick an empty folder")
    start = time.perf_counter()
    records = make_pairs(args.pairs, args.pairs_per_video, args.processes)
    write_corpus(args.root, records, args.pairs_per_shard)
    print(
        f"{len(records)} pairs of {-(-len(records) // args.pairs_per_video)} videos written to {args.root} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
