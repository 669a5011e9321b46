"""Mining speed: decoding alone vs the whole pipeline, by stage, 1 vs 2 workers, and the detectors.

    source /work/venv/bin/activate && cd /work/main && python bench/mine.py
    python bench/mine.py --videos /data/some/videos --synthetic 0     # your own footage
    python bench/mine.py --detectors                                  # + the SURF-substitute table
    # mining vs decoding, the film + opencv-doc:
    python bench/mine.py --ratio-only --film fetch --synthetic 0 --hd 0 --rounds 3
    python bench/mine.py --trackers --film fetch                      # the miner.tracker options: cost and yield

--ratio-only measures just mining against decoding alone, side by side: each round decodes every
video (PyAV, every frame scaled to 600x448 BGR: `read_frames`; the miner itself scales only the
frames a stage uses), decodes it without scaling or conversion (the codec's own cost, for
reference), and mines it with the legacy settings
(homography_method=ransac, motion_sample=0) and with today's defaults, in one process; the medians
over --rounds are reported in CPU time (what a core spends; on a machine shared with other jobs
wall time charges their preemptions to whichever stage is running) and in wall time, with the
per-stage table in CPU ms per frame. --film adds Big Buck Bunny (10 min, 1280x720 H.264, from PyPI's
moviepy==2.2.1 sdist; `fetch` downloads it into the cache) as --film-segments evenly spaced clips of
--segment-seconds (remuxed, not re-encoded), so that a round stays short.

Videos: the opencv-doc samples (vtest.avi, Megamind.avi, Megamind_bugy.avi, cached by the tests in
~/.cache/vidrep/opencv-sample-videos) plus --synthetic demo-like synthetic videos of 220 frames
(MJPG, 600x448). Those decode unusually cheaply (low resolution, simple codecs), so the
decode-vs-pipeline ratio is also measured on --hd synthetic videos encoded as 1280x720 H.264, the
kind of file a web video corpus holds.
Everything runs in this one process, one thread per library, so "per core" figures are per
process; the 2-worker run uses `mine_corpus` exactly as mine.py does.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from _table import markdown_table  # noqa: E402

from vidrep.data.synthetic import SyntheticVideo  # noqa: E402
from vidrep.demo.corpus import write_demo_videos  # noqa: E402
from vidrep.mining.decode import read_frames, read_pictures  # noqa: E402
from vidrep.mining.inputs import list_videos  # noqa: E402
from vidrep.mining.miner import MinerConfig, VideoMiner  # noqa: E402
from vidrep.mining.motion import point_motion  # noqa: E402
from vidrep.mining.points import make_detector  # noqa: E402
from vidrep.mining.run import mine_corpus  # noqa: E402

SAMPLES = Path(os.environ.get("VIDREP_CACHE_DIR", Path.home() / ".cache/vidrep")) / "opencv-sample-videos"
STAGES = ("decode", "cuts", "detect", "motion", "window", "track", "encode")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, default=SAMPLES if SAMPLES.is_dir() else None, help="folder of real videos")
    p.add_argument("--synthetic", type=int, default=12, help="synthetic videos to add (220 frames each)")
    p.add_argument(
        "--hd", type=int, default=4, help="synthetic 1280x720 H.264 videos for the decode ratio (220 frames)"
    )
    p.add_argument("--detectors", action="store_true", help="also compare the interest point detectors")
    p.add_argument("--video-minutes", type=float, default=4.0, help="mean video length assumed for the 100K projection")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate assumed for the 100K projection")
    p.add_argument(
        "--trackers",
        action="store_true",
        help="only the miner.tracker options: cost per tracked frame, yield, accuracy",
    )
    p.add_argument("--ratio-only", action="store_true", help="only mining vs decoding alone, side by side (see above)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --ratio-only (medians reported)")
    p.add_argument(
        "--film", default=None, help="path of bbb.mp4, or `fetch` (cached in $VIDREP_CACHE_DIR or ~/.cache/vidrep)"
    )
    p.add_argument("--film-segments", type=int, default=4)
    p.add_argument("--segment-seconds", type=float, default=30.0, help="0: the whole film")
    return p.parse_args()


CACHE = Path(os.environ.get("VIDREP_CACHE_DIR", Path.home() / ".cache/vidrep"))


def fetch_film(dest: Path = CACHE / "bbb.mp4") -> Path:
    """Big Buck Bunny (1280x720 H.264, 10 min) from the moviepy 2.2.1 sdist on PyPI (its docs ship
    it in a zip), fetched once with pip, the only network this machine has."""
    import subprocess
    import sys
    import tarfile
    import zipfile

    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "moviepy==2.2.1", "-d", tmp],
            check=True,
            capture_output=True,
            timeout=600,
        )
        with tarfile.open(next(Path(tmp).glob("moviepy-*.tar.gz"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("moviepy_10_minutes.zip"))
            tar.extract(member, tmp, filter="data")
        with zipfile.ZipFile(Path(tmp) / member.name) as z:
            name = next(n for n in z.namelist() if n.endswith("resources/bbb.mp4"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = dest.with_name(f".{dest.name}.tmp")
            staging.write_bytes(z.read(name))
            staging.rename(dest)
    return dest


def film_segments(film: Path, out: Path, segments: int, seconds: float) -> list[Path]:
    """`segments` clips of `seconds`, evenly spaced over the film, copied packet for packet (each
    starts at the keyframe before its position)."""
    import av

    if seconds <= 0:
        return [film]
    out.mkdir(parents=True, exist_ok=True)
    with av.open(str(film)) as probe:
        length = probe.duration / 1e6
    paths = []
    for i in range(segments):
        start = (i + 0.5) * length / segments - seconds / 2
        path = out / f"{film.stem}_{int(start):04d}s.mp4"
        with av.open(str(film)) as src, av.open(str(path), "w") as dst:
            stream = src.streams.video[0]
            copy = dst.add_stream_from_template(stream)
            src.seek(int(max(start, 0) / stream.time_base), stream=stream)
            first = None
            for packet in src.demux(stream):
                if packet.dts is None or packet.pts is None:
                    continue
                first = packet.pts if first is None else first
                if (packet.pts - first) * stream.time_base > seconds:
                    break
                packet.pts -= first
                packet.dts -= first
                packet.stream = copy
                dst.mux(packet)
        paths.append(path)
    return paths


LEGACY = dict(homography_method="ransac", motion_sample=0)


def timed_rounds(paths: list[Path], rounds: int) -> tuple[dict, Counter, dict]:
    """Per round, side by side: decoding alone, mining with the legacy settings, mining with the
    defaults. Returns {variant: [(cpu s, wall s), ...]}, the frame count, and per variant the
    per-stage CPU seconds and counters of the first round."""
    configs = {"mining, legacy settings": MinerConfig(**LEGACY), "mining, defaults": MinerConfig()}
    times: dict[str, list[tuple[float, float]]] = {
        "decoding alone": [],
        "decoding, no scaling or conversion": [],
        **{k: [] for k in configs},
    }
    first: dict = {}
    frames = 0
    for _r in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        frames = sum(1 for path in paths for _ in read_frames(path))
        times["decoding alone"].append((time.process_time() - cpu, time.perf_counter() - wall))
        cpu, wall = time.process_time(), time.perf_counter()
        for path in paths:
            for _ in read_pictures(path):
                pass
        times["decoding, no scaling or conversion"].append((time.process_time() - cpu, time.perf_counter() - wall))
        for name, config in configs.items():
            miner, stats, seconds = VideoMiner(config), Counter(), Counter()
            cpu, wall = time.process_time(), time.perf_counter()
            for path in paths:
                result = miner.mine(path)
                stats.update(result.stats)
                seconds.update(result.clock.seconds)
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
            first.setdefault(name, (seconds, stats))
    return times, frames, first


def ratio_tables(label: str, paths: list[Path], rounds: int) -> str:
    import statistics

    times, frames, first = timed_rounds(paths, rounds)
    base = [t for t in times["decoding alone"]]
    rows = []
    for name, ts in times.items():
        cpu = statistics.median(t[0] for t in ts)
        wall = statistics.median(t[1] for t in ts)
        cpu_ratio = [t[0] / b[0] for t, b in zip(ts, base)]
        wall_ratio = [t[1] / b[1] for t, b in zip(ts, base)]
        rows.append(
            [
                name,
                f"{1000 * cpu / frames:.2f}",
                f"{statistics.median(cpu_ratio):.2f}x",
                f"{min(cpu_ratio):.2f}-{max(cpu_ratio):.2f}",
                f"{1000 * wall / frames:.2f}",
                f"{statistics.median(wall_ratio):.2f}x",
            ]
        )
    out = [
        f"{label}: {len(paths)} videos, {frames} frames, median of {rounds} rounds",
        markdown_table(
            [
                "",
                "CPU ms per frame",
                "CPU time / decoding alone (target <= 2x)",
                "range over rounds",
                "wall ms per frame",
                "wall time / decoding alone",
            ],
            rows,
        ),
        "",
    ]
    stage_rows = []
    for s in STAGES:
        stage_rows.append([s, *(f"{1000 * first[name][0][s] / frames:.2f}" for name in first)])
    out.append(markdown_table(["stage (CPU ms per frame, round 1)", *first], stage_rows))
    counters = ["candidates", "rejected_static", "rejected_camera_motion", "tracks", "pairs"]
    out.append(
        markdown_table(["counter", *first], [[k, *(str(first[name][1][k]) for name in first)] for k in counters])
    )
    return "\n".join(out)


class _CountingTracker:
    """Wraps an OpenCV tracker to count its updates (tracked frames) and their CPU time."""

    updates, seconds = 0, 0.0

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def init(self, *args):
        return self.tracker.init(*args)

    def update(self, image):
        start = time.process_time()
        out = self.tracker.update(image)
        _CountingTracker.seconds += time.process_time() - start
        _CountingTracker.updates += 1
        return out


def tracker_rows(footage: dict[str, list[Path]]) -> list[list[str]]:
    """Per miner.tracker: the tracker's own CPU ms per tracked frame (the frame scaling before it,
    ~0.1 ms, is the same for all), tracks, lost tracks and pairs per footage set, and on synthetic
    videos with known object boxes (SyntheticVideo seeds 1-5, 160 frames, objects at 3-4 px/frame)
    the share of the query's object inside the tracked box 30 frames later."""
    from vidrep.mining import tracking

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = {seed: SyntheticVideo(seed, num_frames=160, object_speed=(3.0, 4.0)) for seed in range(1, 6)}
        paths = {seed: v.write(Path(tmp) / f"{seed}.avi") for seed, v in synthetic.items()}
        for name, create in tracking.TRACKERS.items():
            tracking.TRACKERS[name] = lambda patch, create=create: _CountingTracker(create(patch))
            try:
                miner = VideoMiner(MinerConfig(tracker=name))
                _CountingTracker.updates, _CountingTracker.seconds = 0, 0.0
                cells = []
                for _label, videos in footage.items():
                    stats = Counter()
                    for path in videos:
                        stats.update(miner.mine(path).stats)
                    cells.append(f"{stats['tracks']} / {stats['tracks_lost']} / {stats['pairs']}")
                per_frame = 1000 * _CountingTracker.seconds / max(_CountingTracker.updates, 1)
                covers = []
                for seed, video in synthetic.items():
                    for r in miner.mine(paths[seed]).records:
                        boxes = video.boxes(r.query_frame)
                        obj = int(np.argmax([_cover(b, r.query_box) for b in boxes]))
                        covers.append(_cover(video.boxes(r.tracked_frame)[obj], r.tracked_box))
                covers = np.array(covers)
                rows.append(
                    [
                        name,
                        f"{per_frame:.2f}",
                        *cells,
                        str(len(covers)),
                        f"{covers.mean():.3f}" if len(covers) else "-",
                        f"{(covers >= 0.5).mean():.2f}" if len(covers) else "-",
                    ]
                )
            finally:
                tracking.TRACKERS[name] = create
    return rows


