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
# The camera model's robust fit. OpenCV's classic RANSAC at a 0.5 px threshold costs ~12 ms per
# candidate frame (~180 support points, measured on Big Buck Bunny); its USAC framework fits the same
# model with the same threshold in ~2.3 ms (USAC_DEFAULT: RANSAC with local optimisation, seeded,
# so mining stays deterministic) or ~1.3 ms (USAC_FAST). bench/mine.py --homography compares them.
HOMOGRAPHY_METHODS = {"ransac": cv2.RANSAC, "usac": cv2.USAC_DEFAULT, "usac_fast": cv2.USAC_FAST}


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


def _follow(prev_gray: np.ndarray, gray: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lucas-Kanade from frame t to t-1: matched positions [N, 2] and a found mask [N]. Each point
    is solved on its own, so following a set in parts gives what one call gives."""
    if len(query) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, bool)
    matched, status, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, query.reshape(-1, 1, 2), None, **_LK)
    return matched.reshape(-1, 2), status.reshape(-1).astype(bool)


@dataclass(frozen=True)
class MotionScreen:
    """Settles a frame's verdict on a sample of its points when the sample leaves no doubt: the
    sample's moving share is more than `sigmas` binomial standard deviations (of a sample of a
    frame whose share is at the band's edge) outside [min_moving, max_moving]. The rest of the
    points are then not followed: the frame is rejected as static or camera motion either way
    (most candidate frames are: 85 % of them on Big Buck Bunny), and a whole-set share on the
    other side of the band would need a `sigmas`-sigma sampling accident."""

    sample: int
    moving_px: float
    min_moving: float
    max_moving: float
    sigmas: float = 4.0

    def indices(self, n: int) -> np.ndarray | None:
        """Which of n points (strongest first) to sample: spread evenly over the strengths; None
        when too few points for a sample to save anything."""
        if self.sample <= 0 or n < 2 * self.sample:
            return None
        return np.linspace(0, n - 1, self.sample).round().astype(np.int64)

    def settled(self, residual: np.ndarray) -> bool:
        if len(residual) < self.sample // 2:  # too many points lost: judge on all of them
            return False
        share, n = float((residual > self.moving_px).mean()), len(residual)
        below = self.min_moving - self.sigmas * np.sqrt(self.min_moving * (1 - self.min_moving) / n)
        above = self.max_moving + self.sigmas * np.sqrt(self.max_moving * (1 - self.max_moving) / n)
        return share < below or share > above


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
    homography_method: str = "ransac",
    screen: MotionScreen | None = None,
) -> PointMotion:
    """Motion of `points` (of frame `gray`) relative to `prev_gray`. The camera model is fitted on
    up to `per_cell` of the strongest `weak_corners` (all corners down to a low quality, strongest
    first; searched here when not given) in each grid cell. With a `screen`, a frame whose verdict
    a sample of the points settles gets the motion of that sample only."""
    height, width = gray.shape
    if weak_corners is None:
        weak_corners = cv2.goodFeaturesToTrack(gray, maxCorners=0, qualityLevel=0.001, minDistance=5)
        weak_corners = np.zeros((0, 2), np.float32) if weak_corners is None else weak_corners.reshape(-1, 2)
    chosen = balanced_subset(weak_corners, height, width, grid, per_cell)
    points = points.astype(np.float32).reshape(-1, 2)
    n = len(points)
    if n + len(chosen) == 0:
        return PointMotion(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), None)
    # gftt's points are the head of its weak-corner list, and ~80 % of the support set are among
    # them: each distinct corner is followed once (Lucas-Kanade solves each point on its own, so
    # the results are those of following them twice).
    if n <= len(weak_corners) and np.array_equal(weak_corners[:n], points):
        own = chosen[chosen >= n]
        support_at = np.concatenate([chosen[chosen < n], n + np.arange(len(own))])
    else:
        own = chosen
        support_at = n + np.arange(len(own))
    joint = np.concatenate([points, weak_corners[own]])  # support positions: joint[support_at]
    matched, ok = np.empty_like(joint), np.zeros(len(joint), bool)
    followed = np.zeros(len(joint), bool)

    def follow(which: np.ndarray) -> None:
        which = which[~followed[which]]
        matched[which], ok[which] = _follow(prev_gray, gray, joint[which])
        followed[which] = True

    sampled = None if screen is None else screen.indices(n)
    # One call for the support set and the points (or their sample): each call builds the pyramids.
    follow(np.union1d(np.arange(n) if sampled is None else sampled, support_at))
    support, s_matched, s_ok = joint[support_at], matched[support_at], ok[support_at]
    homography = None
    if s_ok.sum() >= 8:
        homography, _ = cv2.findHomography(
            support[s_ok], s_matched[s_ok], HOMOGRAPHY_METHODS[homography_method], ransac_px
        )
    if sampled is not None:
        if homography is not None:
            first, first_ok = points[sampled], ok[sampled]
            residual = residual_flow(first[first_ok], matched[sampled][first_ok], homography).astype(np.float32)
            if screen.settled(residual):
                return PointMotion(first[first_ok], residual, homography)
        follow(np.arange(n))
    matched, ok = matched[:n], ok[:n]
    if homography is None:
        return PointMotion(points[ok], np.full(int(ok.sum()), np.nan, np.float32), None)
    pts = points[ok]
    return PointMotion(pts, residual_flow(pts, matched[ok], homography).astype(np.float32), homography)
