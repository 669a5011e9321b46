"""The `detection` protocol: the paper's R-CNN pipeline, made practical.

Selective-search proposals (opencv-contrib, cached per image) -> a detection network: the
checkpoint's conv1..conv5, RoI max-pooling of conv5 to 6x6 (Fast R-CNN's way of computing every
region's pool5 from one pass over the image, instead of warping each region), fc6/fc7 and a
(classes + background) classifier -> per-class linear SVMs on region features with hard-negative
mining -> NMS -> VOC detection AP at IoU 0.5. No bounding-box regression, as in the paper.

finetune=none: pool5 region features of the unsupervised net (no training) + SVMs.
finetune=straightforward: conv layers from the checkpoint, fc layers re-initialised, fine-tuned
  on region classification; SVMs on fc7.
finetune=iterative: fine-tune; copy its conv layers back into the triplet network and re-adapt it
  on mined pairs with the ranking loss; fine-tune again (`rounds` fine-tunings in all).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, nms, roi_pool

from vidrep.data.corpus import write_array
from vidrep.data.voc import VOCImage
from vidrep.eval.features import Network
from vidrep.eval.metrics import ap_of_curves, thin_curve, voc_detection_pr
from vidrep.eval.svm import fit_svm

log = logging.getLogger(__name__)
FINETUNE_MODES = ("none", "straightforward", "iterative")


# ---------------------------------------------------------------- proposals

def selective_search(image: np.ndarray, max_side: int = 500, mode: str = "fast", max_proposals: int = 2000, min_size: int = 8) -> np.ndarray:
    """[P, 4] float32 boxes x1, y1, x2, y2 (0-based, in `image`'s pixels), in the order OpenCV ranks them."""
    cv2.setNumThreads(1)
    scale = min(1.0, max_side / max(image.shape[:2]))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(small)
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    rects = ss.process().astype(np.float32)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] - 1], axis=1) / scale
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep][:max_proposals]


def cached_proposals(images: Sequence[VOCImage], folder: Path, settings: dict) -> list[np.ndarray]:
    """Selective search per image, stored as .npy under `folder` (one per data set and settings)."""
    folder = folder / "_".join(f"{k}{v}" for k, v in sorted(settings.items()))
    out = []
    for im in images:
        path = folder / f"{im.id}.npy"
        if not path.exists():
            write_array(path, selective_search(cv2.imread(str(im.path)), **settings))
        out.append(np.load(path))
    return out


# ---------------------------------------------------------------- the network

class DetectionNet(nn.Module):
    """Conv layers of a trunk, RoI pooling of conv5 to 6x6, fc6, fc7, a classifier."""

    def __init__(self, trunk: nn.Module, num_classes: int, fc6_dim: int = 4096, fc7_dim: int = 4096) -> None:
        super().__init__()
        self.trunk = trunk  # only its conv layers are used: forward_features(x, ["conv5"])
        self.fc6 = nn.Linear(256 * 6 * 6, fc6_dim)
        self.fc7 = nn.Linear(fc6_dim, fc7_dim)
        self.cls = nn.Linear(fc7_dim, num_classes + 1)
        for layer, std in ((self.fc6, 0.005), (self.fc7, 0.005), (self.cls, 0.01)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def regions(self, image: Tensor, rois: Tensor) -> dict[str, Tensor]:
        """pool5, fc7 and logits of `rois` ([R, 4] in the image's pixels) of one image [1, 3, H, W]."""
        conv5 = self.trunk.forward_features(image, ("conv5",))["conv5"]
        pool5 = torch.flatten(roi_pool(conv5, [rois], output_size=6, spatial_scale=conv5.shape[-1] / image.shape[-1]), 1)
        fc7 = F.relu(self.fc7(F.relu(self.fc6(pool5))))
        return {"pool5": pool5, "fc7": fc7, "logits": self.cls(fc7)}


def _image_tensor(im: VOCImage, net: Network, max_side: int, device: str) -> tuple[Tensor, float]:
    img = cv2.imread(str(im.path))
    scale = max_side / max(img.shape[:2])
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))[None].to(device)
    return net.preprocess(x), scale


def _gt0(im: VOCImage) -> np.ndarray:
    """Ground-truth boxes in 0-based pixels (VOC's XML is 1-based)."""
    return im.boxes - 1.0


