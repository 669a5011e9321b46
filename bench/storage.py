"""Why the corpus is tar shards + a parquet manifest: measured side by side with LitData's chunks.

    source /work/venv/bin/activate && cd /work/main && python bench/storage.py
    python bench/storage.py --pairs 1000 --rounds 1        # a quick look

The same synthetic pairs (`synthetic_corpus.py`: 227x227 JPEGs of ~11 KB at quality 90, the
consecutive pairs of one video together, a few videos per shard as mining writes them) go
(a) through vidrep's `write_shard` and (b) through `litdata.optimize` with one chunk per shard.
Then, in interleaved rounds so that a neighbour's load hits both formats alike, each is read in a
shuffled full pass with the training path's JPEG decoding: ours via `PairDataModule` (map-style
`PairDataset` + `RandomSampler`), LitData via `StreamingDataset(shuffle=True)` +
`StreamingDataLoader`. Reads hit the page cache (both corpora were just written), so they measure
CPU cost, not disk. The distinct videos per batch matter because the ranking loss draws its
negatives from the other videos of the batch. LitData's caches go to a temporary folder that is
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from math import comb
from pathlib import Path

# Before litdata is imported: its import-time version check would otherwise query PyPI.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import litdata  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _table import markdown_table  # noqa: E402
from synthetic_corpus import PAIRS_PER_SHARD, PAIRS_PER_VIDEO, make_pairs, write_corpus  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from vidrep.data.corpus import PairIndex, PairRecord, read_manifest, select_pairs  # noqa: E402
from vidrep.data.datamodule import PairDataModule, PairDataset  # noqa: E402
from vidrep.data.transforms import PatchTransform  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4000, help="pairs in the corpus (2 JPEGs each)")
    p.add_argument("--pairs-per-video", type=int, default=PAIRS_PER_VIDEO)
    p.add_argument("--pairs-per-shard", type=int, default=PAIRS_PER_SHARD, help="also LitData's chunk_size")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to measure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; median (min-max) is reported")
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--subset", type=int, default=1000, help="pairs in the subset-by-video check (<= --pairs)")
    args = p.parse_args()
    if args.subset > args.pairs:
        p.error(f"--subset {args.subset} exceeds --pairs {args.pairs}; lower --subset or raise --pairs")
    return args


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --- writing -------------------------------------------------------------------------------------


def litdata_sample(r: PairRecord) -> dict:
    # Module level so that LitData's writer process can unpickle it.
    return {"pair_id": r.pair_id, "video_id": r.video_id, "query": r.query_jpeg, "tracked": r.tracked_jpeg}


def write_litdata(out: Path, records: list[PairRecord], pairs_per_shard: int) -> None:
    # One writer, data kept in order and chunks the size of our shards: the same layout as ours.
    # fork, not the default spawn, so the time is the writing and not a fresh interpreter's imports.
    litdata.optimize(
        fn=litdata_sample,
        inputs=records,
        output_dir=str(out),
        chunk_size=pairs_per_shard,
        num_workers=1,
        reorder_files=False,
        keep_data_ordered=True,
        start_method="fork",
        verbose=False,
    )


# --- reading -------------------------------------------------------------------------------------


class LitDataDecode:
    """The same decoding as `PairDataset.__getitem__`, applied to a LitData item."""

    def __init__(self, input_size: int) -> None:
        self.transform = PatchTransform(input_size, flip_p=0.5)

    def __call__(self, item: dict) -> dict[str, torch.Tensor]:
        return {
            "anchor": self.transform(item["query"]),
            "positive": self.transform(item["tracked"]),
            "video_id": torch.tensor(item["video_id"], dtype=torch.int64),
        }


def full_pass(loader) -> tuple[float, list[int]]:
    """Seconds for one pass (worker start-up included, as each epoch pays it) and videos per batch."""
    start = time.perf_counter()
    videos = [batch["video_id"].unique().numel() for batch in loader]
    return time.perf_counter() - start, videos


def ours_loader(root: Path, args: argparse.Namespace, workers: int):
    dm = PairDataModule(
        str(root),
        val_fraction=0.0,
        batch_size=args.batch_size,
        num_workers=workers,
        input_size=args.input_size,
        pin_memory=False,
        persistent_workers=False,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def litdata_loader(out: Path, cache: Path, args: argparse.Namespace, workers: int, seed: int):
    ds = litdata.StreamingDataset(
        str(out), cache_dir=str(cache), shuffle=True, seed=seed, transform=LitDataDecode(args.input_size)
    )
    return litdata.StreamingDataLoader(ds, batch_size=args.batch_size, num_workers=workers, drop_last=True)


def read_raw(root: Path, seed: int) -> float:
    """Pairs/s reading both JPEGs' bytes in shuffled order, no decoding: the I/O floor of ours."""
    index = PairIndex(root)
    order = np.random.default_rng(seed).permutation(len(index))
    seconds, _ = timed(lambda: [index.read_pair(int(i)) for i in order])
    return len(order) / seconds


