"""Following the query window with an OpenCV tracker (KCF by default) at an FFT-friendly size.

OpenCV's KCF runs its FFT at the box's own size (with padding): 227x227 (a prime) costs ~160 ms per
frame. So the tracker runs on the frame scaled by track_size/227 and only the window's displacement
is mapped back: the tracked box is the query window shifted by that displacement (in full-resolution
pixels) and stays 227x227, as KCF keeps its box size anyway. Measured (bench/mine.py, docs/mining.md):
a 64 box with KCF's search region resampled to <= 48x48 costs 0.9 ms per frame, a 112 box 3.5 ms,
and on synthetic videos with known motion both follow the object equally well (mean share of the
object kept in the tracked box 0.874 vs 0.877). The frame is shrunk with INTER_LINEAR: INTER_AREA at
this non-integer factor costs 1.3 ms, more than the tracking itself.

Other trackers plug in through `make_tracker` (`miner.tracker`); those that rescale their box
(CSRT, MedianFlow) are followed by the box's centre, so the window keeps its 227x227 size.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def _kcf(patch: int) -> cv2.Tracker:
    params = cv2.TrackerKCF_Params()
    # KCF resamples its search region (the box with padding) to at most patch x patch pixels.
    params.max_patch_size = patch * patch
    return cv2.TrackerKCF.create(params) if hasattr(cv2.TrackerKCF, "create") else cv2.TrackerKCF_create(params)


def _legacy(name: str) -> Callable[[int], cv2.Tracker]:
    def create(patch: int) -> cv2.Tracker:
        legacy = getattr(cv2, "legacy", None)
        if legacy is None or not hasattr(legacy, f"Tracker{name}_create"):
            raise ValueError(
                f"tracker {name.lower()!r} needs OpenCV's contrib modules (cv2.legacy); install "
                "opencv-contrib-python-headless, or use miner.tracker=kcf"
            )
        return getattr(legacy, f"Tracker{name}_create")()

    return create


# The OpenCV trackers that need no model file. Measured per tracked frame at the 64 box
# (bench/mine.py --trackers): see docs/mining.md. MIL is left out: it raises bad_alloc when the box
# leaves the frame; Nano, Vit and DaSiamRPN need network weights.
TRACKERS: dict[str, Callable[[int], cv2.Tracker]] = {
    "kcf": _kcf,
    "csrt": lambda patch: cv2.TrackerCSRT.create() if hasattr(cv2.TrackerCSRT, "create") else cv2.TrackerCSRT_create(),
    "mosse": _legacy("MOSSE"),
    "medianflow": _legacy("MedianFlow"),
}


def make_tracker(name: str, patch: int = 48) -> cv2.Tracker:
    """A fresh tracker of kind `name` (one per track: trackers keep state). `patch` is KCF's
    search-region resampling size; the others take their own defaults."""
    if name not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r}; choose miner.tracker from {tuple(TRACKERS)}")
    return TRACKERS[name](patch)


class WindowTracker:
    """Tracks a size x size window, (x, y) top-left, from `frame` on."""

    def __init__(
        self,
        frame: np.ndarray,
        x: int,
        y: int,
        size: int = 227,
        track_size: int = 112,
        patch: int = 80,
        tracker: str = "kcf",
    ) -> None:
        height, width = frame.shape[:2]
        self.scale = track_size / size
        self.small_size = (max(track_size, round(width * self.scale)), max(track_size, round(height * self.scale)))
        self.size, self.height, self.width = size, height, width
        self.x, self.y = x, y
        small_w, small_h = self.small_size
        self.x0 = min(round(x * self.scale), small_w - track_size)
        self.y0 = min(round(y * self.scale), small_h - track_size)
        self.track_size = track_size
        self.tracker = make_tracker(tracker, patch)
        self.tracker.init(self._small(frame), (self.x0, self.y0, track_size, track_size))

    def _small(self, frame: np.ndarray) -> np.ndarray:
        return cv2.resize(frame, self.small_size, interpolation=cv2.INTER_LINEAR)

    def update(self, frame: np.ndarray) -> tuple[int, int] | None:
        """The window's new top-left in full-resolution pixels, or None when the track is lost
        (the tracker's confidence test fails, or the window's centre leaves the frame)."""
        ok, box = self.tracker.update(self._small(frame))
        if not ok:
            return None
        # The box centre's displacement (for KCF's fixed-size box, that of its corner).
        half = self.track_size / 2
        x = self.x + (box[0] + box[2] / 2 - self.x0 - half) / self.scale
        y = self.y + (box[1] + box[3] / 2 - self.y0 - half) / self.scale
        cx, cy = x + self.size / 2, y + self.size / 2
        if not (0 <= cx < self.width and 0 <= cy < self.height):
            return None
        # A window part-way out of the frame is moved back in: the patch must be whole.
        x = min(max(round(x), 0), self.width - self.size)
        y = min(max(round(y), 0), self.height - self.size)
        return int(x), int(y)