@dataclass
class DetectionProtocol:
    finetune: str = "straightforward"
    rounds: int = 2  # fine-tunings for finetune=iterative
    image_size: int = 500  # longer image side for the network
    proposals: dict = field(default_factory=lambda: {"max_side": 500, "mode": "fast", "max_proposals": 2000})
    iterations: int = 40000  # fine-tuning SGD steps (2 images, 128 regions each)
    lr: float = 0.001
    lr_step: int = 30000
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fc_dim: int = 4096
    svm_cost: float = 1.0
    svm_negatives: int = 5000  # random negatives to start the hard-negative mining from
    hard_rounds: int = 2
    nms_iou: float = 0.3
    max_per_image: int = 100
    iou_threshold: float = 0.5
    use_07_metric: bool | None = None  # None: evaluate.py sets it from the year (11-point before VOC2010)
    adapt: dict = field(default_factory=lambda: {"corpus": None, "steps": 1000, "batch_size": 50, "lr": 0.001, "margin": 0.5})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"protocol.finetune={self.finetune!r}; choose from {FINETUNE_MODES}")
        if self.finetune == "iterative" and not self.adapt.get("corpus"):
            raise ValueError("finetune=iterative re-adapts on mined pairs: set protocol.adapt.corpus=<corpus dir>")

    def settings(self) -> dict:
        return {"name": "detection", **asdict(self)}

    # -------------------------------------------------------------- fine-tuning

    def _sample_rois(self, gt: np.ndarray, labels: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.concatenate([gt, props])
        if len(gt):
            iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()
            best, arg = iou.max(1), iou.argmax(1)
        else:
            best, arg = np.zeros(len(boxes)), np.zeros(len(boxes), int)
        fg = np.nonzero(best >= 0.5)[0]
        bg = np.nonzero((best < 0.5) & (best >= 0.1))[0]
        if len(bg) == 0:
            bg = np.nonzero(best < 0.5)[0]
        n_fg = min(len(fg), int(self.rois_per_image * self.fg_fraction))
        fg = rng.choice(fg, n_fg, replace=False) if n_fg else fg[:0]
        bg = rng.choice(bg, min(len(bg), self.rois_per_image - n_fg), replace=False) if len(bg) else bg
        idx = np.concatenate([fg, bg]).astype(int)
        target = np.where(np.isin(idx, fg), labels[arg[idx]] + 1 if len(gt) else 0, 0)
        return boxes[idx], target

    def _finetune(self, model: DetectionNet, net: Network, images, props, device: str) -> None:
        rng = np.random.default_rng(self.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.lr_step, 0.1)
        model.train()
        for step in range(self.iterations):
            loss = 0.0
            for i in rng.choice(len(images), 2, replace=len(images) < 2):
                im = images[i]
                x, scale = _image_tensor(im, net, self.image_size, device)
                keep = ~im.difficult
                rois, target = self._sample_rois(_gt0(im)[keep], im.labels[keep], props[i], rng)
                if rng.random() < 0.5:  # horizontal flip of image and regions
                    x = x.flip(-1)
                    w = x.shape[-1] / scale
                    rois = np.stack([w - 1 - rois[:, 2], rois[:, 1], w - 1 - rois[:, 0], rois[:, 3]], 1)
                out = model.regions(x, torch.from_numpy(rois * scale).float().to(device))
                loss = loss + F.cross_entropy(out["logits"], torch.from_numpy(target).long().to(device)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                log.info("fine-tuning step %d/%d: loss %.4f", step, self.iterations, loss.item())
        model.eval()

    def _adapt(self, trunk: nn.Module, net: Network, device: str) -> None:
        """Re-adapt a trunk on mined pairs with the ranking loss (random negatives)."""
        from vidrep.data.datamodule import PairDataModule
        from vidrep.losses import ranking_loss

        a = self.adapt
        dm = PairDataModule(str(a["corpus"]), batch_size=int(a["batch_size"]), num_workers=0, input_size=net.input_size,
                            val_fraction=0.0, persistent_workers=False, pin_memory=False)
        dm.setup()
        opt = torch.optim.SGD(trunk.parameters(), lr=float(a["lr"]), momentum=0.9, weight_decay=5e-4)
        trunk.train()
        step = 0
        while step < int(a["steps"]):
            for batch in dm.train_dataloader():
                emb = F.normalize(trunk(net.preprocess(torch.cat([batch["anchor"], batch["positive"]]).to(device))), dim=1)
                n = len(batch["anchor"])
                loss = ranking_loss(emb[:n], emb[n:], batch["video_id"].to(device), margin=float(a["margin"]),
                                    num_negatives=4, hard_ratio=0.0, symmetric=False, violators_only=False)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step >= int(a["steps"]):
                    break
        trunk.eval()

    def build_detector(self, net: Network, images, props, num_classes: int, device: str) -> DetectionNet:
        torch.manual_seed(self.seed)
        model = DetectionNet(copy.deepcopy(net.trunk), num_classes, self.fc_dim, self.fc_dim).to(device)
        if self.finetune == "none":
            return model.eval()
        rounds = self.rounds if self.finetune == "iterative" else 1
        triplet = copy.deepcopy(net.trunk).to(device)
        for r in range(rounds):
            log.info("fine-tuning round %d/%d", r + 1, rounds)
            self._finetune(model, net, images, props, device)
            if r + 1 < rounds:
                conv = {k: v for k, v in model.trunk.state_dict().items() if k.startswith(("conv", "convs"))}
                triplet.load_state_dict(conv, strict=False)
                self._adapt(triplet, net, device)
                conv = {k: v for k, v in triplet.state_dict().items() if k.startswith(("conv", "convs"))}
                model.trunk.load_state_dict(conv, strict=False)
                torch.manual_seed(self.seed + r + 1)
                fresh = DetectionNet(model.trunk, num_classes, self.fc_dim, self.fc_dim).to(device)
                model = fresh
        return model.eval()

    # -------------------------------------------------------------- region features, SVMs, test

    @torch.no_grad()
    def region_features(self, model: DetectionNet, net: Network, im: VOCImage, boxes: np.ndarray, device: str) -> np.ndarray:
        layer = "pool5" if self.finetune == "none" else "fc7"
        x, scale = _image_tensor(im, net, self.image_size, device)
        feats = [model.regions(x, torch.from_numpy(boxes[i : i + 512] * scale).float().to(device))[layer]
                 for i in range(0, len(boxes), 512)]
        f = torch.cat(feats) if feats else torch.zeros(0, model.fc7.out_features if layer == "fc7" else 9216)
        return F.normalize(f, dim=1).cpu().numpy()

    def run(self, networks: Sequence[Network], train: Sequence[VOCImage], test: Sequence[VOCImage],
            classes: Sequence[str], cache_dir: Path, data_key: str, device: str = "cpu") -> dict:
        folder = cache_dir / "proposals" / data_key
        train_props = cached_proposals(train, folder, self.proposals)
        test_props = cached_proposals(test, folder, self.proposals)
        detectors = [self.build_detector(net, train, train_props, len(classes), device) for net in networks]

        def feats(im, boxes):
            return np.concatenate([self.region_features(m, n, im, boxes, device) for m, n in zip(detectors, networks)], 1)

        # training regions: ground truth (positives) and proposals (negatives where IoU < 0.3)
        pos = {c: [] for c in range(len(classes))}
        neg_feats, neg_iou = [], []
        for im, props in zip(train, train_props):
            gt = _gt0(im)
            f = feats(im, np.concatenate([gt, props]).astype(np.float32))
            for g in range(len(gt)):
                if not im.difficult[g]:
                    pos[int(im.labels[g])].append(f[g])
            iou = np.zeros((len(props), len(classes)), np.float32)
            if len(gt):
                ious = box_iou(torch.from_numpy(props), torch.from_numpy(gt)).numpy()
                for c in range(len(classes)):
                    if (im.labels == c).any():
                        iou[:, c] = ious[:, im.labels == c].max(1)
            neg_feats.append(f[len(gt):])
            neg_iou.append(iou)
        neg_feats, neg_iou = np.concatenate(neg_feats), np.concatenate(neg_iou)
        rng = np.random.default_rng(self.seed)
        weights = np.zeros((neg_feats.shape[1], len(classes)), np.float32)
        bias = np.full(len(classes), -np.inf, np.float32)
        for c in range(len(classes)):
            if not pos[c]:
                continue
            negatives = np.nonzero(neg_iou[:, c] < 0.3)[0]
            active = rng.choice(negatives, min(len(negatives), self.svm_negatives), replace=False)
            for _ in range(self.hard_rounds):
                x = np.concatenate([np.stack(pos[c]), neg_feats[active]])
                y = np.concatenate([np.ones(len(pos[c])), -np.ones(len(active))])
                w, b = fit_svm(x, y, self.svm_cost, self.seed)
                hard = negatives[neg_feats[negatives] @ w + b > -1.0]
                grown = np.union1d(active, hard)
                if len(grown) == len(active):
                    break
                active = grown
            weights[:, c], bias[c] = w, b
        preds, targets = [], []
        for im, props in zip(test, test_props):
            scores = feats(im, props) @ weights + bias
            boxes, s_all, labels = [], [], []
            for c in range(len(classes)):
                if not np.isfinite(bias[c]):
                    continue
                keep = nms(torch.from_numpy(props), torch.from_numpy(scores[:, c]), self.nms_iou).numpy()
                boxes.append(props[keep])
                s_all.append(scores[keep, c])
                labels.append(np.full(len(keep), c))
            boxes, s_all, labels = (np.concatenate(v) if v else np.zeros((0, 4) if i == 0 else 0) for i, v in enumerate((boxes, s_all, labels)))
            top = np.argsort(-s_all, kind="stable")[: self.max_per_image]
            preds.append({"boxes": torch.from_numpy(boxes[top] + 1.0).float(), "scores": torch.from_numpy(s_all[top]).float(),
                          "labels": torch.from_numpy(labels[top]).long()})
            targets.append(im.target())
        # The curves once, for the AP (voc_detection_ap's computation) and for results.json.
        curves = voc_detection_pr(preds, targets, iou_threshold=self.iou_threshold, num_classes=len(classes))
        ap = ap_of_curves(curves, self.use_07_metric)
        per_class = [{"class": name, "ap": a, "pr": thin_curve(curve)} for name, a, curve in zip(classes, ap["ap"], curves)]
        layer = "pool5" if self.finetune == "none" else "fc7"
        return {"layers": {layer: {"ap": ap["ap"], "map": ap["map"], "classes": per_class}}, "best_layer": layer, "map": ap["map"]}