# --- properties ----------------------------------------------------------------------------------


def expected_videos(num_videos: int, pairs_per_video: int, batch: int) -> float:
    """Mean distinct videos in a batch drawn uniformly without replacement: the ideal shuffle."""
    total = num_videos * pairs_per_video
    return num_videos * (1 - comb(total - pairs_per_video, batch) / comb(total, batch))


def ddp_shares_ours(root: Path, world: int) -> list[set[str]]:
    index = PairIndex(root)
    ids = read_manifest(root).column("pair_id").to_numpy(zero_copy_only=False)
    dataset = PairDataset(index, np.arange(len(index)), PatchTransform())
    return [
        {ids[i] for i in DistributedSampler(dataset, world, rank, shuffle=True, drop_last=True)}
        for rank in range(world)
    ]


def ddp_shares_litdata(out: Path, cache: Path, world: int) -> list[set[str]]:
    """Each rank's items as LitData hands them out; the rank comes from the env vars it reads."""
    shares = []
    for rank in range(world):
        os.environ.update(WORLD_SIZE=str(world), GLOBAL_RANK=str(rank))
        try:
            ds = litdata.StreamingDataset(str(out), cache_dir=str(cache), shuffle=True, drop_last=True)
            shares.append({item["pair_id"] for item in ds})
        finally:
            del os.environ["WORLD_SIZE"], os.environ["GLOBAL_RANK"]
    return shares


def describe_shares(shares: list[set[str]], total: int) -> str:
    sizes = "/".join(str(len(s)) for s in shares)
    overlap = sum(len(a & b) for i, a in enumerate(shares) for b in shares[i + 1 :])
    return f"measured, 2 ranks: {sizes} of {total} pairs, {overlap} shared"


def subset_ours(root: Path, num_pairs: int) -> str:
    table = read_manifest(root)
    video_ids = table.column("video_id").to_numpy()
    sel = select_pairs(video_ids, table.column("query_frame").to_numpy(), num_pairs, 0.05, seed=0)
    rows = np.concatenate([sel.train, sel.val])
    chosen, counts = np.unique(video_ids[rows], return_counts=True)
    corpus_videos, corpus_counts = np.unique(video_ids, return_counts=True)
    whole = int((counts == corpus_counts[np.searchsorted(corpus_videos, chosen)]).sum())
    return (
        f"`select_pairs`: {len(rows)} pairs = {len(chosen)} videos ({whole} whole), val split by video, "
        "nested across sizes, from the manifest alone"
    )


# --- the run -------------------------------------------------------------------------------------


