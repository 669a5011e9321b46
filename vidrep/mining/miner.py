"""Mining one video: frames -> (query patch, tracked patch) pairs, with counts of what was rejected.

Streaming: frames are decoded once, in order, and never held beyond the previous one; a track in
progress is advanced as frames arrive, so memory does not grow with the video's length.

Per candidate frame t (every `candidate_every` frames, never inside a track already taken):
  interest points on t -> their motion against t-1 after camera-motion compensation -> reject the
  frame when too few points, no camera model, < min_moving or > max_moving of the points move ->
  the window with the most moving points -> track it (KCF by default) over `track_length` frames -> the
  window in frame t + track_length is the positive. A shot cut, a lost track or the end of the
  video before the track completes yields no pair.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from vidrep.data.corpus import PairRecord
from vidrep.mining.decode import Picture, VideoError, read_pictures
from vidrep.mining.motion import HOMOGRAPHY_METHODS, MotionScreen, PointMotion, point_motion
from vidrep.mining.points import gftt_with_weak_corners, make_detector, surf_available
from vidrep.mining.shots import is_cut, thumbnail_histogram
from vidrep.mining.tracking import TRACKERS, WindowTracker
from vidrep.mining.window import best_window

# Every counter a video's mining reports, in the order the summary prints them.
STAT_KEYS = (
    "frames",
    "candidates",
    "rejected_cut",
    "rejected_few_points",
    "rejected_no_camera_model",
    "rejected_static",
    "rejected_camera_motion",
    "tracks",
    "tracks_lost",
    "tracks_cut",
    "tracks_unfinished",
    "pairs",
)


# Settings that did not exist in earlier corpora's mining.json, with the behaviour those had.
LEGACY_VALUES = {"homography_method": "ransac", "motion_sample": 0, "tracker": "kcf"}


@dataclass(frozen=True)
class MinerConfig:
    """Every setting of the per-video miner; stored in the corpus (mining.json) so a corpus is
    never extended with pairs mined under other settings."""

    height: int = 448
    width: int = 600
    decoder: str = "pyav"
    detector: str = "auto"  # auto = SURF [paper] where this OpenCV has it, else gftt
    max_points: int = 1000
    moving_px: float = 0.5
    min_moving: float = 0.25
    max_moving: float = 0.75
    min_points: int = 20
    window: int = 227
    track_length: int = 30
    tracker: str = "kcf"  # vidrep.mining.tracking.TRACKERS
    track_size: int = 64
    track_patch: int = 48
    candidate_every: int = 5
    min_gap: int = 0
    max_pairs_per_video: int | None = None
    grid: tuple[int, int] = (8, 6)
    per_cell: int = 4
    ransac_px: float = 0.5
    homography_method: str = "usac"
    motion_sample: int = 200
    cut_threshold: float = 0.7
    jpeg_quality: int = 90
    # Seconds one video may take before its worker is stopped and the video recorded as `timeout`
    # (vidrep/mining/watchdog.py); None: derived from the length the container declares.
    video_timeout: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        if self.detector == "auto":
            # Resolved here so that mining.json records the detector actually used: machines
            # with and without SURF cannot then add to one corpus unnoticed.
            object.__setattr__(self, "detector", "surf" if surf_available() else "gftt")
        if not 0 <= self.min_moving <= self.max_moving <= 1:
            raise ValueError(f"need 0 <= min_moving <= max_moving <= 1; got {self.min_moving}, {self.max_moving}")
        if self.window > min(self.height, self.width):
            raise ValueError(f"window {self.window} does not fit frames of {self.height}x{self.width}")
        if self.track_length < 1 or self.candidate_every < 1 or self.min_gap < 0:
            raise ValueError("need track_length >= 1, candidate_every >= 1 and min_gap >= 0")
        if self.tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {self.tracker!r}; choose miner.tracker from {tuple(TRACKERS)}")
        if self.homography_method not in HOMOGRAPHY_METHODS:
            raise ValueError(
                f"unknown homography_method {self.homography_method!r}; choose from {tuple(HOMOGRAPHY_METHODS)}"
            )
        if self.video_timeout is not None and self.video_timeout <= 0:
            raise ValueError(
                f"miner.video_timeout must be > 0 seconds (or null: from the video's length); got {self.video_timeout}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_corpus_settings(cls, settings: dict) -> MinerConfig:
        """The config a corpus was mined with, from its mining.json (keys it predates at their legacy values)."""
        return cls(**{**LEGACY_VALUES, **settings})

    def corpus_settings(self) -> dict:
        """The settings that decide which pairs a video gives: what mining.json pins. The time
        limit only decides when to give up on a video, so a rerun may change it."""
        d = self.to_dict()
        del d["video_timeout"]
        # Settings added later are left out at the value that corpora mined before them used, so
        # those corpora resume with it (and refuse the newer default, which mines other pairs).
        return {k: v for k, v in d.items() if LEGACY_VALUES.get(k, object()) != v}


class StageClock:
    """CPU seconds per pipeline stage: `lap(stage)` charges the time since the previous lap to it.
    CPU time of this process, not wall time: on a machine shared with other jobs, wall time
    charges their preemptions to whichever stage happens to run (measured: 5 ms of busy work
    between frames doubled the wall time of decoding, not its CPU time)."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self._last = time.process_time()

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.seconds[stage] += now - self._last
        self._last = now


