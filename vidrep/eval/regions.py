"""R-CNN's region features stage: the detection network and its outputs on one image's boxes.

`DetectionNet` is the network every later stage uses (fine-tuning trains it, the SVMs and the test
read its features). Regions are either warped crops (`warp`, R-CNN: each box plus 16 px of context
warped to the network input, vidrep/eval/warp.py) or RoI-pooled cells of the trunk's `region_layer`
from one pass per image (`roi_pool`, Fast R-CNN's; faster, not the paper's regions). The trunk's
layers, sizes and body come from its interface (vidrep/models/trunk.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from vidrep.eval.images import read_rgb
from vidrep.eval.warp import warp_regions
from vidrep.models.trunk import Trunk

REGION_MODES = ("warp", "roi_pool")


class DetectionNet(nn.Module):
    """The trunk's body, fc6, fc7 (dropout in training) and a (classes + background) classifier over
    regions that are either warped crops (`warp`) or RoI-pooled cells of the trunk's `region_layer`
    (`roi_pool`). Its "pool5" output is the trunk's `pooled_layer` (pool5 for the AlexNets, avgpool
    for ResNet-18), or the RoI-pooled cells finished as the trunk finishes that layer."""

    def __init__(
        self,
        trunk: Trunk,
        num_classes: int,
        regions: str,
        input_size: int,
        fc6_dim: int = 4096,
        fc7_dim: int = 4096,
        dropout: float = 0.5,
        keep_fc: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = trunk  # only its body is used
        self.regions = regions
        shapes = trunk.feature_shapes(input_size)
        if regions == "warp":
            in_dim = shapes[trunk.pooled_layer][0]
        else:
            cells = torch.zeros(1, shapes[trunk.region_layer][0], trunk.region_cells, trunk.region_cells)
            in_dim = trunk.pool_regions(cells).shape[1]
        theirs = (getattr(trunk, "fc6", None), getattr(trunk, "fc7", None))
        if keep_fc and all(isinstance(m, nn.Linear) for m in theirs) and theirs[0].in_features == in_dim:
            self.fc6, self.fc7 = copy.deepcopy(theirs[0]), copy.deepcopy(theirs[1])
        else:
            self.fc6, self.fc7 = nn.Linear(in_dim, fc6_dim), nn.Linear(fc6_dim, fc7_dim)
            for layer in (self.fc6, self.fc7):
                nn.init.normal_(layer.weight, std=0.005)
                nn.init.zeros_(layer.bias)
        self.cls = nn.Linear(self.fc7.out_features, num_classes + 1)
        nn.init.normal_(self.cls.weight, std=0.01)  # fc8_pascal: gaussian std 0.01, bias 0
        nn.init.zeros_(self.cls.bias)
        self.dropout = nn.Dropout(dropout)

    def head(self, pool5: Tensor) -> dict[str, Tensor]:
        fc7 = F.relu(self.fc7(self.dropout(F.relu(self.fc6(pool5)))))
        return {"pool5": pool5, "fc7": fc7, "logits": self.cls(self.dropout(fc7))}

    def warped(self, crops: Tensor) -> dict[str, Tensor]:
        """Regions already warped and mean-subtracted: [R, 3, S, S]."""
        layer = self.trunk.pooled_layer
        return self.head(self.trunk.forward_features(crops, (layer,))[layer])

    def pooled(self, image: Tensor, rois: Tensor) -> dict[str, Tensor]:
        """`rois` ([R, 4] in the resized image's pixels) of one image [1, 3, H, W], each axis scaled
        to the region layer's map by its own measured ratio (a portrait image's height is not its
        width; about 1 / `region_stride`, less the trunk's border arithmetic)."""
        t = self.trunk
        fmap = t.forward_features(image, (t.region_layer,))[t.region_layer]
        sy, sx = fmap.shape[-2] / image.shape[-2], fmap.shape[-1] / image.shape[-1]
        scaled = rois * torch.tensor([sx, sy, sx, sy], device=rois.device, dtype=rois.dtype)
        return self.head(t.pool_regions(roi_pool(fmap, [scaled], output_size=t.region_cells, spatial_scale=1.0)))


def region_outputs(p, model: DetectionNet, net, image: np.ndarray, boxes: np.ndarray, device: str) -> Callable:
    """A function of a chunk of box indices giving the model's outputs for those regions of `image`
    ([H, W, 3] uint8 RGB); `p` is the protocol's settings (regions, warp, roi_pool)."""
    if p.regions == "warp":
        img = torch.from_numpy(image.transpose(2, 0, 1)).to(device)

        def outputs(idx):
            crops, mask = warp_regions(img, boxes[idx], net.input_size, int(p.warp["padding"]))
            return model.warped(net.preprocess(crops) * mask)

        return outputs
    h, w = image.shape[:2]
    scale = min(float(p.roi_pool["scale"]) / min(h, w), float(p.roi_pool["max_size"]) / max(h, w))
    resized = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    x = net.preprocess(torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None].to(device))
    sy, sx = resized.shape[0] / h, resized.shape[1] / w

    def pooled(idx):
        rois = torch.from_numpy(boxes[idx] * np.array([sx, sy, sx, sy], np.float32)).float().to(device)
        return model.pooled(x, rois)

    return pooled


@torch.no_grad()
def region_features(p, model: DetectionNet, net, im, boxes: np.ndarray, device: str) -> np.ndarray:
    """[R, D] float32 features (`p.layer`: pool5 without fine-tuning, fc7 with) of `boxes` of one
    VOCImage, in batches of `p.warp["batch_size"]` regions."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return np.zeros((0, model.fc7.out_features if p.layer == "fc7" else model.fc6.in_features), np.float32)
    outputs = region_outputs(p, model, net, read_rgb(im.path), boxes, device)
    step = int(p.warp["batch_size"])
    return torch.cat(
        [outputs(np.arange(i, min(i + step, len(boxes))))[p.layer].float().cpu() for i in range(0, len(boxes), step)]
    ).numpy()


class RegionFeatures:
    """The SVMs' and the test's features of an image's boxes: every detector's features side by side
    (an ensemble concatenates its networks' fc7, as the paper's ensembles)."""

    def __init__(self, p, detectors, networks, device: str) -> None:
        self.p, self.detectors, self.networks, self.device = p, list(detectors), list(networks), device

    def __call__(self, im, boxes: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [region_features(self.p, m, n, im, boxes, self.device) for m, n in zip(self.detectors, self.networks)], 1
        )
