"""CaffeNet-ordered AlexNet (the trunk of the released video-triplet model) with named features.

Layer names match the Caffe model so checkpoints move between the triplet module, fine-tuning and
feature extraction without key juggling. conv1..conv5 features are the post-ReLU activations of
each convolution (before pooling and LRN); pool5 is the flattened 256x6x6 map at 227 input; fc6
and fc7 are post-ReLU (fc7 raw with `final_relu=False`: an embedding whose units cannot all be zero
and that keeps its sign; same parameters, same state dict); fc8 (a network converted from Caffe that
has one, e.g. BVLC's CaffeNet) is its raw scores.

A network converted from Caffe (vidrep/models/caffe.py) also takes its input as Caffe did, inside
the trunk, so every consumer keeps the one rule "0-255 RGB minus `pixel_mean`": `bgr` reorders the
channels, `gray` replaces them by the grey image (3 equal channels), and a mean image (`mean_image`
buffer, `mean_image_size` [H, W]) is subtracted instead of channel means. `pool_ceil` is Caffe's
pooling arithmetic (output side ceil((size - 3) / 2) + 1; equal to PyTorch's floor at 227).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidrep.models.ops import LRN, GroupedConv2d, PaddedInputConv2d
from vidrep.models.trunk import Trunk

FEATURE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7")
# ITU-R BT.601 luma, as OpenCV's cvtColor(..., COLOR_BGR2GRAY) weighs R, G, B.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Channel means of the released mean image, in RGB order (the Caffe file is BGR 96.64, 102.75, 107.99).
PIXEL_MEAN = (107.99, 102.75, 96.64)
# Goyal et al.'s AlexNet VOC07 benchmark (facebookresearch/fair_self_supervision_benchmark,
# configs/benchmark_tasks/image_classification/voc07/*_extract_features.yaml: conv1_s4k19_resize,
# conv2_s3k12_resize, conv3_s1k9_resize, conv4_s1k9_resize, conv5_s1k8_resize): average pooling with
# these (kernel, stride) per layer, 9,216-9,600 values at 227 input.
GOYAL_POOLING = {"conv1": (19, 4), "conv2": (12, 3), "conv3": (9, 1), "conv4": (9, 1), "conv5": (8, 1)}


class _AlexNetInterface(Trunk):
    """The trunk interface (vidrep/models/trunk.py) as both AlexNets declare it."""

    feature_layers = FEATURE_LAYERS
    benchmark_layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
    fixed_pooling = GOYAL_POOLING
    pooled_layer = "pool5"
    # Fast R-CNN's RoI pooling of conv5 (stride 4 x 2 x 2) to pool5's 6x6 grid.
    region_layer = "conv5"
    region_stride = 16
    region_cells = 6
    head_prefixes = ("fc6.", "fc7.")
    pixel_mean = PIXEL_MEAN


def _conv_out(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _pool_out(size: int, ceil: bool) -> int:
    return -(-(size - 3) // 2) + 1 if ceil else _conv_out(size, 3, 2)


def pool5_size(input_size: int, ceil: bool = False) -> int:
    """Spatial side of pool5 for a square input (227 -> 55 -> 27 -> 13 -> 6); `ceil`: Caffe's pooling."""
    s = _conv_out(input_size, 11, 4)
    for _ in range(3):
        s = _pool_out(s, ceil)
    if s < 1:
        raise ValueError(f"input_size {input_size} is too small for the CaffeNet trunk; use >= 67")
    return s


def _check_layers(layers: Iterable[str], known: tuple[str, ...] = FEATURE_LAYERS) -> set[str]:
    wanted = set(layers)
    unknown = wanted - set(known)
    if unknown:
        raise ValueError(f"unknown feature layers {sorted(unknown)}; choose from {known}")
    return wanted


def fit_mean_image(mean: Tensor, height: int, width: int) -> Tensor:
    """A [C, H, W] mean image for an input of height x width: its centre crop when the input fits
    inside it (R-CNN's rcnn_create_model.m crops ilsvrc_2012_mean's 256x256 to 227x227 at offset
    floor((256 - 227) / 2), as Caffe's DataTransformer crops mean_file with crop_size), else resized
    bilinearly (larger inputs, e.g. whole images for RoI pooling: a case neither covers)."""
    h, w = mean.shape[-2:]
    if height <= h and width <= w:
        top, left = (h - height) // 2, (w - width) // 2
        return mean[:, top : top + height, left : left + width]
    return F.interpolate(mean[None], size=(height, width), mode="bilinear", align_corners=False)[0]