@dataclass
class VideoResult:
    records: list[PairRecord]
    stats: Counter = field(default_factory=Counter)
    clock: StageClock = field(default_factory=StageClock)  # decode, cuts, detect, motion, window, track, encode


@dataclass
class _Track:
    tracker: WindowTracker
    start: int
    window: tuple[int, int]
    query_jpeg: bytes
    num_points: int
    num_moving: int


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def _crop(frame: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    return frame[y : y + size, x : x + size]


def frame_verdict(motion: PointMotion, config: MinerConfig) -> str | None:
    """Why a candidate query frame is rejected (the counter's name), or None to keep it."""
    if len(motion.points) < config.min_points:
        return "rejected_few_points"
    if motion.homography is None:
        return "rejected_no_camera_model"
    fraction = float((motion.residual > config.moving_px).mean())
    if fraction < config.min_moving:
        return "rejected_static"
    if fraction > config.max_moving:
        return "rejected_camera_motion"
    return None


class VideoMiner:
    """Mines videos one at a time with fixed settings (the detector is built once)."""

    def __init__(self, config: MinerConfig) -> None:
        self.config = config
        self.detect = make_detector(config.detector, config.max_points)
        self.screen = (
            MotionScreen(config.motion_sample, config.moving_px, config.min_moving, config.max_moving)
            if config.motion_sample > 0
            else None
        )

    def frame_motion(self, prev_gray: np.ndarray, gray: np.ndarray, clock: StageClock | None = None) -> PointMotion:
        """Interest points of a candidate frame and their camera-compensated motion since the
        previous frame (also what `vidrep.viz.mining` draws)."""
        c = self.config
        if c.detector == "gftt":
            points, weak = gftt_with_weak_corners(gray, c.max_points)
        else:
            points, weak = self.detect(gray), None
        if clock is not None:
            clock.lap("detect")
        motion = point_motion(
            prev_gray,
            gray,
            points,
            grid=c.grid,
            per_cell=c.per_cell,
            ransac_px=c.ransac_px,
            weak_corners=weak,
            homography_method=c.homography_method,
            screen=self.screen,
        )
        if clock is not None:
            clock.lap("motion")
        return motion

    def _start_track(self, stats: Counter, clock: StageClock, prev_gray, gray, frame, t) -> _Track | None:
        c = self.config
        stats["candidates"] += 1
        motion = self.frame_motion(prev_gray, gray, clock)
        verdict = frame_verdict(motion, c)
        if verdict is not None:
            stats[verdict] += 1
            return None
        moving = motion.residual > c.moving_px
        x, y, count = best_window(motion.points[moving], c.height, c.width, c.window)
        clock.lap("window")
        stats["tracks"] += 1
        tracker = WindowTracker(frame, x, y, c.window, c.track_size, c.track_patch, c.tracker)
        clock.lap("track")
        query_jpeg = _jpeg(_crop(frame, x, y, c.window), c.jpeg_quality)
        clock.lap("encode")
        return _Track(
            tracker=tracker,
            start=t,
            window=(x, y),
            query_jpeg=query_jpeg,
            num_points=len(motion.points),
            num_moving=count,
        )

    def mine(self, path: str | Path, name: str | None = None) -> VideoResult:
        """Pairs of one video. `name` is the video's identity in the corpus (default: the path).
        Raises VideoError for input that is not a usable video."""
        c = self.config
        name = str(path) if name is None else name
        result = VideoResult(records=[])
        stats, clock = result.stats, result.clock
        prev: Picture | None = None
        prev_hist = None
        track: _Track | None = None
        next_start = 1  # the first frame has no predecessor to measure motion against

        def bgr(picture: Picture, t: int) -> np.ndarray:
            frame = picture.bgr()
            if frame.shape != (c.height, c.width, 3):
                raise VideoError("bad_frame", f"{path}: frame {t} has shape {frame.shape}")
            clock.lap("decode")  # a frame is scaled and converted only when a stage uses it
            return frame

        for t, picture in enumerate(read_pictures(path, c.height, c.width, c.decoder)):
            clock.lap("decode")
            stats["frames"] += 1
            # Every frame is checked for a cut, on its luma only (the decoder's own plane: no
            # scaling or colour conversion for frames no other stage looks at).
            hist = thumbnail_histogram(picture.luma())
            cut = prev_hist is not None and is_cut(prev_hist, hist, c.cut_threshold)
            clock.lap("cuts")
            if track is not None:
                if cut:
                    stats["tracks_cut"] += 1
                    track = None
                else:
                    frame = bgr(picture, t)
                    pos = track.tracker.update(frame)
                    clock.lap("track")
                    if pos is None:
                        stats["tracks_lost"] += 1
                        track = None
                    elif t == track.start + c.track_length:
                        result.records.append(
                            PairRecord(
                                video=name,
                                query_frame=track.start,
                                tracked_frame=t,
                                query_box=(*track.window, c.window, c.window),
                                tracked_box=(*pos, c.window, c.window),
                                num_points=track.num_points,
                                num_moving=track.num_moving,
                                query_jpeg=track.query_jpeg,
                                tracked_jpeg=_jpeg(_crop(frame, *pos, c.window), c.jpeg_quality),
                            )
                        )
                        clock.lap("encode")
                        stats["pairs"] += 1
                        track = None
                        next_start = t + 1 + c.min_gap
                        if c.max_pairs_per_video is not None and stats["pairs"] >= c.max_pairs_per_video:
                            break
            elif t >= next_start and t % c.candidate_every == 0:
                if cut:
                    stats["candidates"] += 1
                    stats["rejected_cut"] += 1
                else:
                    frame = bgr(picture, t)
                    bgr(prev, t - 1)
                    gray, prev_gray = picture.gray(), prev.gray()
                    clock.lap("decode")
                    track = self._start_track(stats, clock, prev_gray, gray, frame, t)
            prev, prev_hist = picture, hist
        if track is not None:
            stats["tracks_unfinished"] += 1
        if stats["frames"] == 0:
            raise VideoError("no_frames", f"{path}: no frame could be decoded")
        if stats["frames"] <= c.track_length:
            raise VideoError("too_short", f"{path}: {stats['frames']} frames, a track needs {c.track_length + 1}")
        return result
