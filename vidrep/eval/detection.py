"""The `detection` protocol: the paper's R-CNN pipeline (rbgirshick/rcnn), stage by stage, resumable.

Proposals (selective search in `workers` processes, or R-CNN's published boxes; vidrep/eval/proposals.py)
-> a detection network: the checkpoint's conv layers, fc6/fc7 (dropout 0.5) and a
(classes + background) classifier, fine-tuned on regions -> per-class linear SVMs on scaled fc7
region features with R-CNN's streaming hard-negative mining (vidrep/eval/rcnn_svm.py) -> NMS ->
VOC detection AP at IoU 0.5. No bounding-box regression, as in the paper.

Regions (`regions`): `warp` (R-CNN: each proposal plus 16 px of context warped to the network
input, vidrep/eval/warp.py; numbers comparable with R-CNN's and the paper's) or `roi_pool` (Fast
R-CNN's one conv pass per image at its image scale, RoI max-pooling of the trunk's region layer, conv5
to 6x6 for CaffeNet: much faster, not the paper's regions; compare only with other roi_pool runs).
The trunk's layers, sizes and body come from its interface (vidrep/models/trunk.py).

finetune=none: pool5 region features of the network (no training) + SVMs.
finetune=straightforward: conv layers from the checkpoint; fc6/fc7 re-initialised for an
  unsupervised network (the paper), kept for ImageNet weights (R-CNN's baseline); SVMs on fc7.
finetune=iterative: fine-tune; copy its conv layers back into the triplet network and re-adapt it
  on mined pairs with train.py's TripletModule (vidrep/eval/adapt.py); fine-tune again (`rounds`
  fine-tunings in all).

Fine-tuning is a LightningModule run by a Lightning Trainer (vidrep/eval/finetune.py) on R-CNN's
batches of windows drawn from the whole training split (vidrep/eval/windows.py). Every stage
leaves its result in the cache (the proposals per image, the fine-tuned weights and a Lightning
checkpoint every `finetune_checkpoint_every` steps, the feature scale, the positives, the miner's
state every `svm.checkpoint_every` images, the test detections per `test_chunk` images), so a
rerun after kill -9 redoes only unfinished work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool
from tqdm import tqdm

from vidrep.common.io import write_npz, write_torch
from vidrep.data.voc import VOCImage
from vidrep.eval.adapt import readapt
from vidrep.eval.features import Network
from vidrep.eval.finetune import finetune
from vidrep.eval.metrics import ap_of_curves, thin_curve, voc_detection_pr
from vidrep.eval.proposals import ProposalStore
from vidrep.eval.rcnn_svm import HardNegativeMiner, feature_scale, save_scale
from vidrep.eval.warp import warp_regions
from vidrep.models.trunk import Trunk

log = logging.getLogger(__name__)
FINETUNE_MODES = ("none", "straightforward", "iterative")
REGION_MODES = ("warp", "roi_pool")


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def box_overlap(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[R, G] IoU in inclusive pixels (R-CNN's boxoverlap.m: width = x2 - x1 + 1)."""
    boxes, gt = boxes.astype(np.float64)[:, None], gt.astype(np.float64)[None]
    iw = np.clip(np.minimum(boxes[..., 2], gt[..., 2]) - np.maximum(boxes[..., 0], gt[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(boxes[..., 3], gt[..., 3]) - np.maximum(boxes[..., 1], gt[..., 1]) + 1, 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)  # noqa: E731
    return inter / (area(boxes) + area(gt) - inter)


def class_overlap(boxes: np.ndarray, gt: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[R, C]: each box's highest IoU with the objects of each class (0 without one), as roidb_from_voc.m."""
    out = np.zeros((len(boxes), num_classes), np.float32)
    if len(gt) and len(boxes):
        iou = box_overlap(boxes, gt)
        for c in np.unique(labels):
            out[:, c] = iou[:, labels == c].max(1)
    return out


def nms_inclusive(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS in inclusive pixels (R-CNN's nms.m: overlap = inter / union)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        if len(order) == 1:
            break
        iou = box_overlap(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][iou <= threshold]
    return np.asarray(keep, np.int64)


# ---------------------------------------------------------------- the network


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


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return np.ascontiguousarray(img[:, :, ::-1])


def _gt0(im: VOCImage) -> np.ndarray:
    """Ground-truth boxes in 0-based pixels (VOC's XML is 1-based)."""
    return im.boxes - 1.0


@dataclass
class DetectionProtocol:
    finetune: str = "straightforward"
    rounds: int = 2  # fine-tunings for finetune=iterative
    regions: str = "warp"
    warp: dict = field(default_factory=lambda: {"padding": 16, "batch_size": 128})
    roi_pool: dict = field(default_factory=lambda: {"scale": 600, "max_size": 1000})
    proposals: dict = field(
        default_factory=lambda: {"max_side": 500, "mode": "fast", "max_proposals": 2000, "workers": 1, "dir": None}
    )
    iterations: int = 100000  # fine-tuning SGD steps
    lr: float = 0.001
    lr_step: int = 20000
    momentum: float = 0.9
    weight_decay: float = 0.0005
    batch_size: int = 128  # regions per step
    images_per_batch: int = 2  # regions=roi_pool only (Fast R-CNN); warp draws its windows from the whole split
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: list = field(default_factory=lambda: [0.0, 0.5])
    dropout: float = 0.5
    cls_lr_mult: float = 10.0
    bias_lr_mult: float = 2.0
    flip: bool = True
    finetune_checkpoint_every: int = 1000
    fc_dim: int = 4096
    svm: dict = field(
        default_factory=lambda: {
            "C": 0.001,
            "bias_mult": 10.0,
            "pos_loss_weight": 2.0,
            "tol": 0.1,
            "max_iter": 1000,
            "neg_iou": 0.3,
            "hard_thresh": -1.0001,
            "evict_thresh": -1.2,
            "retrain_limit": 2000,
            "epochs": 1,
            "target_norm": 20.0,
            "norm_images": 200,
            "norm_boxes": 200,
            "checkpoint_every": 500,
        }
    )
    nms_iou: float = 0.3
    max_per_image: int = 100
    test_chunk: int = 100
    iou_threshold: float = 0.5
    use_07_metric: bool | None = None  # None: evaluate.py sets it from the year (11-point before VOC2010)
    adapt: dict = field(
        default_factory=lambda: {
            "corpus": None,
            "steps": 1000,
            "batch_size": 50,
            "lr": 0.001,
            "checkpoint_every": 1000,
            "workers": 4,
        }
    )
    finetune_workers: int = 4  # DataLoader processes decoding and warping R-CNN's windows (regions=warp)
    devices: int = 1  # devices for fine-tuning and re-adaptation; > 1: DDP
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"protocol.finetune={self.finetune!r}; choose from {FINETUNE_MODES}")
        if self.regions not in REGION_MODES:
            raise ValueError(f"protocol.regions={self.regions!r}; choose from {REGION_MODES}")
        if self.finetune == "iterative" and not self.adapt.get("corpus"):
            raise ValueError("finetune=iterative re-adapts on mined pairs: set protocol.adapt.corpus=<corpus dir>")

    def settings(self) -> dict:
        return {"name": "detection", **asdict(self)}

    @property
    def layer(self) -> str:
        return "pool5" if self.finetune == "none" else "fc7"

    # -------------------------------------------------------------- regions

    def _region_outputs(
        self, model: DetectionNet, net: Network, image: np.ndarray, boxes: np.ndarray, device: str
    ) -> Callable:
        """A function of a chunk of box indices giving the model's outputs for those regions."""
        if self.regions == "warp":
            img = torch.from_numpy(image.transpose(2, 0, 1)).to(device)

            def outputs(idx):
                crops, mask = warp_regions(img, boxes[idx], net.input_size, int(self.warp["padding"]))
                return model.warped(net.preprocess(crops) * mask)

            return outputs
        h, w = image.shape[:2]
        scale = min(float(self.roi_pool["scale"]) / min(h, w), float(self.roi_pool["max_size"]) / max(h, w))
        resized = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        x = net.preprocess(torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None].to(device))
        sy, sx = resized.shape[0] / h, resized.shape[1] / w

        def pooled(idx):
            rois = torch.from_numpy(boxes[idx] * np.array([sx, sy, sx, sy], np.float32)).float().to(device)
            return model.pooled(x, rois)

        return pooled

    @torch.no_grad()
    def region_features(
        self, model: DetectionNet, net: Network, im: VOCImage, boxes: np.ndarray, device: str
    ) -> np.ndarray:
        """[R, D] float32 features (pool5 without fine-tuning, fc7 with) of `boxes` of one image, in batches."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if not len(boxes):
            return np.zeros((0, model.fc7.out_features if self.layer == "fc7" else model.fc6.in_features), np.float32)
        outputs = self._region_outputs(model, net, read_rgb(im.path), boxes, device)
        step = int(self.warp["batch_size"])
        return torch.cat(
            [
                outputs(np.arange(i, min(i + step, len(boxes))))[self.layer].float().cpu()
                for i in range(0, len(boxes), step)
            ]
        ).numpy()

    # -------------------------------------------------------------- fine-tuning

    @property
    def rois_per_image(self) -> int:
        return max(1, self.batch_size // self.images_per_batch)

    def _sample_rois(
        self, gt: np.ndarray, labels: np.ndarray, props: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image's regions for regions=roi_pool (Fast R-CNN's 2 images a step; the warp path
        draws from the whole split, vidrep.eval.windows): ground truth and proposals with IoU >=
        fg_iou are their object's class, those in [bg_iou[0], bg_iou[1]) background, fg_fraction
        of them foreground."""
        boxes = np.concatenate([gt, props]).astype(np.float32)
        if len(gt):
            iou = box_overlap(boxes, gt)
            best, arg = iou.max(1), iou.argmax(1)
        else:
            best, arg = np.zeros(len(boxes)), np.zeros(len(boxes), int)
        fg = np.nonzero(best >= self.fg_iou)[0]
        bg = np.nonzero((best < self.bg_iou[1]) & (best >= self.bg_iou[0]))[0]
        n_fg = min(len(fg), int(round(self.rois_per_image * self.fg_fraction)))
        fg = rng.choice(fg, n_fg, replace=False) if n_fg else fg[:0]
        bg = rng.choice(bg, min(len(bg), self.rois_per_image - n_fg), replace=False) if len(bg) else bg
        idx = np.concatenate([fg, bg]).astype(int)
        target = np.where(np.isin(idx, fg), labels[arg[idx]] + 1 if len(gt) else 0, 0)
        return boxes[idx], target

    def _param_groups(self, model: DetectionNet) -> list[dict]:
        """R-CNN's pascal_finetune_train.prototxt: every layer blobs_lr 1 (weights) / 2 (biases), the new
        fc8_pascal 10 / 20; weight decay 1 / 0."""
        groups = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            mult = (self.cls_lr_mult if name.startswith("cls.") else 1.0) * (
                self.bias_lr_mult if name.endswith("bias") else 1.0
            )
            groups.append(
                {
                    "params": [p],
                    "lr": self.lr * mult,
                    "weight_decay": 0.0 if name.endswith("bias") else self.weight_decay,
                }
            )
        return groups

    def build_detector(
        self,
        net: Network,
        images,
        store: ProposalStore,
        num_classes: int,
        device: str,
        folder: Path,
        model_cfg=None,
        logger=None,
    ) -> DetectionNet:
        """The fine-tuned detection network, from `folder` when a previous run finished it; a killed
        fine-tuning or re-adaptation resumes from its last checkpoint there. `model_cfg`: evaluate.py's
        `model` config, which builds the re-adaptation's TripletModule; `logger`: its `logger` config."""
        torch.manual_seed(self.seed)
        keep_fc = net.name.startswith("imagenet:")  # R-CNN's baseline keeps ImageNet's fc6/fc7

        def make(trunk):
            return DetectionNet(
                trunk,
                num_classes,
                self.regions,
                net.input_size,
                self.fc_dim,
                self.fc_dim,
                self.dropout,
                keep_fc,
            ).to(device)

        model = make(copy.deepcopy(net.trunk))
        if self.finetune == "none":
            return model.eval()
        final = folder / "finetuned.pt"
        if final.exists():
            model.load_state_dict(torch.load(final, map_location=device, weights_only=True))
            log.info("fine-tuned weights from %s", final)
            return model.eval()
        rounds = self.rounds if self.finetune == "iterative" else 1
        if rounds > 1 and keep_fc:
            raise ValueError(
                f"finetune=iterative re-adapts a network trained by train.py with its triplet loss; {net.name} is not "
                "one "
                "(its preprocessing is ImageNet's): use protocol.finetune=straightforward"
            )
        triplet = copy.deepcopy(net.trunk).to(device)
        for r in range(rounds):
            done = folder / f"round{r}.pt"
            if done.exists() and r + 1 < rounds:
                model.load_state_dict(torch.load(done, map_location=device, weights_only=True))
            else:
                log.info("fine-tuning round %d/%d", r + 1, rounds)
                finetune(self, model, net, images, store, device, folder / f"round{r}", logger)
                write_torch(done, model.state_dict())
            if r + 1 < rounds:
                triplet.load_state_dict(model.trunk.body_state(), strict=False)
                readapt(
                    triplet,
                    net.input_size,
                    self.adapt,
                    model_cfg,
                    folder / f"adapt{r}",
                    device,
                    int(self.devices),
                    logger,
                    self.seed,
                )
                model.trunk.load_state_dict(triplet.body_state(), strict=False)
                torch.manual_seed(self.seed + r + 1)
                model = make(model.trunk)
        write_torch(final, model.state_dict())
        for r in range(rounds):  # the checkpoints; the curves (metrics.csv) stay
            for ckpt in (folder / f"round{r}").glob("*.ckpt"):
                ckpt.unlink()
        return model.eval()

    # -------------------------------------------------------------- SVMs

    def _svm_features(self, detectors, networks, device) -> Callable[[VOCImage, np.ndarray], np.ndarray]:
        def feats(im: VOCImage, boxes: np.ndarray) -> np.ndarray:
            return np.concatenate(
                [self.region_features(m, n, im, boxes, device) for m, n in zip(detectors, networks)], 1
            )

        return feats

    def train_svms(
        self,
        feats: Callable[[VOCImage, np.ndarray], np.ndarray],
        train: Sequence[VOCImage],
        store: ProposalStore,
        num_classes: int,
        folder: Path,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(W [D, C], B [C], feature scale): rcnn_train.m's stages, each saved in `folder`."""
        o = self.svm
        done = folder / "svms.npz"
        if done.exists():
            with np.load(done) as z:
                return z["W"], z["B"], float(z["scale"])
        # 1. one global scale to mean norm target_norm (rcnn_feature_stats.m: 200 images x 200 boxes)
        scale_file = folder / "scale.json"
        if not scale_file.exists():
            rng = np.random.default_rng(self.seed)
            norms = []
            for i in rng.permutation(len(train))[: int(o["norm_images"])]:
                im = train[i]
                boxes = np.concatenate([_gt0(im), store.boxes(im)]).astype(np.float32)
                pick = rng.permutation(len(boxes))[: int(o["norm_boxes"])]
                norms.append(np.linalg.norm(feats(im, boxes[pick]), axis=1))
            norms = np.concatenate(norms)
            save_scale(scale_file, feature_scale(norms, float(o["target_norm"])), float(norms.mean()))
        scale = json.loads(scale_file.read_text())["scale"]
        # 2. positives: every ground-truth box, difficult included (get_positive_pool5_features)
        pos_file = folder / "positives.npz"
        if not pos_file.exists():
            per_class = [[] for _ in range(num_classes)]
            for im in train:
                f = feats(im, _gt0(im).astype(np.float32)) * scale
                for c in range(num_classes):
                    per_class[c].append(f[im.labels == c])
            dim = next(x.shape[1] for chunks in per_class for x in chunks)
            write_npz(
                pos_file,
                {
                    f"c{c}": np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
                    for c, chunks in enumerate(per_class)
                },
            )
        with np.load(pos_file) as z:
            positives = [z[f"c{c}"] for c in range(num_classes)]
        # 3. the hard-negative mining pass(es), resumable at the last saved image
        miner = HardNegativeMiner(
            positives,
            epochs=int(o["epochs"]),
            num_images=len(train),
            C=float(o["C"]),
            bias_mult=float(o["bias_mult"]),
            pos_loss_weight=float(o["pos_loss_weight"]),
            tol=float(o["tol"]),
            max_iter=int(o["max_iter"]),
            neg_iou=float(o["neg_iou"]),
            hard_thresh=float(o["hard_thresh"]),
            evict_thresh=float(o["evict_thresh"]),
            retrain_limit=int(o["retrain_limit"]),
            seed=self.seed,
        )
        state = folder / "mining.npz"
        if state.exists():
            miner.load(state)
            log.info("hard-negative mining resumes at image %d of %d x %d", miner.position, len(train), miner.epochs)
        bar = tqdm(
            total=len(train) * miner.epochs,
            initial=miner.position,
            desc="train: SVM hard-negative mining",
            unit="image",
        )
        while not miner.done:
            bar.update()
            im = train[miner.position % len(train)]
            boxes = np.concatenate([_gt0(im), store.boxes(im)]).astype(np.float32)
            miner.add_image(
                miner.position % len(train),
                feats(im, boxes) * scale,
                class_overlap(boxes, _gt0(im), im.labels, num_classes),
            )
            if miner.position % int(o["checkpoint_every"]) == 0 and not miner.done:
                miner.save(state)
        bar.close()
        W, B = miner.weights()
        write_npz(
            done,
            {
                "W": W,
                "B": B,
                "scale": np.array(scale),
                "updates": miner.updates,
                "last_update": miner.last_update,
                "passes": np.array(miner.position / len(train)),
                "cache_sizes": np.array(miner.cache_sizes()),
            },
        )
        state.unlink(missing_ok=True)
        return W, B, scale

    # -------------------------------------------------------------- test

    def detect(self, scores: np.ndarray, boxes: np.ndarray, bias: np.ndarray) -> dict:
        """Per class with a detector: the top max_per_image regions by score (rcnn_test.m), then NMS at
        nms_iou (inclusive pixels, as nms.m)."""
        out_boxes, out_scores, out_labels = (
            [np.zeros((0, 4), np.float32)],
            [np.zeros(0, np.float32)],
            [np.zeros(0, np.int64)],
        )
        for c in range(scores.shape[1]):
            if not np.isfinite(bias[c]):
                continue
            top = np.argsort(-scores[:, c], kind="stable")[: self.max_per_image]
            keep = top[nms_inclusive(boxes[top], scores[top, c], self.nms_iou)]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep, c].astype(np.float32))
            out_labels.append(np.full(len(keep), c, np.int64))
        return {
            "boxes": np.concatenate(out_boxes),
            "scores": np.concatenate(out_scores),
            "labels": np.concatenate(out_labels),
        }

    def test_detections(
        self,
        feats,
        test: Sequence[VOCImage],
        store: ProposalStore,
        W: np.ndarray,
        B: np.ndarray,
        scale: float,
        folder: Path,
    ) -> list[dict]:
        """Detections per test image (boxes 1-based inclusive, as the devkit's), saved per chunk of
        `test_chunk` images so a killed test resumes at the last finished chunk."""
        preds = []
        bar = tqdm(total=len(test), desc="test: detections", unit="image")
        for start in range(0, len(test), self.test_chunk):
            chunk = folder / f"chunk{start:07d}.npz"
            if not chunk.exists():
                arrays = {}
                for k, im in enumerate(test[start : start + self.test_chunk]):
                    bar.update()
                    boxes = store.boxes(im)
                    det = self.detect(feats(im, boxes) * scale @ W + B, boxes, B)
                    arrays.update({f"{k}_{name}": v for name, v in det.items()})
                write_npz(chunk, arrays)
            with np.load(chunk) as z:
                for k in range(len(test[start : start + self.test_chunk])):
                    preds.append(
                        {
                            "boxes": torch.from_numpy(z[f"{k}_boxes"] + 1.0).float(),
                            "scores": torch.from_numpy(z[f"{k}_scores"]).float(),
                            "labels": torch.from_numpy(z[f"{k}_labels"]).long(),
                        }
                    )
            bar.n = min(len(test), start + self.test_chunk)  # chunks read back from an earlier run count too
            bar.refresh()
        bar.close()
        return preds

    def run(
        self,
        networks: Sequence[Network],
        train: Sequence[VOCImage],
        test: Sequence[VOCImage],
        classes: Sequence[str],
        cache_dir: Path,
        data_key: str,
        device: str = "cpu",
        model=None,
        logger=None,
    ) -> dict:
        """`model`, `logger`: evaluate.py's configs of those names (the re-adaptation's TripletModule; W&B curves)."""
        store = ProposalStore(cache_dir, data_key, self.proposals)
        store.ensure(list(train) + list(test))
        s = self.settings()
        finetune_settings = {
            k: s[k]
            for k in (
                "finetune",
                "rounds",
                "regions",
                "warp",
                "roi_pool",
                "iterations",
                "lr",
                "lr_step",
                "momentum",
                "weight_decay",
                "batch_size",
                "images_per_batch",
                "fg_fraction",
                "fg_iou",
                "bg_iou",
                "dropout",
                "cls_lr_mult",
                "bias_lr_mult",
                "flip",
                "fc_dim",
                "seed",
            )
        }
        if self.finetune == "iterative":  # where and how fast it runs (workers, checkpoints) is not what it trains
            from omegaconf import OmegaConf

            finetune_settings["adapt"] = {
                k: v for k, v in self.adapt.items() if k not in ("workers", "checkpoint_every")
            }
            finetune_settings["model"] = (
                OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else model
            )
        ft_keys = [_key(n.key, data_key, store.folder.name, finetune_settings) for n in networks]
        detectors = [
            self.build_detector(n, train, store, len(classes), device, cache_dir / "detection" / k, model, logger)
            for n, k in zip(networks, ft_keys)
        ]
        feats = self._svm_features(detectors, networks, device)
        svm_key = _key(ft_keys, self.svm)
        W, B, scale = self.train_svms(feats, train, store, len(classes), cache_dir / "detection" / "svm" / svm_key)
        test_key = _key(svm_key, self.max_per_image, self.nms_iou, self.test_chunk)
        preds = self.test_detections(feats, test, store, W, B, scale, cache_dir / "detection" / "test" / test_key)
        targets = [im.target() for im in test]
        # The curves once, for the AP (voc_detection_ap's computation) and for results.json.
        curves = voc_detection_pr(preds, targets, iou_threshold=self.iou_threshold, num_classes=len(classes))
        ap = ap_of_curves(curves, bool(self.use_07_metric))
        per_class = [
            {"class": name, "ap": a, "pr": thin_curve(curve)} for name, a, curve in zip(classes, ap["ap"], curves)
        ]
        return {
            "layers": {self.layer: {"ap": ap["ap"], "map": ap["map"], "classes": per_class}},
            "best_layer": self.layer,
            "map": ap["map"],
        }