INITS = ("gaussian", "kaiming")


def caffe_init(layers: list[nn.Module], conv_std: float, fc_std: float, bias_one: bool, init: str = "gaussian") -> None:
    """The released initialisation of conv1..conv5, fc6, fc7: Gaussian weights (std `conv_std` for
    convolutions, `fc_std` for fc layers); bias 0 for conv1 and conv3, 1 elsewhere (0 everywhere
    when `bias_one` is false). `init="kaiming"` draws each layer's weights with std sqrt(2 / fan_in)
    instead, so that activations keep their scale through the layers."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    for i, layer in enumerate(layers, start=1):
        if init == "kaiming":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        else:
            nn.init.normal_(layer.weight, std=conv_std if isinstance(layer, nn.Conv2d) else fc_std)
        nn.init.constant_(layer.bias, 1.0 if bias_one and i not in (1, 3) else 0.0)


class CaffeNet(_AlexNetInterface):
    """96-256-384-384-256 convolutions with LRN and 2 groups, then fc6 and fc7 (ReLU, no dropout).

    Equal-output implementation choices (vidrep/models/ops.py; parameters and state dicts are the
    same for all): `lrn` torch | slices, `conv1_in_channels` 3 | 4 (RGB plus a zero channel with
    zero weights), `grouped_conv` grouped | split | dense for conv2, conv4 and conv5.

    Caffe's conventions, for networks converted from Caffe (module doc): `fc8_dim` (0: none),
    `bgr`, `gray`, `mean_image_size` ([H, W] of the mean image in the state dict, in the network's
    channel order; None: channel means only), `pixel_mean` (this network's channel means, RGB; None:
    the class's), `pool_ceil`. `final_relu` false leaves fc7 without its ReLU (the released network has it)."""

    def __init__(
        self,
        input_size: int = 227,
        fc6_dim: int = 4096,
        fc7_dim: int = 1024,
        conv_std: float = 0.01,
        fc_std: float = 0.005,
        bias_one: bool = True,
        init: str = "gaussian",
        lrn: str = "torch",
        conv1_in_channels: int = 3,
        grouped_conv: str = "grouped",
        fc8_dim: int = 0,
        bgr: bool = False,
        gray: bool = False,
        mean_image_size: list[int] | None = None,
        pixel_mean: list[float] | None = None,
        pool_ceil: bool = False,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.final_relu = final_relu
        self.bgr, self.gray = bgr, gray
        if pixel_mean is not None:
            if len(pixel_mean) != 3:
                raise ValueError(f"pixel_mean must be 3 channel means (RGB), got {pixel_mean}")
            self.pixel_mean = tuple(float(v) for v in pixel_mean)
        mean_image = None if mean_image_size is None else torch.zeros(3, *mean_image_size)
        self.register_buffer("mean_image", mean_image)
        if fc8_dim:
            self.feature_layers = (*FEATURE_LAYERS, "fc8")
            self.head_prefixes = (*self.head_prefixes, "fc8.")
        self.conv1 = PaddedInputConv2d(3, 96, 11, stride=4, pad_to=conv1_in_channels)
        self.conv2 = GroupedConv2d(96, 256, 5, padding=2, groups=2, impl=grouped_conv)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = GroupedConv2d(384, 384, 3, padding=1, groups=2, impl=grouped_conv)
        self.conv5 = GroupedConv2d(384, 256, 3, padding=1, groups=2, impl=grouped_conv)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=pool_ceil)
        # Caffe's LRN divides alpha by the window size, as PyTorch's LocalResponseNorm does.
        self.norm = LRN(5, alpha=1e-4, beta=0.75, k=1.0, impl=lrn)
        self.relu = nn.ReLU(inplace=False)
        side = pool5_size(input_size, pool_ceil)
        self.fc6 = nn.Linear(256 * side * side, fc6_dim)
        self.fc7 = nn.Linear(fc6_dim, fc7_dim)
        self.fc8 = nn.Linear(fc7_dim, fc8_dim) if fc8_dim else None
        self.reset_parameters(conv_std, fc_std, bias_one, init)

    def reset_parameters(self, conv_std: float, fc_std: float, bias_one: bool, init: str = "gaussian") -> None:
        layers = [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.fc6, self.fc7]
        caffe_init(layers + ([self.fc8] if self.fc8 is not None else []), conv_std, fc_std, bias_one, init)

    def caffe_input(self, x: Tensor) -> Tensor:
        """0-255 RGB minus `pixel_mean` -> the input Caffe gave the network (grey, BGR, minus the
        mean image): the same linear steps applied to the subtracted channel means tell what to add
        back, so only the mean image's difference from them is subtracted here."""
        base = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device)
        if self.gray:
            weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
            x = torch.einsum("nchw,c->nhw", x, weights).unsqueeze(1).expand(-1, 3, -1, -1)
            base = (base @ weights).expand(3)
        if self.bgr:
            x, base = x.flip(1), base.flip(0)
        if self.mean_image is not None:
            mean = fit_mean_image(self.mean_image.to(x.dtype), x.shape[-2], x.shape[-1])
            x = x - (mean - base.view(3, 1, 1))
        return x

    @property
    def out_dim(self) -> int:
        return self.fc7.out_features

    def forward_features(self, x: Tensor, layers: Iterable[str] = FEATURE_LAYERS) -> dict[str, Tensor]:
        """Named intermediate features; stops after the deepest layer asked for."""
        names = self.feature_layers
        wanted = _check_layers(layers, names)
        last = max(names.index(name) for name in wanted)
        out: dict[str, Tensor] = {}

        def keep(name: str, value: Tensor) -> bool:
            if name in wanted:
                out[name] = value
            return names.index(name) < last

        if self.bgr or self.gray or self.mean_image is not None:
            x = self.caffe_input(x)
        x = self.relu(self.conv1(x))
        if not keep("conv1", x):
            return out
        x = self.relu(self.conv2(self.norm(self.pool(x))))
        if not keep("conv2", x):
            return out
        x = self.relu(self.conv3(self.norm(self.pool(x))))
        if not keep("conv3", x):
            return out
        x = self.relu(self.conv4(x))
        if not keep("conv4", x):
            return out
        x = self.relu(self.conv5(x))
        if not keep("conv5", x):
            return out
        x = torch.flatten(self.pool(x), 1)
        if not keep("pool5", x):
            return out
        x = self.relu(self.fc6(x))
        if not keep("fc6", x):
            return out
        x = self.fc7(x)
        if self.final_relu:
            x = self.relu(x)
        if keep("fc7", x):
            keep("fc8", self.fc8(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, ("fc7",))["fc7"]


class TorchvisionAlexNet(_AlexNetInterface):
    """torchvision's AlexNet variant (64-192-384-256-256, no LRN, no groups) with the same named
    features and fc6/fc7 head; offered for comparison, not the paper's trunk."""

    def __init__(
        self,
        input_size: int = 227,
        fc6_dim: int = 4096,
        fc7_dim: int = 1024,
        conv_std: float = 0.01,
        fc_std: float = 0.005,
        bias_one: bool = True,
        init: str = "gaussian",
        lrn: str = "torch",
        conv1_in_channels: int = 3,
        grouped_conv: str = "grouped",
        final_relu: bool = True,
    ) -> None:
        # The CaffeNet implementation choices are accepted so that vidrep/conf/model/torchvision_alexnet.yaml
        # composes on caffenet.yaml; this net has no LRN and no groups, and they change nothing here.
        super().__init__()
        from torchvision.models import alexnet

        features = alexnet(weights=None).features
        self.input_size = input_size
        self.final_relu = final_relu
        self.convs = nn.ModuleList([features[i] for i in (0, 3, 6, 8, 10)])
        self.pool = nn.MaxPool2d(3, stride=2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            side = self._trunk(torch.zeros(1, 3, input_size, input_size))["pool5"].shape[1]
        self.fc6 = nn.Linear(side, fc6_dim)
        self.fc7 = nn.Linear(fc6_dim, fc7_dim)
        caffe_init([*self.convs, self.fc6, self.fc7], conv_std, fc_std, bias_one, init)

    @property
    def out_dim(self) -> int:
        return self.fc7.out_features

    def _trunk(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, conv in enumerate(self.convs, start=1):
            x = self.relu(conv(x))
            out[f"conv{i}"] = x
            if i in (1, 2, 5):
                x = self.pool(x)
        out["pool5"] = torch.flatten(x, 1)
        return out

    def forward_features(self, x: Tensor, layers: Iterable[str] = FEATURE_LAYERS) -> dict[str, Tensor]:
        wanted = _check_layers(layers)
        feats = self._trunk(x)
        if wanted & {"fc6", "fc7"}:
            feats["fc6"] = self.relu(self.fc6(feats["pool5"]))
            feats["fc7"] = self.fc7(feats["fc6"])
            if self.final_relu:
                feats["fc7"] = self.relu(feats["fc7"])
        return {name: feats[name] for name in FEATURE_LAYERS if name in wanted}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, ("fc7",))["fc7"]
