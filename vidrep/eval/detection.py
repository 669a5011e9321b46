"""The `detection` protocol: the paper's R-CNN pipeline (rbgirshick/rcnn), one module per stage, resumable.

1. proposals (vidrep/eval/proposals.py): R-CNN's published boxes (`protocol.proposals.dir`), or
   selective search set as R-CNN's selective_search_boxes.m, in `workers` processes; one file per image.
2. windows and fine-tuning (vidrep/eval/windows.py, finetune.py; adapt.py for finetune=iterative's
   re-adaptation): the checkpoint's conv layers, fc6/fc7 (dropout 0.5) and a (classes + background)
   classifier trained on R-CNN's 32 + 96 windows drawn from the whole split; a Lightning checkpoint
   every `finetune_checkpoint_every` steps, the finished weights as `finetuned.pt`.
3. region features (vidrep/eval/regions.py): the detection network (`DetectionNet`) on warped
   regions (`warp`, R-CNN's) or RoI-pooled ones (`roi_pool`, Fast R-CNN's, not the paper's).
4. SVMs (vidrep/eval/rcnn_svm.py): per-class linear SVMs on scaled fc7 region features with
   rcnn_train.m's streaming hard-negative mining; the scale, the positives and the miner's state
   every `svm.checkpoint_every` images are saved.
5. test (vidrep/eval/rcnn_test.py): top `max_per_image` per class and image, rcnn_test.m's
   `max_per_set` pruning, NMS; detections saved per `test_chunk` images; VOC AP at IoU 0.5
   (vidrep/eval/metrics.py). No bounding-box regression, as in the paper.

Below the stages: box maths (boxes.py: IoU, NMS in R-CNN's inclusive pixels), image reading
(images.py), R-CNN's warp (warp.py), the evaluation's Lightning Trainer (trainer.py). This module
holds the settings (the `protocol` config, vidrep/conf/protocol/detection.yaml) and runs the stages
in order, each from the cache where a previous run finished it, so a rerun after kill -9 redoes
only unfinished work.

finetune=none: pool5 region features of the network (no training) + SVMs.
finetune=straightforward: conv layers from the checkpoint; fc6/fc7 re-initialised for an
  unsupervised network (the paper), kept for ImageNet weights (R-CNN's baseline); SVMs on fc7.
finetune=iterative: fine-tune; copy its conv layers back into the triplet network and re-adapt it
  on mined pairs with train.py's TripletModule (vidrep/eval/adapt.py); fine-tune again (`rounds`
  fine-tunings in all).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidrep import usable_cores
from vidrep.data.voc import VOCImage
from vidrep.eval.features import Network
from vidrep.eval.finetune import build_detector
from vidrep.eval.metrics import ap_of_curves, thin_curve, voc_detection_pr
from vidrep.eval.proposals import ProposalStore
from vidrep.eval.rcnn_svm import train_svms
from vidrep.eval.rcnn_test import test_detections
from vidrep.eval.regions import REGION_MODES, RegionFeatures

FINETUNE_MODES = ("none", "straightforward", "iterative")
# the settings that change what fine-tuning trains (not where or how fast it runs)
FINETUNE_KEYS = (
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
SVM_RUNTIME_KEYS = ("workers", "max_lag", "checkpoint_every")  # how the SVM stage runs, not what it trains


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


@dataclass
class DetectionProtocol:
    voc_year: int = 2012  # the year evaluate.py reads unless voc.year is given (R-CNN's VOC2012 train / val)
    finetune: str = "straightforward"
    rounds: int = 2  # fine-tunings for finetune=iterative
    regions: str = "warp"
    warp: dict = field(default_factory=lambda: {"padding": 16, "batch_size": 128})
    roi_pool: dict = field(default_factory=lambda: {"scale": 600, "max_size": 1000})
    proposals: dict = field(
        default_factory=lambda: {
            "mode": "rcnn",
            "max_side": None,
            "max_proposals": None,
            "min_size": 20,
            "workers": usable_cores(),
            "dir": None,
        }
    )
    iterations: int = 70000  # fine-tuning SGD steps (R-CNN's VOC2012 row is its 70K snapshot)
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
            "workers": min(20, usable_cores()),
            "max_lag": 128,
        }
    )
    nms_iou: float = 0.3
    max_per_image: int = 100
    max_per_set: float | None = 40  # x test images: rcnn_test.m's ceil(100000 / 2500); None: no pruning
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
    finetune_workers: int = field(default_factory=lambda: min(14, usable_cores()))  # window-loading processes
    finetune_decoded_images: bool = True  # the split's images decoded once into the cache for the loaders
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
        """What results.json records as "protocol": every setting but `voc_year`, which only chooses
        evaluate.py's default year (the year used is results.json's data.year)."""
        return {"name": "detection", **{k: v for k, v in asdict(self).items() if k != "voc_year"}}

    @property
    def layer(self) -> str:
        return "pool5" if self.finetune == "none" else "fc7"

    @property
    def rois_per_image(self) -> int:
        return max(1, self.batch_size // self.images_per_batch)

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
        finetune_settings = {k: s[k] for k in FINETUNE_KEYS}
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
            build_detector(self, n, train, store, len(classes), device, cache_dir / "detection" / k, model, logger)
            for n, k in zip(networks, ft_keys)
        ]
        feats = RegionFeatures(self, detectors, networks, device)
        svm_key = _key(ft_keys, {k: v for k, v in self.svm.items() if k not in SVM_RUNTIME_KEYS})
        W, B, scale = train_svms(self, feats, train, store, len(classes), cache_dir / "detection" / "svm" / svm_key)
        # "v2": chunks hold each image's pre-NMS top scores for max_per_set (earlier chunks do not)
        test_key = _key(svm_key, self.max_per_image, self.nms_iou, self.test_chunk, "v2")
        preds = test_detections(self, feats, test, store, W, B, scale, cache_dir / "detection" / "test" / test_key)
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
