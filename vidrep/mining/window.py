"""The size x size window holding the most points, by a summed-area table (O(pixels))."""

from __future__ import annotations

import numpy as np


def window_counts(points: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """counts[y, x] = number of points with x <= px < x + size and y <= py < y + size, for every
    window position inside the frame ([height - size + 1, width - size + 1])."""
    if size > height or size > width:
        raise ValueError(f"a {size}x{size} window does not fit a {height}x{width} frame")
    grid = np.zeros((height + 1, width + 1), np.int64)
    if len(points):
        px = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, width - 1)
        py = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, height - 1)
        np.add.at(grid, (py + 1, px + 1), 1)
    table = grid.cumsum(0).cumsum(1)
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def best_window(points: np.ndarray, height: int, width: int, size: int) -> tuple[int, int, int]:
    """(x, y, count) of the window with the most points. Ties form a plateau of positions that
    all hold the same points; take the one nearest its centre so the points sit mid-window rather
    than against an edge (the first position in raster order would put them in a corner)."""
    counts = window_counts(points, height, width, size)
    best = counts.max()
    ys, xs = np.nonzero(counts == best)
    d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    i = int(np.argmin(d2))
    return int(xs[i]), int(ys[i]), int(best)
