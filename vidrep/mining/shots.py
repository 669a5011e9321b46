"""Shot-cut detection: a track must not jump from one shot to the next.

Grey-level histograms of a 64x48 thumbnail compared by correlation: well under a millisecond per
frame, and a cut drops the correlation far below what motion within a shot does.
"""

from __future__ import annotations

import cv2
import numpy as np


def thumbnail_histogram(gray: np.ndarray) -> np.ndarray:
    thumb = cv2.resize(gray, (64, 48), interpolation=cv2.INTER_AREA)
    return cv2.calcHist([thumb], [0], None, [32], [0, 256])


def is_cut(previous: np.ndarray, current: np.ndarray, threshold: float = 0.7) -> bool:
    return cv2.compareHist(previous, current, cv2.HISTCMP_CORREL) < threshold
