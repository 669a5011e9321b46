"""Turning figures into pictures and pictures into files or W&B media.

Every picture of vidrep is an RGB uint8 array [H, W, 3]: easy to test (size and shape), to save
as PNG and to hand to W&B. Figures are drawn with matplotlib's Agg backend, which needs no display.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on servers and in data-loader workers)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_to_array(fig) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a matplotlib figure; the figure is closed."""
    plt = pyplot()
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])
    finally:
        plt.close(fig)


def patch_rgb(patch) -> np.ndarray:
    """A patch as RGB uint8 [H, W, 3], from a uint8 [3, H, W] tensor/array or an [H, W, 3] array."""
    a = patch.detach().cpu().numpy() if hasattr(patch, "detach") else np.asarray(patch)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return np.ascontiguousarray(a.astype(np.uint8))


def slug(name: str) -> str:
    """A file-name-safe form of a picture's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "picture"


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB image as PNG atomically (temporary name, then rename)."""
    from vidrep.common.io import write_bytes

    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    write_bytes(path, buf.tobytes())
    return Path(path)


def read_png(path: str | Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class PictureSink:
    """Where pictures go: PNG files under `folder` (always, so they are there without W&B) and, for
    each W&B logger given, W&B media under the same name."""

    def __init__(self, folder: str | Path | None, wandb_loggers: Sequence = ()) -> None:
        self.folder = None if folder is None else Path(folder)
        self.wandb_loggers = list(wandb_loggers)
        self.written: list[Path] = []

    def add(self, name: str, image: np.ndarray, caption: str = "", step: int | None = None, tag: str = "") -> None:
        """`name` is the W&B key (e.g. "pictures/triplets"); the PNG is <folder>/<tag>/<last part>.png
        (tag e.g. "epoch007" so later epochs do not overwrite earlier ones)."""
        if self.folder is not None:
            target = self.folder / tag if tag else self.folder
            self.written.append(save_png(target / f"{slug(name.split('/')[-1])}.png", image))
        for lg in self.wandb_loggers:
            lg.log_image(key=name, images=[image], caption=[caption] if caption else None, step=step)


def wandb_loggers_of(loggers: Sequence) -> list:
    """The W&B loggers among Lightning loggers (none when W&B is disabled)."""
    import os

    from lightning.pytorch.loggers import WandbLogger

    if os.environ.get("WANDB_MODE") == "disabled":
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def wrap(text: str, width: int) -> str:
    """Wrap each line of a title to about `width` characters (titles must not run off the figure)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def patch_grid(
    rows: Sequence[Sequence],
    texts: Sequence[Sequence[str]],
    column_titles: Sequence[str],
    title: str,
    text_colours: Sequence[Sequence[str]] | None = None,
    row_labels: Sequence[str] = (),
) -> np.ndarray:
    """Patches in a grid (None leaves a cell empty), a caption under each, titled columns."""
    plt = pyplot()
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(1.6 * nc + (0.6 if row_labels else 0), 1.85 * nr + 0.7), squeeze=False)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            patch = rows[r][c] if c < len(rows[r]) else None
            if patch is None:
                ax.axis("off")
                continue
            ax.imshow(patch_rgb(patch))
            colour = text_colours[r][c] if text_colours else "black"
            ax.set_xlabel(texts[r][c], fontsize=8, color=colour)
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(wrap(title, width=int(13 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)
