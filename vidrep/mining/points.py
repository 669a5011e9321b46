"""Interest point detectors: the paper's SURF where OpenCV has it, and measured substitutes.

Each detector maps a grey uint8 frame to float32 [N, 2] (x, y) points, strongest first, at most
`max_points`. The PyPI OpenCV wheels exclude SURF (patented); goodFeaturesToTrack ("gftt") is the
default substitute, chosen by `bench/mine.py --detectors` on real footage (see docs/mining.md, "The detector").
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

DETECTORS = ("gftt", "fast", "orb", "sift", "surf")
Detector = Callable[[np.ndarray], np.ndarray]


def surf_available() -> bool:
    try:
        cv2.xfeatures2d.SURF_create()
    except (AttributeError, cv2.error):
        return False
    return True


def _from_keypoints(keypoints, max_points: int) -> np.ndarray:
    keypoints = sorted(keypoints, key=lambda k: -k.response)[:max_points]
    if not keypoints:
        return np.zeros((0, 2), np.float32)
    return cv2.KeyPoint_convert(keypoints).astype(np.float32).reshape(-1, 2)


GFTT_QUALITY, GFTT_MIN_DISTANCE = 0.01, 5


def gftt_with_weak_corners(
    gray: np.ndarray, max_points: int, weak_quality: float = 0.001
) -> tuple[np.ndarray, np.ndarray]:
    """The gftt detector's points and, from the same single pass, every corner down to
    `weak_quality` (strongest first): the camera model's balanced support set is drawn from
    these, which saves a second corner search (~4 ms per candidate frame at 600x448)."""
    corners, quality = cv2.goodFeaturesToTrackWithQuality(gray, 0, weak_quality, GFTT_MIN_DISTANCE, None)
    if corners is None or len(corners) == 0:
        empty = np.zeros((0, 2), np.float32)
        return empty, empty
    corners, quality = corners.reshape(-1, 2), quality.reshape(-1)
    # Greedy min-distance suppression visits corners strongest first, so the strong ones that
    # survive here are exactly those goodFeaturesToTrack(qualityLevel=GFTT_QUALITY) returns.
    strong = corners[quality >= GFTT_QUALITY * quality.max()][:max_points]
    return strong, corners


def make_detector(name: str, max_points: int = 1000) -> Detector:
    if name == "gftt":

        def detect(gray: np.ndarray) -> np.ndarray:
            pts = cv2.goodFeaturesToTrack(
                gray, maxCorners=max_points, qualityLevel=GFTT_QUALITY, minDistance=GFTT_MIN_DISTANCE
            )
            return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2)

        return detect
    if name == "fast":
        fast = cv2.FastFeatureDetector_create(threshold=20)
        return lambda gray: _from_keypoints(fast.detect(gray), max_points)
    if name == "orb":
        orb = cv2.ORB_create(nfeatures=max_points)
        return lambda gray: _from_keypoints(orb.detect(gray), max_points)
    if name == "sift":
        sift = cv2.SIFT_create(nfeatures=max_points)
        return lambda gray: _from_keypoints(sift.detect(gray), max_points)
    if name == "surf":
        if not surf_available():
            raise ValueError(
                "detector 'surf' needs an OpenCV built with OPENCV_ENABLE_NONFREE (the PyPI wheels exclude "
                "it as patented); use miner.detector=gftt, the measured substitute, or build OpenCV yourself"
            )
        surf = cv2.xfeatures2d.SURF_create(hessianThreshold=400)
        return lambda gray: _from_keypoints(surf.detect(gray), max_points)
    raise ValueError(f"unknown detector {name!r}; choose from {DETECTORS}")