def _cover(box, window) -> float:
    """Share of `box` (x, y, w, h) inside `window`."""
    x, y, w, h = box
    wx, wy, ww, wh = window
    return max(0, min(x + w, wx + ww) - max(x, wx)) * max(0, min(y + h, wy + wh) - max(y, wy)) / (w * h)


def write_h264(path: Path, seed: int, num_frames: int = 220) -> Path:
    import av

    video = SyntheticVideo(seed, num_frames=num_frames, height=720, width=1280, num_objects=3, object_size=(200, 300))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "medium", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for img in video.frames():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        container.mux(stream.encode())
    return path


def decode_seconds(paths: list[Path], decoder: str) -> tuple[float, int]:
    start, frames = time.perf_counter(), 0
    for path in paths:
        for _ in read_frames(path, decoder=decoder):
            frames += 1
    return time.perf_counter() - start, frames


def pipeline(paths: list[Path], config: MinerConfig) -> tuple[float, Counter, Counter]:
    miner, stats, seconds = VideoMiner(config), Counter(), Counter()
    start = time.perf_counter()
    for path in paths:
        result = miner.mine(path)
        stats.update(result.stats)
        seconds.update(result.clock.seconds)
    return time.perf_counter() - start, stats, seconds


def detector_rows(paths: list[Path]) -> list[list[str]]:
    """Per detector, on every 5th frame of each video: cost, points, moving share, frames kept."""
    rows = []
    for name in ("gftt", "fast", "orb", "sift"):
        detect = make_detector(name, 1000)
        for path in paths:
            frames = list(read_frames(path))
            cost, points, fractions = 0.0, [], []
            for t in range(5, len(frames), 5):
                prev, cur = (cv2.cvtColor(frames[i], cv2.COLOR_BGR2GRAY) for i in (t - 1, t))
                start = time.perf_counter()
                pts = detect(cur)
                cost += time.perf_counter() - start
                motion = point_motion(prev, cur, pts)
                if motion.homography is not None and len(motion.points):
                    points.append(len(motion.points))
                    fractions.append(float((motion.residual > 0.5).mean()))
            fractions = np.array(fractions)
            kept = np.mean((fractions >= 0.25) & (fractions <= 0.75)) if len(fractions) else 0.0
            pairs = VideoMiner(MinerConfig(detector=name)).mine(path).stats["pairs"]
            n = max(1, len(range(5, len(frames), 5)))
            rows.append(
                [
                    name,
                    path.name,
                    f"{1000 * cost / n:.1f}",
                    f"{np.mean(points):.0f}",
                    f"{np.median(fractions):.2f}",
                    f"{100 * kept:.0f} %",
                    str(pairs),
                ]
            )
    return rows


