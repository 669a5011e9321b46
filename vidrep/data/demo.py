"""The demo corpus: pairs cut from synthetic videos along their ground-truth object tracks.

Until mine.py exists this stands in for mining: for each object, a 227x227 window centred on it in
frame t and on the same object in frame t + 30, exactly what a perfect tracker would give.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from vidrep.data.corpus import PairRecord, write_shard
from vidrep.data.synthetic import SyntheticVideo

DEMO_VERSION = 1


def centred_window(box: np.ndarray, size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """A size x size window centred on a box, shifted to lie inside the frame."""
    x, y, w, h = (int(v) for v in box)
    cx, cy = x + w // 2, y + h // 2
    wx = min(max(cx - size // 2, 0), width - size)
    wy = min(max(cy - size // 2, 0), height - size)
    return wx, wy, size, size


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def demo_video_pairs(seed: int, pairs_per_video: int, track_length: int = 30, patch_size: int = 227, quality: int = 90) -> list[PairRecord]:
    """Pairs of one synthetic video: pair m follows object m mod (objects) over frames 31m..31m+30,
    so no two pairs share a track, as mining guarantees."""
    video = SyntheticVideo(seed, num_frames=pairs_per_video * (track_length + 1))
    name = f"synthetic://demo/{seed:05d}"
    records = []
    for m in range(pairs_per_video):
        t0 = m * (track_length + 1)
        t1 = t0 + track_length
        obj = m % len(video.sizes)
        q = centred_window(video.boxes(t0)[obj], patch_size, video.height, video.width)
        p = centred_window(video.boxes(t1)[obj], patch_size, video.height, video.width)
        f0, f1 = video.frame(t0), video.frame(t1)
        records.append(PairRecord(
            video=name, query_frame=t0, tracked_frame=t1, query_box=q, tracked_box=p,
            num_points=0, num_moving=0,
            query_jpeg=_jpeg(f0[q[1] : q[1] + q[3], q[0] : q[0] + q[2]], quality),
            tracked_jpeg=_jpeg(f1[p[1] : p[1] + p[3], p[0] : p[0] + p[2]], quality),
        ))
    return records


def build_demo_corpus(root: str | Path, num_videos: int = 64, pairs_per_video: int = 6, videos_per_shard: int = 8, seed: int = 0) -> Path:
    """Build the demo corpus at `root` unless it is already there (built once, then cached).

    Built in a temporary folder and renamed into place, so an interrupted build leaves nothing.
    """
    root = Path(root)
    params = {"version": DEMO_VERSION, "num_videos": num_videos, "pairs_per_video": pairs_per_video,
              "videos_per_shard": videos_per_shard, "seed": seed}
    stamp = root / "demo.json"
    if stamp.exists():
        if json.loads(stamp.read_text()) == params:
            return root
        raise FileExistsError(f"{root} holds a demo corpus built with other settings; delete it to rebuild")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a demo corpus; choose another data.root")
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for start in range(0, num_videos, videos_per_shard):
            seeds = range(seed + start, seed + min(start + videos_per_shard, num_videos))
            records = [r for s in seeds for r in demo_video_pairs(s, pairs_per_video)]
            write_shard(tmp, f"demo-{start:05d}", records)
        (tmp / "demo.json").write_text(json.dumps(params, indent=2))
        if root.exists():
            root.rmdir()
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
