"""Per-patch transforms run in the data-loader workers (decode, resize, flip).

Patches stay uint8 until they reach the device: 4x less to copy than float, and the mean
subtraction of method.md section 4 happens there (see `vidrep.training.module`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg


class PatchTransform:
    """JPEG bytes -> uint8 [3, size, size] RGB, flipped horizontally with probability `flip_p`."""

    def __init__(self, input_size: int = 227, flip_p: float = 0.5) -> None:
        self.input_size = input_size
        self.flip_p = flip_p

    def __call__(self, jpeg: bytes) -> torch.Tensor:
        img = decode_jpeg(torch.from_numpy(np.frombuffer(jpeg, np.uint8).copy()))
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if img.shape[-2:] != (self.input_size, self.input_size):
            resized = F.interpolate(img[None].float(), size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            img = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        if self.flip_p > 0 and torch.rand(()) < self.flip_p:
            img = img.flip(-1)
        return img.contiguous()
