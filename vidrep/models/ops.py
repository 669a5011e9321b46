"""CaffeNet's layers in forms that run faster on some hardware, each equal to the plain one.

Every form keeps the plain layer's parameters (names and shapes), so checkpoints and state dicts
load into any of them; which one runs is a constructor argument of `CaffeNet` (vidrep/conf/model/caffenet.yaml).
The choice is measured, not assumed: bench/ops.py times each form on CPU, and bench/gpu.py
(`--override model.net.trunk.<key>=<value>`) on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRN_IMPLS = ("torch", "slices")
GROUPED_IMPLS = ("grouped", "split", "dense")


def lrn_slices(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """Local response normalisation across channels, as `nn.LocalResponseNorm`:
    x_c / (k + alpha / size * sum of x_{c'}^2 over the `size` channels around c)^beta.
    The window sum is `size` shifted channel slices of the zero-padded squares: plain elementwise
    ops that torch.compile fuses into one kernel and that keep x's memory format (PyTorch's own
    goes through avg_pool3d on a 5-D view, which forces a layout change under channels_last)."""
    channels = x.shape[1]
    sq = F.pad(x * x, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    total = sq[:, 0:channels]
    for i in range(1, size):
        total = total + sq[:, i : i + channels]
    return x / (k + (alpha / size) * total).pow(beta)


class LRN(nn.LocalResponseNorm):
    """`nn.LocalResponseNorm` with a choice of implementation (`impl`, one of LRN_IMPLS)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, impl: str = "torch") -> None:
        if impl not in LRN_IMPLS:
            raise ValueError(f"unknown LRN implementation {impl!r}; choose from {LRN_IMPLS}")
        super().__init__(size, alpha, beta, k)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "slices":
            return lrn_slices(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class GroupedConv2d(nn.Conv2d):
    """A grouped convolution (weight [out, in / groups, kh, kw], as nn.Conv2d) computed as
    `impl`: grouped (one grouped call), split (one dense call per group, outputs concatenated) or
    dense (one dense call with the block-diagonal weight: more FLOPs, but the kernels libraries tune
    best)."""

    def __init__(self, *args, impl: str = "grouped", **kwargs) -> None:
        if impl not in GROUPED_IMPLS:
            raise ValueError(f"unknown grouped-convolution implementation {impl!r}; choose from {GROUPED_IMPLS}")
        super().__init__(*args, **kwargs)
        self.impl = impl

    def block_diagonal_weight(self) -> Tensor:
        """[out, in, kh, kw] with the groups' weights on the diagonal, zeros elsewhere
        (differentiable: the zeros get no gradient into the parameter)."""
        g = self.groups
        w = self.weight.view(g, self.out_channels // g, *self.weight.shape[1:])
        eye = torch.eye(g, dtype=w.dtype, device=w.device)
        dense = torch.einsum("gocij,gh->gohcij", w, eye)
        return dense.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "grouped" or self.groups == 1:
            return super().forward(x)
        args = (self.stride, self.padding, self.dilation)
        if self.impl == "dense":
            return F.conv2d(x, self.block_diagonal_weight(), self.bias, *args)
        xs = x.chunk(self.groups, dim=1)
        ws = self.weight.chunk(self.groups, dim=0)
        bs = self.bias.chunk(self.groups) if self.bias is not None else [None] * self.groups
        return torch.cat([F.conv2d(xi, wi, bi, *args) for xi, wi, bi in zip(xs, ws, bs)], dim=1)


class PaddedInputConv2d(nn.Conv2d):
    """A convolution whose input is zero-padded to `pad_to` channels (4 instead of RGB's 3: a
    channel count tensor-core kernels take), with zero weights for the added channels, so the
    output is unchanged. The stored weight keeps its `in_channels` (state dicts do not change);
    the padded weight is built in the forward pass."""

    def __init__(self, *args, pad_to: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if pad_to is not None and pad_to < self.in_channels:
            raise ValueError(f"pad_to={pad_to} is fewer than the {self.in_channels} input channels")
        self.pad_to = pad_to

    def forward(self, x: Tensor) -> Tensor:
        extra = 0 if self.pad_to is None else self.pad_to - self.in_channels
        if extra == 0:
            return super().forward(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, extra))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