def main() -> None:
    args = parse_args()
    cv2.setNumThreads(1)
    if args.trackers:
        import datetime
        import platform

        print(
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()}, "
            f"opencv {cv2.__version__}, load average {os.getloadavg()[0]:.1f}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            footage = {}
            if args.videos is not None:
                footage["opencv-doc"] = [v.path for v in list_videos(args.videos)]
            if args.film is not None:
                film = fetch_film() if args.film == "fetch" else Path(args.film)
                footage[film.name] = film_segments(film, Path(tmp) / "film", args.film_segments, args.segment_seconds)
            print(
                markdown_table(
                    [
                        "miner.tracker",
                        "CPU ms per tracked frame",
                        *(f"{k}: tracks / lost / pairs" for k in footage),
                        "synthetic: pairs",
                        "object share in tracked box",
                        "pairs with >= half the object",
                    ],
                    tracker_rows(footage),
                )
            )
        return
    if args.ratio_only:
        import datetime
        import platform

        print(
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            if args.film is not None:
                film = fetch_film() if args.film == "fetch" else Path(args.film)
                clips = film_segments(film, Path(tmp) / "film", args.film_segments, args.segment_seconds)
                print(ratio_tables(f"{film.name} (1280x720 H.264)", clips, args.rounds), "\n")
            if args.videos is not None:
                print(ratio_tables(str(args.videos), [v.path for v in list_videos(args.videos)], args.rounds))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths: list[Path] = []
        if args.videos is not None:
            paths += [v.path for v in list_videos(args.videos)]
        if args.synthetic:
            paths += sorted(write_demo_videos(tmp / "synthetic", args.synthetic, 220, seed=1000).glob("*.avi"))
        if not paths:
            raise SystemExit(
                "no videos: pass --videos or --synthetic N (the opencv-doc samples are fetched by the tests)"
            )
        print(f"{len(paths)} videos: {', '.join(p.name for p in paths[:6])}{' ...' if len(paths) > 6 else ''}")

        dec = {d: decode_seconds(paths, d) for d in ("pyav", "opencv")}
        full_s, stats, seconds = pipeline(paths, MinerConfig())
        frames = stats["frames"]
        folder = tmp / "all"
        folder.mkdir()
        for i, p in enumerate(paths):
            (folder / f"{i:03d}_{p.name}").symlink_to(p.resolve())
        wall = {}
        for workers in (1, 2):
            start = time.perf_counter()
            mine_corpus(folder, tmp / f"corpus{workers}", MinerConfig(), workers=workers, progress=False)
            wall[workers] = time.perf_counter() - start

        pyav_s = dec["pyav"][0]
        per_pair = full_s / max(stats["pairs"], 1)
        video_frames = args.video_minutes * 60 * args.fps
        rows = [
            ["decode alone, PyAV (frames/s per core)", f"{frames / pyav_s:.0f}", "resize to 600x448 inside libswscale"],
            [
                "decode alone, OpenCV (frames/s per core)",
                f"{dec['opencv'][1] / dec['opencv'][0]:.0f}",
                "cv2.VideoCapture + cv2.resize(INTER_AREA)",
            ],
            [
                "full pipeline (frames/s per core)",
                f"{frames / full_s:.0f}",
                f"{stats['pairs']} pairs from {frames} frames",
            ],
            ["full pipeline / decode alone (time)", f"{full_s / pyav_s:.2f}x", "target <= 2x"],
            [
                "2 workers vs 1 (speed-up)",
                f"{wall[1] / wall[2]:.2f}x",
                f"mine_corpus wall time {wall[1]:.1f} s vs {wall[2]:.1f} s; target >= 1.8x",
            ],
            ["pairs per core-hour", f"{3600 / per_pair:,.0f}", "at this footage's yield"],
            [
                f"core-hours for 100K videos of {args.video_minutes:g} min",
                f"{1e5 * video_frames / (frames / full_s) / 3600:,.0f}",
                f"{args.fps:g} fps, at this footage's frames/s",
            ],
            ["core-hours for 8M pairs", f"{8e6 * per_pair / 3600:,.0f}", "at this footage's yield"],
        ]
        if args.hd:
            hd = [write_h264(tmp / f"hd{i}.mp4", 2000 + i) for i in range(args.hd)]
            hd_decode = decode_seconds(hd, "pyav")
            hd_full, hd_stats, _ = pipeline(hd, MinerConfig())
            rows[4:4] = [
                [
                    "1280x720 H.264: decode alone, PyAV (frames/s per core)",
                    f"{hd_decode[1] / hd_decode[0]:.0f}",
                    f"{args.hd} synthetic videos",
                ],
                [
                    "1280x720 H.264: full pipeline (frames/s per core)",
                    f"{hd_stats['frames'] / hd_full:.0f}",
                    f"{hd_stats['pairs']} pairs",
                ],
                [
                    "1280x720 H.264: full pipeline / decode alone (time)",
                    f"{hd_full / hd_decode[0]:.2f}x",
                    "target <= 2x",
                ],
            ]
        print(markdown_table(["measure", "value", "notes"], rows))
        total = sum(seconds.values())
        print()
        print(
            markdown_table(
                ["stage", "share of CPU time", "CPU ms per frame"],
                [[s, f"{100 * seconds[s] / total:.0f} %", f"{1000 * seconds[s] / frames:.2f}"] for s in STAGES],
            )
        )
        print()
        print(markdown_table(["counter", "value"], [[k, f"{v:,}"] for k, v in stats.items()]))
        if args.detectors:
            print()
            real = [p for p in paths if not p.name[:5].isdigit()][:3] or paths[:3]
            print(
                markdown_table(
                    [
                        "detector",
                        "video",
                        "ms/frame",
                        "points followed",
                        "median moving share",
                        "frames within 25-75 %",
                        "pairs",
                    ],
                    detector_rows(real),
                )
            )


if __name__ == "__main__":
    main()