def spread(values: list[float], digits: int) -> str:
    """Median and range over rounds: the range shows how much a neighbour's load moved the numbers."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    # One intra-op thread, as torch gives each DataLoader worker: on a shared 2-core box, 2 threads
    # stall on each other in the small per-patch ops and make 0-worker passes 5-30x slower at random.
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, litdata {litdata.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs"
    )
    gen_s, records = timed(lambda: make_pairs(args.pairs, args.pairs_per_video))
    payload = sum(len(r.query_jpeg) + len(r.tracked_jpeg) for r in records)
    num_videos = len({r.video for r in records})
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (1 min)")
    print(
        f"{len(records)} pairs of {num_videos} videos, mean JPEG {payload / (2 * len(records)) / 1e3:.1f} KB, "
        f"generated in {gen_s:.1f} s; {args.rounds} interleaved rounds"
    )

    with tempfile.TemporaryDirectory(prefix="vidrep-bench-storage-") as tmp:
        tmp = Path(tmp)
        # LitData's optimize keeps working copies under these; keep them inside tmp.
        os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(tmp / "optimizer-cache")
        os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(tmp / "optimizer-data")
        cache = tmp / "stream-cache"
        times: dict[str, list[float]] = {}
        videos: dict[str, list[int]] = {}
        raw: list[float] = []

        def record(key: str, seconds: float) -> None:
            times.setdefault(key, []).append(seconds)

        for rnd in range(args.rounds):
            ours, lit = tmp / f"ours-{rnd}", tmp / f"litdata-{rnd}"
            record("write ours", timed(lambda: write_corpus(ours, records, args.pairs_per_shard))[0])
            record("write litdata", timed(lambda: write_litdata(lit, records, args.pairs_per_shard))[0])
            raw.append(read_raw(ours, rnd))
            for workers in args.workers:
                variants = [
                    ("ours", lambda: ours_loader(ours, args, workers)),
                    ("litdata", lambda: litdata_loader(lit, cache, args, workers, rnd)),
                ]
                # Alternate which goes first, so that neither always follows the other's cache effects.
                for fmt, make in variants[:: 1 if rnd % 2 == 0 else -1]:
                    seconds, per_batch = full_pass(make())
                    key = f"{fmt} w{workers}"
                    record(key, len(per_batch) * args.batch_size / seconds)
                    videos.setdefault(key, []).extend(per_batch)

        ours, lit = tmp / "ours-0", tmp / "litdata-0"
        ours_bytes, lit_bytes = disk_bytes(ours), disk_bytes(lit)
        shares_ours = describe_shares(ddp_shares_ours(ours, 2), len(records))
        shares_lit = describe_shares(ddp_shares_litdata(lit, cache, 2), len(records))
        subset = subset_ours(ours, args.subset)
        stray = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []

    ideal = expected_videos(num_videos, args.pairs_per_video, args.batch_size)
    rows = [
        (
            "write time (s)",
            spread(times["write ours"], 2),
            spread(times["write litdata"], 2),
            "ours fsyncs tar + manifest per shard; LitData: 1 forked writer, chunk_size = shard size",
        ),
        (
            "bytes on disk (MB)",
            f"{ours_bytes / 1e6:.2f}",
            f"{lit_bytes / 1e6:.2f}",
            f"JPEG payload {payload / 1e6:.2f} MB: overhead ours {100 * (ours_bytes / payload - 1):.1f} %, "
            f"LitData {100 * (lit_bytes / payload - 1):.1f} %",
        ),
    ]
    for workers in args.workers:
        rows.append(
            (
                f"read + decode, shuffled pass, {workers} workers (pairs/s)",
                spread(times[f"ours w{workers}"], 0),
                spread(times[f"litdata w{workers}"], 0),
                "page-cache reads; decode = `PatchTransform` (JPEG decode, flip); 1 torch thread per process",
            )
        )
    for workers in args.workers:
        rows.append(
            (
                f"distinct videos per batch of {args.batch_size}, {workers} workers",
                f"{np.mean(videos[f'ours w{workers}']):.1f}",
                f"{np.mean(videos[f'litdata w{workers}']):.1f}",
                f"uniform shuffle over {num_videos} videos of {args.pairs_per_video} pairs gives {ideal:.1f}",
            )
        )
    rows += [
        (
            "raw bytes, shuffled, no decode (pairs/s)",
            spread(raw, 0),
            "-",
            "`PairIndex.read_pair`: two `pread`s at manifest offsets",
        ),
        (
            "shards from independent jobs, no coordination",
            "yes: one tar + manifest per job, each renamed into place; readers glob manifests",
            'no: one `index.json` per dataset; `mode="append"` rewrites it (one writer at a time), or '
            "`merge_datasets` afterwards",
            "",
        ),
        (
            f"deterministic subset of {args.subset} pairs by video",
            subset,
            "`subsample=f`: a fraction of items over (seeded) chunks, no notion of video; a by-video "
            "subset or split means re-optimising",
            "",
        ),
        (
            "equal disjoint shares per DDP rank",
            f"`DistributedSampler(drop_last=True)`: {shares_ours}",
            f"chunks assigned to ranks, `drop_last` under DDP: {shares_lit}",
            "",
        ),
    ]
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min); LitData stream-cache files written: "
        f"{len(stray)} (a local input_dir is read in place)\n"
    )
    print(markdown_table(("measure", "ours (tar + parquet)", "LitData", "note"), rows))


if __name__ == "__main__":
    main()
