"""Image reading shared by the detection stages (fine-tuning windows, region features, test)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_rgb(path: str | Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB; FileNotFoundError naming the file when OpenCV cannot read it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}: check that it exists and is a JPEG/PNG")
    return np.ascontiguousarray(img[:, :, ::-1])
