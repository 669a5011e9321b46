"""Camera-motion compensated point motion, the key idea of Improved Dense Trajectories.

Points of frame t are followed to frame t-1 with pyramidal Lucas-Kanade; a homography fitted with
RANSAC on a spatially balanced point set models the camera; what remains of each point's flow
after that model is its own motion. Two measured traps shape this (../shared/docs/mining-notes.md):
RANSAC at the usual 1 px is too loose for a 0.5 px motion test, and when textured moving objects
hold most of the strong corners, a homography fitted on them follows the object, not the camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_LK = dict(winSize=(15, 15), maxLevel=3, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))


def balanced_subset(points: np.ndarray, height: int, width: int, grid: tuple[int, int], per_cell: int) -> np.ndarray:
    """Indices of the first `per_cell` points (in the given order, strongest first) of each cell
    of a grid[0] x grid[1] (columns x rows) grid over the frame."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    cols, rows = grid
    cx = np.clip((points[:, 0] * cols / width).astype(np.int64), 0, cols - 1)
    cy = np.clip((points[:, 1] * rows / height).astype(np.int64), 0, rows - 1)
    cell = cy * cols + cx
    order = np.lexsort((np.arange(len(points)), cell))
    sorted_cell = cell[order]
    first = np.searchsorted(sorted_cell, sorted_cell, side="left")
    rank = np.arange(len(points)) - first
    return np.sort(order[rank < per_cell])


def residual_flow(points: np.ndarray, matched: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """|matched - H(points)| per point: the flow the camera model does not explain."""
    pts = np.concatenate([points, np.ones((len(points), 1), points.dtype)], axis=1) @ homography.T
    projected = pts[:, :2] / pts[:, 2:3]
    return np.linalg.norm(matched - projected, axis=1)


@dataclass(frozen=True)
class PointMotion:
    points: np.ndarray  # [N, 2] points of frame t that Lucas-Kanade could follow
    residual: np.ndarray  # [N] compensated flow magnitude, px
    homography: np.ndarray | None  # frame t -> frame t-1; None when it could not be fitted


def point_motion(
    prev_gray: np.ndarray,
    gray: np.ndarray,
    points: np.ndarray,
    *,
    grid: tuple[int, int] = (8, 6),
    per_cell: int = 4,
    ransac_px: float = 0.5,
    weak_corners: np.ndarray | None = None,
) -> PointMotion:
    """Motion of `points` (of frame `gray`) relative to `prev_gray`. The camera model is fitted on
    up to `per_cell` of the strongest `weak_corners` (all corners down to a low quality, strongest
    first; searched here when not given) in each grid cell."""
    height, width = gray.shape
    if weak_corners is None:
        weak_corners = cv2.goodFeaturesToTrack(gray, maxCorners=0, qualityLevel=0.001, minDistance=5)
        weak_corners = np.zeros((0, 2), np.float32) if weak_corners is None else weak_corners.reshape(-1, 2)
    support = weak_corners[balanced_subset(weak_corners, height, width, grid, per_cell)]
    query = np.concatenate([points.astype(np.float32), support]).reshape(-1, 1, 2)
    if len(query) == 0:
        return PointMotion(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), None)
    matched, status, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, query, None, **_LK)
    query, matched, ok = query.reshape(-1, 2), matched.reshape(-1, 2), status.reshape(-1).astype(bool)
    n = len(points)
    s_ok = ok[n:]
    homography = None
    if s_ok.sum() >= 8:
        homography, _ = cv2.findHomography(query[n:][s_ok], matched[n:][s_ok], cv2.RANSAC, ransac_px)
    p_ok = ok[:n]
    pts, moved = query[:n][p_ok], matched[:n][p_ok]
    if homography is None:
        return PointMotion(pts, np.full(len(pts), np.nan, np.float32), None)
    return PointMotion(pts, residual_flow(pts, moved, homography).astype(np.float32), homography)
