"""Per-patch transforms run in the data-loader workers (decode, resize, flip).

Patches stay uint8 until they reach the device: 4x less to copy than float, and the mean
subtraction of method.md section 4 happens there (see `vidrep.training.module`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


class PatchTransform:
    """JPEG bytes -> uint8 [3, size, size] RGB, flipped horizontally with probability `flip_p`."""

    def __init__(self, input_size: int = 227, flip_p: float = 0.5) -> None:
        self.input_size = input_size
        self.flip_p = flip_p

    def __call__(self, jpeg: bytes) -> torch.Tensor:
        # OpenCV rather than torchvision.io.decode_jpeg, which torchvision deprecates for TorchCodec.
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("a corpus patch is not a decodable JPEG; the shard may be damaged (re-mine its videos)")
        if img.shape[:2] != (self.input_size, self.input_size):
            img = cv2.resize(img, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if self.flip_p > 0 and torch.rand(()) < self.flip_p:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
