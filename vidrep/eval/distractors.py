"""Distractors for `retrieval.candidates=hard`: windows of a pair's tracked frame, the size of its
tracked window, overlapping it by IoU <= `max_iou`, cut and JPEG-encoded exactly as the miner cuts
and encodes patches (same decoder, frame size and JPEG quality, from the corpus's mining.json).
They ask a network to tell the tracked object from the rest of the same frame: colour alone does
not, as the frame shares its palette.

They are re-cut from the source videos by a command, once per corpus, and stored beside it:

    python -m vidrep.eval.distractors <corpus> --videos <the videos= given to mine.py> [--only <videos file>]

    <corpus>/distractors/n<count>-iou<max_iou>/<video key>.parquet   one row per distractor:
        pair_id, box (x, y, w, h in the resized frame), jpeg, crc32
    <corpus>/distractors/n<count>-iou<max_iou>/failures.json         {video key: {video, reason}} of videos skipped

Positions are drawn from a generator seeded by the pair's id, so a rerun, or another machine, cuts
the same pixels; every network compared ranks the same bytes. Each video's file is written
atomically when all its pairs are cut, so an interrupted run loses at most the videos in progress
and a rerun skips the videos done. Before cutting, each video is checked against the corpus: the
first pair's tracked window re-cut must give the very JPEG the miner stored (its CRC32), else the
file is not the video that was mined and it is recorded as a failure, not cut.

Cost at the paper's scale: 8 distractors of ~10 KB for each of the 5 % held-out pairs of 4M (200K
pairs) = 1.6M JPEGs, ~16 GB; decoding the held-out 5K videos (up to their last tracked frame) is
~2 % of the mining time. `--only` limits the cut to the held-out videos; all 8M patches would take
~320 GB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vidrep.common.io import atomic_write, write_json
from vidrep.data.corpus import CorpusError, read_manifest, video_id_for
from vidrep.mining.decode import VideoError, read_pictures
from vidrep.mining.inputs import list_videos
from vidrep.mining.miner import MinerConfig

log = logging.getLogger(__name__)

GRID_STEP = 8  # px between candidate window positions
SCHEMA = pa.schema(
    [("pair_id", pa.string()), ("box", pa.list_(pa.int32(), 4)), ("jpeg", pa.binary()), ("crc32", pa.int64())]
)


def command(root: str | Path) -> str:
    return f"python -m vidrep.eval.distractors {root} --videos <the videos= given to mine.py>"


def folder(root: str | Path, count: int, max_iou: float) -> Path:
    return Path(root) / "distractors" / f"n{count}-iou{max_iou:g}"


def box_iou(box: Sequence[int], boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x, y, w, h) box with each row of `boxes` [K, 4] (pixel areas, no +1)."""
    x, y, w, h = (float(v) for v in box)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(x + w, b[:, 0] + b[:, 2]) - np.maximum(x, b[:, 0]), 0, None)
    ih = np.clip(np.minimum(y + h, b[:, 1] + b[:, 3]) - np.maximum(y, b[:, 1]), 0, None)
    inter = iw * ih
    return inter / (w * h + b[:, 2] * b[:, 3] - inter)


def distractor_boxes(
    pair_id: str, tracked_box: Sequence[int], height: int, width: int, count: int, max_iou: float
) -> np.ndarray:
    """int32 [K, 4], K <= count: windows of the tracked window's size inside a height x width frame,
    each of IoU <= max_iou with it, on a GRID_STEP grid (plus the last position), drawn without
    replacement by a generator seeded by `pair_id` (fewer than `count` only where fewer fit)."""
    _, _, w, h = (int(v) for v in tracked_box)
    xs = np.unique(np.r_[np.arange(0, width - w + 1, GRID_STEP), width - w])
    ys = np.unique(np.r_[np.arange(0, height - h + 1, GRID_STEP), height - h])
    gx, gy = np.meshgrid(xs[xs >= 0], ys[ys >= 0])
    grid = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, w), np.full(gx.size, h)], axis=1)
    allowed = grid[box_iou(tracked_box, grid) <= max_iou]
    seed = int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little")
    pick = np.random.default_rng(seed).choice(len(allowed), size=min(count, len(allowed)), replace=False)
    return allowed[np.sort(pick)].astype(np.int32)


