"""torchvision's ResNet-18 as the trunk, with the same fc6/fc7 embedding head as CaffeNet.

Not the paper's network: a second trunk family, to show that training and every evaluation
protocol take any trunk by config (vidrep/conf/model/resnet18.yaml). Features: conv1 (after BN and ReLU,
stride 2), layer1..layer4 (strides 4, 8, 16, 32), avgpool (512, global average of layer4), fc6,
fc7 (post-ReLU, as CaffeNet's).

The input is the project's convention, 0-255 RGB minus `pixel_mean` (ImageNet's mean x 255), not
torchvision's (x / 255 - mean) / std: torchvision weights read from a local file (`weights`) get
their per-channel 1 / (255 std) folded into conv1's weights, which is exact because conv1 has no
bias, so every consumer of a trunk keeps one preprocessing rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidrep.models.trunk import Trunk
from vidrep.models.weights import read_weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc6", "fc7")
# Average pooling (kernel, stride) per layer for `pooling=goyal`, giving 8,192-9,216 values at 224
# input as Goyal et al.'s AlexNet kernels do at 227: conv1 64x112x112 -> 12x12, layer1 64x56x56 ->
# 12x12, layer2 128x28x28 -> 8x8, layer3 256x14x14 -> 6x6, layer4 512x7x7 -> 4x4. Goyal et al.
# published kernels for AlexNet and ResNet-50 only: these are ours (a deviation).
RESNET18_POOLING = {"conv1": (13, 9), "layer1": (12, 4), "layer2": (7, 3), "layer3": (4, 2), "layer4": (4, 1)}
HEAD_INITS = ("kaiming", "gaussian")


class WeightsFileError(ValueError):
    """A torchvision weights file that is missing or holds something else; the message names it."""


def load_torchvision_resnet18(body: nn.Module, path: str | Path) -> None:
    """torchvision's ResNet-18 state_dict from the local file `path` into `body` (never downloads)."""
    state = read_weights_file(
        path,
        "ResNet-18",
        "Put torchvision's resnet18-f37072fd.pth (torchvision.models.ResNet18_Weights.IMAGENET1K_V1) there, or set "
        "model.net.trunk.weights=null for a random init",
        WeightsFileError,
    )
    try:
        body.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsFileError(f"{path} is not a torchvision ResNet-18 state_dict: {str(e)[:300]}") from None


class ResNet18Trunk(Trunk):
    """ResNet-18's stem and four stages, global average pooling, then fc6 and fc7 (ReLU, no dropout)."""

    feature_layers = RESNET18_LAYERS
    benchmark_layers = ("conv1", "layer1", "layer2", "layer3", "layer4")
    fixed_pooling = RESNET18_POOLING
    pooled_layer = "avgpool"
    # RoI pooling of layer4 to its 7x7 map at 224 input, then the trunk's own global average.
    region_layer = "layer4"
    region_stride = 32
    region_cells = 7
    head_prefixes = ("fc6.", "fc7.")
    pixel_mean = tuple(255.0 * m for m in IMAGENET_MEAN)
    # The weights file's effect is in the state dict; a rebuild from a checkpoint must not need it.
    rebuild_defaults = {"weights": None}

    def __init__(
        self,
        input_size: int = 224,
        fc6_dim: int = 4096,
        fc7_dim: int = 1024,
        fc_std: float = 0.005,
        bias_one: bool = False,
        init: str = "kaiming",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        if init not in HEAD_INITS:
            raise ValueError(f"unknown init {init!r} for the fc6/fc7 head; choose from {HEAD_INITS}")
        body = resnet18(weights=None)
        if weights:
            load_torchvision_resnet18(body, weights)
            with torch.no_grad():
                body.conv1.weight.div_(255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.input_size = input_size
        self.conv1, self.bn1, self.relu, self.maxpool = body.conv1, body.bn1, body.relu, body.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = body.layer1, body.layer2, body.layer3, body.layer4
        self.fc6 = nn.Linear(body.fc.in_features, fc6_dim)
        self.fc7 = nn.Linear(fc6_dim, fc7_dim)
        for layer in (self.fc6, self.fc7):
            if init == "kaiming":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            else:
                nn.init.normal_(layer.weight, std=fc_std)
            nn.init.constant_(layer.bias, 1.0 if bias_one else 0.0)

    @property
    def out_dim(self) -> int:
        return self.fc7.out_features

    def forward_features(self, x: Tensor, layers: Iterable[str] = RESNET18_LAYERS) -> dict[str, Tensor]:
        """Named intermediate features; stops after the deepest layer asked for."""
        wanted = self.check_layers(layers)
        last = max(RESNET18_LAYERS.index(name) for name in wanted)
        out: dict[str, Tensor] = {}
        steps = (
            ("conv1", lambda t: self.relu(self.bn1(self.conv1(t)))),
            ("layer1", lambda t: self.layer1(self.maxpool(t))),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", self.layer4),
            ("avgpool", lambda t: torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)),
            ("fc6", lambda t: F.relu(self.fc6(t))),
            ("fc7", lambda t: F.relu(self.fc7(t))),
        )
        for name, step in steps[: last + 1]:
            x = step(x)
            if name in wanted:
                out[name] = x
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, ("fc7",))["fc7"]

    def pool_regions(self, cells: Tensor) -> Tensor:
        """RoI-pooled layer4 cells averaged, as avgpool averages the whole map."""
        return cells.mean(dim=(2, 3))
