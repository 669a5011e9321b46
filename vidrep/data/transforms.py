"""Per-patch transforms run in the data-loader workers (decode, resize, flip).

Patches stay uint8 until they reach the device: 4x less to copy than float, and the mean
subtraction of method.md section 4 happens there (see `vidrep.training.module`).
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import torch

DECODERS = ("opencv", "torchvision", "device")


class PatchTransform:
    """JPEG bytes -> uint8 [3, size, size] RGB, flipped horizontally with probability `flip_p`.

    `decoder` (measured by `bench/loader.py`, one core): "opencv" (`cv2.imdecode`) is the faster
    at 227 input, where the corpus patches need no resizing (~4,100 vs ~3,100 patches/s);
    "torchvision" (`torchvision.io.decode_jpeg` + antialiased resize) is the faster when patches
    are resized (99 input: ~2,800 vs ~2,150, OpenCV's area resize being slow at non-integer
    factors). Both give the same pixels at 227 (mean difference 0.00) and within 0.6 of 255 at 99.
    """

    def __init__(self, input_size: int = 227, flip_p: float = 0.5, decoder: str = "opencv") -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
        self.input_size, self.flip_p, self.decoder = input_size, flip_p, decoder

    def _torchvision(self, jpeg: bytes) -> torch.Tensor:
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2.functional import resize

        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoding for TorchCodec (docs/training.md "Dependencies"
            # has the plan); it still decodes below the <0.30 cap, and the warning is one a user cannot act on.
            warnings.simplefilter("ignore")
            img = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
        if img.shape[-2:] != (self.input_size, self.input_size):
            img = resize(img, [self.input_size, self.input_size], antialias=True)
        return img

    def _opencv(self, jpeg: bytes) -> torch.Tensor:
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise RuntimeError("not a JPEG")
        if img.shape[:2] != (self.input_size, self.input_size):
            img = cv2.resize(img, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)))

    def __call__(self, jpeg: bytes, flip: bool | None = None) -> torch.Tensor:
        """`flip`: whether to flip (as the training sampler draws it); None: at random with `flip_p`."""
        if self.decoder == "device":
            return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        try:
            img = self._torchvision(jpeg) if self.decoder == "torchvision" else self._opencv(jpeg)
        except RuntimeError:
            raise ValueError(
                "a corpus patch is not a decodable JPEG; the shard may be damaged (re-mine its videos)"
            ) from None
        if flip is None:
            flip = self.flip_p > 0 and bool(torch.rand(()) < self.flip_p)
        if flip:
            img = img.flip(-1)
        return img.contiguous()


def pack_jpegs(jpegs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG byte tensors -> (their bytes end to end, their lengths). A batch crosses from a loader
    worker to the trainer, and is pinned, one tensor at a time: two tensors instead of hundreds
    of small ones (each a shared-memory segment and a pinned buffer of its own)."""
    return torch.cat(jpegs), torch.tensor([len(j) for j in jpegs], dtype=torch.int64)


def unpack_jpegs(data: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `pack_jpegs`: views into `data`, no copies."""
    return list(torch.split(data, lengths.tolist()))


def decode_batch(
    jpegs: list[torch.Tensor],
    size: int,
    device: torch.device | str,
    flip_p: float = 0.0,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """JPEG byte tensors (on the CPU) -> uint8 [N, 3, size, size] RGB on `device`: decoded there in
    one batched call (nvJPEG on CUDA), resized like the "torchvision" decoder, flipped horizontally
    where `flips` (bool [N], the training sampler's draws) says, or else each with probability
    `flip_p` (torch's global generator)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resize

    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            images = decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise ValueError(
                f"a corpus patch is not a decodable JPEG ({e}); the shard may be damaged (re-mine its videos)"
            ) from None
    images = [img if img.shape[-2:] == (size, size) else resize(img, [size, size], antialias=True) for img in images]
    batch = torch.stack(images)
    if flips is None and flip_p > 0:
        flips = torch.rand(len(batch)) < flip_p
    if flips is not None:
        batch = torch.where(flips.to(device, non_blocking=True)[:, None, None, None], batch.flip(-1), batch)
    return batch