def encode(frame: np.ndarray, box: Sequence[int], quality: int) -> bytes:
    """The miner's cut and encoding (vidrep/mining/miner.py: _crop, _jpeg) of a BGR frame's window."""
    x, y, w, h = (int(v) for v in box)
    ok, buf = cv2.imencode(".jpg", frame[y : y + h, x : x + w], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


@dataclass(frozen=True)
class VideoPairs:
    """A video's pairs as the manifest records them."""

    pair_id: list[str]
    tracked_frame: np.ndarray
    tracked_box: np.ndarray  # [N, 4]
    tracked_crc32: np.ndarray  # [N], -1 where the corpus predates checksums


def cut_video(path: Path, pairs: VideoPairs, config: MinerConfig, count: int, max_iou: float) -> pa.Table:
    """The distractors of one video's pairs. Raises VideoError when the video cannot be decoded or
    is not the one mined (its first pair's tracked window does not re-cut to the stored JPEG)."""
    boxes = [
        distractor_boxes(pid, box, config.height, config.width, count, max_iou)
        for pid, box in zip(pairs.pair_id, pairs.tracked_box)
    ]
    by_frame: dict[int, list[int]] = {}
    for i, t in enumerate(pairs.tracked_frame):
        by_frame.setdefault(int(t), []).append(i)
    check = int(np.argmin(pairs.tracked_frame))
    rows: dict[str, list] = {"pair_id": [], "box": [], "jpeg": [], "crc32": []}
    last = max(by_frame)
    for t, picture in enumerate(read_pictures(path, config.height, config.width, config.decoder)):
        if t in by_frame:
            frame = picture.bgr()
            for i in by_frame[t]:
                if i == check and pairs.tracked_crc32[i] >= 0:
                    again = zlib.crc32(encode(frame, pairs.tracked_box[i], config.jpeg_quality))
                    if again != pairs.tracked_crc32[i]:
                        raise VideoError(
                            "not_the_mined_video",
                            f"{path}: frame {t} re-cut does not give the tracked patch the miner stored; give "
                            "--videos the videos (and decoder) the corpus was mined from",
                        )
                for box in boxes[i]:
                    jpeg = encode(frame, box, config.jpeg_quality)
                    rows["pair_id"].append(pairs.pair_id[i])
                    rows["box"].append([int(v) for v in box])
                    rows["jpeg"].append(jpeg)
                    rows["crc32"].append(zlib.crc32(jpeg))
        if t >= last:
            return pa.table(rows, schema=SCHEMA)
    raise VideoError("too_short", f"{path} ends before frame {last}, a tracked frame of the corpus")


def _video_pairs(table: pa.Table) -> dict[str, VideoPairs]:
    names = table.column("video").to_pylist()
    ids = table.column("pair_id").to_pylist()
    frames = table.column("tracked_frame").to_numpy()
    boxes = np.asarray(table.column("tracked_box").to_pylist(), np.int64).reshape(-1, 4)
    crc = table.column("tracked_crc32").fill_null(-1).to_numpy()
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return {name: VideoPairs([ids[i] for i in r], frames[r], boxes[r], crc[r]) for name, r in sorted(rows.items())}


def write_distractors(
    root: str | Path,
    videos: str | Path,
    count: int = 8,
    max_iou: float = 0.3,
    only: Sequence[str] | None = None,
) -> dict:
    """Cut the distractors of every pair of the corpus `root` (or of the videos named in `only`)
    from the source `videos` (a folder or list file, as mine.py's videos=); videos already done are
    skipped. Returns {"done": n, "skipped": n, "failed": {video key: {"video", "reason"}}}."""
    root = Path(root)
    settings_file = root / "mining.json"
    if not settings_file.is_file():
        raise CorpusError(f"{root} has no mining.json: distractors are cut with the settings the corpus was mined with")
    config = MinerConfig.from_corpus_settings(json.loads(settings_file.read_text()))
    pairs = _video_pairs(read_manifest(root))
    if only is not None:
        unknown = sorted(set(only) - set(pairs))
        if unknown:
            raise CorpusError(f"{len(unknown)} video(s) to cut are not in corpus {root}, e.g. {unknown[:3]}")
        pairs = {k: v for k, v in pairs.items() if k in set(only)}
    sources = {v.name: v.path for v in list_videos(videos)}
    out = folder(root, count, max_iou)
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[str, dict] = {}
    done = skipped = 0
    for name, video_pairs in pairs.items():
        target = out / f"{video_id_for(name):016x}.parquet"
        if target.exists():
            skipped += 1
            continue
        if name not in sources:
            failed[target.stem] = {"video": name, "reason": f"not among the videos of {videos}"}
            continue
        try:
            table = cut_video(Path(sources[name]), video_pairs, config, count, max_iou)
        except VideoError as e:
            failed[target.stem] = {"video": name, "reason": str(e)}
            continue
        atomic_write(target, lambda f, table=table: pq.write_table(table, f))
        done += 1
    write_json(out / "failures.json", failed)
    for f in failed.values():
        log.warning("distractors: %s skipped: %s", f["video"], f["reason"])
    return {"done": done, "skipped": skipped, "failed": failed}


@dataclass(frozen=True)
class Distractors:
    """The distractors of a list of pairs: `owner` [M] is each one's position in that list (sorted)."""

    owner: np.ndarray
    jpeg: list[bytes]


def read_distractors(
    root: str | Path, video_id: Sequence[int], pair_id: Sequence[str], count: int, max_iou: float
) -> Distractors:
    """The distractors of the pairs (`video_id[i]`, `pair_id[i]`); a CorpusError naming the command
    that cuts them when a video has none (not cut yet, or recorded in failures.json)."""
    root = Path(root)
    where = folder(root, count, max_iou)
    position = {p: i for i, p in enumerate(pair_id)}
    keys = sorted({f"{int(v):016x}" for v in video_id})
    missing = [k for k in keys if not (where / f"{k}.parquet").is_file()]
    if missing:
        failures_file = where / "failures.json"
        failures = json.loads(failures_file.read_text()) if failures_file.is_file() else {}
        failed = {f["video"]: f["reason"] for k, f in failures.items() if k in missing}
        why = f"; {len(failed)} of them failed, e.g. {next(iter(failed.items()))}" if failed else ""
        raise CorpusError(
            f"corpus {root} has no distractors (count {count}, IoU <= {max_iou:g}) for {len(missing)} of the "
            f"{len(keys)} videos evaluated{why}. retrieval.candidates=hard needs them: run `{command(root)}` "
            "(or evaluate with retrieval.candidates=other_videos)"
        )
    owner, jpeg = [], []
    for key in keys:
        path = where / f"{key}.parquet"
        table = pq.read_table(path)
        for pid, blob, crc in zip(
            table.column("pair_id").to_pylist(), table.column("jpeg").to_pylist(), table.column("crc32").to_numpy()
        ):
            if pid not in position:
                continue
            if zlib.crc32(blob) != crc:
                raise CorpusError(
                    f"{path}: a distractor of pair {pid} fails its CRC32 checksum; delete the file and rerun "
                    f"`{command(root)}`"
                )
            owner.append(position[pid])
            jpeg.append(blob)
    order = np.argsort(np.asarray(owner, np.int64), kind="stable")
    return Distractors(np.asarray(owner, np.int64)[order], [jpeg[i] for i in order])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Cut the distractors of retrieval.candidates=hard from a corpus's videos.")
    p.add_argument("corpus", type=Path, help="a mine.py corpus (out=)")
    p.add_argument("--videos", required=True, help="the folder or list file given to mine.py as videos=")
    p.add_argument("--count", type=int, default=8, help="distractors per pair (retrieval.distractors)")
    p.add_argument("--max-iou", type=float, default=0.3, help="retrieval.max_distractor_iou")
    p.add_argument("--only", type=Path, help="a text file, one video per line: cut only these (e.g. held-out videos)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    only = None
    if args.only is not None:
        only = [ln.strip() for ln in args.only.read_text().splitlines() if ln.strip()]
    summary = write_distractors(args.corpus, args.videos, args.count, args.max_iou, only)
    print(
        f"distractors in {folder(args.corpus, args.count, args.max_iou)}: {summary['done']} videos cut, "
        f"{summary['skipped']} already there, {len(summary['failed'])} failed"
    )
    if summary["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
