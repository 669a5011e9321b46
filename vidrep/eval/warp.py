"""R-CNN's region crop (rbgirshick/rcnn, rcnn_im_crop.m, crop_mode 'warp'), batched on the device.

Each proposal is grown so that, once warped to crop_size x crop_size, `padding` pixels of context
surround it (scale = crop_size / (crop_size - 2 * padding) about the box centre, rounded to whole
pixels as MATLAB rounds, half away from zero); the grown box is clipped to the image, and the part
that lies outside the image stays zero in the network's input (R-CNN subtracts the mean, then pads
with zeros: the mean colour). The clipped window is resized without antialiasing, bilinearly with
MATLAB's half-pixel mapping (x_in = (x_out + 0.5) * in / out - 0.5, edges replicated), into its
rounded place in the crop.

All regions of one image are sampled with a single `grid_sample` over the image (no per-region
copy of the image), so memory is regions x crop_size^2 x 3 floats (128 regions at 227: 79 MB).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB's round: halves away from zero (numpy rounds them to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def crop_geometry(
    boxes: np.ndarray, height: int, width: int, crop_size: int = 227, padding: int = 16
) -> dict[str, np.ndarray]:
    """Per box (x1, y1, x2, y2, 0-based inclusive pixels): the image window read (0-based inclusive,
    clipped: "x1", "y1", "x2", "y2") and where its resized copy lands in the crop ("pad_x", "pad_y",
    "crop_w", "crop_h"), exactly as rcnn_im_crop.m computes them (in its 1-based pixels)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4) + 1.0  # rcnn_im_crop.m works in 1-based pixels
    n = len(b)
    if padding <= 0:
        window = b.copy()
        return {
            "x1": window[:, 0] - 1,
            "y1": window[:, 1] - 1,
            "x2": window[:, 2] - 1,
            "y2": window[:, 3] - 1,
            "pad_x": np.zeros(n),
            "pad_y": np.zeros(n),
            "crop_w": np.full(n, crop_size, float),
            "crop_h": np.full(n, crop_size, float),
        }
    scale = crop_size / (crop_size - padding * 2)
    half_h = (b[:, 3] - b[:, 1] + 1) / 2
    half_w = (b[:, 2] - b[:, 0] + 1) / 2
    cx, cy = b[:, 0] + half_w, b[:, 1] + half_h
    x1, y1 = matlab_round(cx - half_w * scale), matlab_round(cy - half_h * scale)
    x2, y2 = matlab_round(cx + half_w * scale), matlab_round(cy + half_h * scale)
    unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
    pad_x, pad_y = np.maximum(0, 1 - x1), np.maximum(0, 1 - y1)
    x1, y1 = np.maximum(1, x1), np.maximum(1, y1)
    x2, y2 = np.minimum(width, x2), np.minimum(height, y2)
    scale_x, scale_y = crop_size / unclipped_w, crop_size / unclipped_h
    crop_w = matlab_round((x2 - x1 + 1) * scale_x)
    crop_h = matlab_round((y2 - y1 + 1) * scale_y)
    pad_x, pad_y = matlab_round(pad_x * scale_x), matlab_round(pad_y * scale_y)
    crop_h = np.minimum(crop_h, crop_size - pad_y)
    crop_w = np.minimum(crop_w, crop_size - pad_x)
    return {
        "x1": x1 - 1,
        "y1": y1 - 1,
        "x2": x2 - 1,
        "y2": y2 - 1,
        "pad_x": pad_x,
        "pad_y": pad_y,
        "crop_w": np.maximum(crop_w, 1),
        "crop_h": np.maximum(crop_h, 1),
    }


def _axis_coords(lo: Tensor, hi: Tensor, pad: Tensor, size: Tensor, crop_size: int) -> tuple[Tensor, Tensor]:
    """Source pixel coordinate per output position along one axis ([R, S]) and whether it is inside
    the pasted window."""
    u = torch.arange(crop_size, device=lo.device, dtype=torch.float64)[None] - pad[:, None]
    inside = (u >= 0) & (u < size[:, None])
    extent = hi - lo + 1
    src = (u + 0.5) * (extent / size)[:, None] - 0.5
    src = torch.minimum(torch.clamp(src, min=0.0), (extent - 1)[:, None]) + lo[:, None]
    return src, inside


def warp_regions(image: Tensor, boxes: np.ndarray, crop_size: int = 227, padding: int = 16) -> tuple[Tensor, Tensor]:
    """(crops [R, C, S, S] float, mask [R, 1, S, S] bool) of `image` ([C, H, W], any float or uint8
    tensor on the device) at `boxes`; pixels where mask is False are R-CNN's zero padding: set them
    to zero after the network's mean subtraction."""
    c, h, w = image.shape
    g = {
        k: torch.as_tensor(v, dtype=torch.float64, device=image.device)
        for k, v in crop_geometry(boxes, h, w, crop_size, padding).items()
    }
    xs, in_x = _axis_coords(g["x1"], g["x2"], g["pad_x"], g["crop_w"], crop_size)
    ys, in_y = _axis_coords(g["y1"], g["y2"], g["pad_y"], g["crop_h"], crop_size)
    r = len(xs)
    # align_corners=True: -1 and 1 are the centres of the first and last pixel
    gx = (xs / max(w - 1, 1) * 2 - 1)[:, None, :].expand(r, crop_size, crop_size)
    gy = (ys / max(h - 1, 1) * 2 - 1)[:, :, None].expand(r, crop_size, crop_size)
    grid = torch.stack([gx, gy], -1).to(torch.float32).reshape(1, r * crop_size, crop_size, 2)
    out = F.grid_sample(image.float()[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    crops = out.reshape(c, r, crop_size, crop_size).transpose(0, 1)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return crops, mask
