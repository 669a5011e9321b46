"""The demo corpus: synthetic videos (textured objects over panning, cluttered backgrounds), written
as real video files and mined with mine.py's pipeline, as a user's videos would be.

Both the videos (`<root>-videos/`) and the corpus are built once, each in a temporary folder renamed
into place, so an interrupted build leaves nothing half-made and the next run starts over.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
from pathlib import Path

from vidrep.data.synthetic import SyntheticVideo

log = logging.getLogger(__name__)
# 3: mined with USAC homographies and the motion screen (miner defaults of 2026-12); 4: `world` options
DEMO_VERSION = 4


def _write_video(args: tuple[Path, int, int, dict]) -> None:
    path, seed, num_frames, world = args
    SyntheticVideo(seed, num_frames=num_frames, **world).write(path)


def _build_into(final: Path, build) -> Path:
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_demo_videos(
    folder: str | Path,
    num_videos: int,
    num_frames: int,
    seed: int = 0,
    workers: int | None = None,
    world: dict | None = None,
) -> Path:
    """`num_videos` synthetic MJPG .avi files named <seed>.avi (seeds seed, seed + 1, ...);
    `world`: SyntheticVideo's options (num_objects, palette, spin, breathe, lighting, ...)."""
    folder = Path(folder)
    world = dict(world or {})

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        jobs = [(tmp / f"{seed + i:05d}.avi", seed + i, num_frames, world) for i in range(num_videos)]
        n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        if n == 1:
            for job in jobs:
                _write_video(job)
        else:
            with mp.get_context("spawn").Pool(n) as pool:
                pool.map(_write_video, jobs, chunksize=1)

    return _build_into(folder, build)


def build_demo_corpus(
    root: str | Path,
    num_videos: int = 64,
    num_frames: int = 220,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    world: dict | None = None,
) -> Path:
    """Build the demo corpus at `root` unless it is already there (videos of seeds seed ...
    seed + num_videos - 1, `world` their SyntheticVideo options). With the miner's defaults (a query
    every 5th frame, 30-frame tracks), a video of n frames gives up to n // 31 pairs."""
    from vidrep.mining.miner import MinerConfig
    from vidrep.mining.run import mine_corpus

    root = Path(root)
    world = dict(world or {})
    params = {"version": DEMO_VERSION, "num_videos": num_videos, "num_frames": num_frames, "seed": seed, "world": world}
    stamp = root / "demo.json"
    if stamp.exists():
        if json.loads(stamp.read_text()) == params:
            return root
        raise FileExistsError(f"{root} holds a demo corpus built with other settings; delete it to rebuild")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a demo corpus; choose another data.root")
    videos = root.with_name(f"{root.name}-videos")
    if not (videos / "demo.json").exists():
        log.info("writing %d synthetic demo videos to %s", num_videos, videos)
        shutil.rmtree(videos, ignore_errors=True)
        write_demo_videos(videos, num_videos, num_frames, seed, workers, world)
        (videos / "demo.json").write_text(json.dumps(params, indent=2))
    elif json.loads((videos / "demo.json").read_text()) != params:
        raise FileExistsError(f"{videos} holds demo videos made with other settings; delete it to rebuild")

    def build(tmp: Path) -> None:
        summary = mine_corpus(videos, tmp, MinerConfig(), workers=workers, progress=progress)
        if summary.run["videos_failed"]:
            raise RuntimeError(
                f"mining the demo videos in {videos} failed for {summary.run['videos_failed']} of them: see "
                f"{tmp}/failures"
            )
        (tmp / "demo.json").write_text(json.dumps(params, indent=2))

    if root.exists():
        root.rmdir()
    return _build_into(root, build)
