"""Following the query window with KCF at an FFT-friendly size.

OpenCV's KCF runs its FFT at the box's own size: 227x227 (a prime) costs ~160 ms per frame, a
112x112 box on a frame scaled by 112/227 a few ms. So the tracker runs on the scaled frame and only
the window's displacement is mapped back: the tracked box is the query window shifted by that
displacement (in full-resolution pixels) and stays 227x227, as KCF keeps its box size anyway.
"""

from __future__ import annotations

import cv2
import numpy as np


def _kcf() -> cv2.Tracker:
    return cv2.TrackerKCF.create() if hasattr(cv2.TrackerKCF, "create") else cv2.TrackerKCF_create()


class WindowTracker:
    """Tracks a size x size window, (x, y) top-left, from `frame` on."""

    def __init__(self, frame: np.ndarray, x: int, y: int, size: int = 227, track_size: int = 112) -> None:
        height, width = frame.shape[:2]
        self.scale = track_size / size
        self.small_size = (max(track_size, round(width * self.scale)), max(track_size, round(height * self.scale)))
        self.size, self.height, self.width = size, height, width
        self.x, self.y = x, y
        small_w, small_h = self.small_size
        self.x0 = min(round(x * self.scale), small_w - track_size)
        self.y0 = min(round(y * self.scale), small_h - track_size)
        self.tracker = _kcf()
        self.tracker.init(self._small(frame), (self.x0, self.y0, track_size, track_size))

    def _small(self, frame: np.ndarray) -> np.ndarray:
        return cv2.resize(frame, self.small_size, interpolation=cv2.INTER_AREA)

    def update(self, frame: np.ndarray) -> tuple[int, int] | None:
        """The window's new top-left in full-resolution pixels, or None when the track is lost
        (KCF's confidence test fails, or the window's centre leaves the frame)."""
        ok, box = self.tracker.update(self._small(frame))
        if not ok:
            return None
        x = self.x + (box[0] - self.x0) / self.scale
        y = self.y + (box[1] - self.y0) / self.scale
        cx, cy = x + self.size / 2, y + self.size / 2
        if not (0 <= cx < self.width and 0 <= cy < self.height):
            return None
        # A window part-way out of the frame is moved back in: the patch must be whole.
        x = min(max(round(x), 0), self.width - self.size)
        y = min(max(round(y), 0), self.height - self.size)
        return int(x), int(y)
