"""R-CNN's per-class SVMs with streaming hard-negative mining (rbgirshick/rcnn, rcnn_train.m).

- Features are scaled by one global factor so that their mean L2 norm is 20
  (rcnn_feature_stats.m: 200 random images x 200 random boxes; rcnn_scale_features.m).
- Positives: every ground-truth box of the class, difficult ones included (roidb_from_voc.m
  attaches all of PASreadrecord's objects; get_positive_pool5_features takes d.class == j).
- Negatives: boxes (ground truth of other classes included) whose IoU with the class's objects is
  below 0.3. One pass over the training images (max_hard_epochs = 1): the first image adds all of
  its negatives and trains; later images add those scoring above hard_thresh = -1.0001 that are
  not in the cache yet; a class retrains when more than retrain_limit = 2000 negatives were added
  since its last training, and at the last image of the last pass, and after each training evicts
  the cached negatives scoring below evict_thresh = -1.2.
- The solver: liblinear -s 3 (L2-regularised L1 hinge, dual) -c 0.001 -w1 2 -B 10 with liblinear's
  default stopping tolerance 0.1 (sklearn's LinearSVC wraps the same liblinear; its
  intercept_scaling is -B and its intercept_ is w_bias * B, as R-CNN's b = llm.w(end) * bias_mult).

Memory is the positives (G x D: VOC2012 train's 13.6K objects x 4096 fp32 = 223 MB) plus the
hard-negative caches, never the features of all images: each image's features are computed,
mined and dropped. The miner's state (caches, weights, the pass position) is saved every
`checkpoint_every` images, so a killed pass resumes at the last saved image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vidrep.common.io import write_json, write_npz


def fit_rcnn_svm(
    x_pos: np.ndarray,
    x_neg: np.ndarray,
    C: float = 0.001,
    bias_mult: float = 10.0,
    pos_loss_weight: float = 2.0,
    tol: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """(w, b) of rcnn_train.m's update_model: liblinear's L2-regularised L1-hinge dual solver."""
    from sklearn.svm import LinearSVC

    x = np.concatenate([x_pos, x_neg])
    y = np.concatenate([np.ones(len(x_pos)), -np.ones(len(x_neg))])
    svm = LinearSVC(
        C=C,
        loss="hinge",
        penalty="l2",
        dual=True,
        class_weight={1: pos_loss_weight, -1: 1.0},
        intercept_scaling=bias_mult,
        tol=tol,
        max_iter=max_iter,
        random_state=seed,
    )
    svm.fit(x, y)
    return svm.coef_.reshape(-1).astype(np.float32), float(svm.intercept_[0])


def feature_scale(norms: np.ndarray, target_norm: float = 20.0) -> float:
    """The one factor that brings the mean feature norm to `target_norm` (rcnn_scale_features.m)."""
    mean = float(np.mean(norms)) if len(norms) else 0.0
    if mean <= 0:
        raise ValueError(
            "region features are all zero: the network gives no signal to train SVMs on (check the checkpoint)"
        )
    return target_norm / mean


class HardNegativeMiner:
    """rcnn_train.m's training caches and their update rule, for all classes at once.

    Call `add_image(image_index, features, overlap)` for every training image in order, for
    `epochs` passes (`position` says where a restored miner continues); then `weights()`.
    """

    def __init__(
        self,
        positives: Sequence[np.ndarray],
        *,
        epochs: int = 1,
        num_images: int,
        C: float = 0.001,
        bias_mult: float = 10.0,
        pos_loss_weight: float = 2.0,
        tol: float = 0.1,
        max_iter: int = 1000,
        neg_iou: float = 0.3,
        hard_thresh: float = -1.0001,
        evict_thresh: float = -1.2,
        retrain_limit: int = 2000,
        seed: int = 0,
    ) -> None:
        self.positives = [np.asarray(p, np.float32) for p in positives]
        self.dim = next((p.shape[1] for p in self.positives if p.ndim == 2 and len(p)), 0)
        self.epochs, self.num_images = int(epochs), int(num_images)
        self.solver = {
            "C": C,
            "bias_mult": bias_mult,
            "pos_loss_weight": pos_loss_weight,
            "tol": tol,
            "max_iter": max_iter,
            "seed": seed,
        }
        self.neg_iou, self.hard_thresh, self.evict_thresh, self.retrain_limit = (
            neg_iou,
            hard_thresh,
            evict_thresh,
            retrain_limit,
        )
        c = len(self.positives)
        self.W = np.zeros((self.dim, c), np.float32)
        self.B = np.zeros(c, np.float32)
        self.x_neg = [np.zeros((0, self.dim), np.float32) for _ in range(c)]
        self.keys_neg = [np.zeros(0, np.int64) for _ in range(c)]  # image * 2**32 + box
        self.num_added = np.zeros(c, np.int64)
        self.updates = np.zeros(c, np.int64)  # trainings per class
        self.last_update = np.full(c, -1, np.int64)  # the pass position of each class's latest training
        self.position = 0  # images visited, over all passes

    @property
    def done(self) -> bool:
        return self.position >= self.epochs * self.num_images

    def add_image(self, image: int, features: np.ndarray, overlap: np.ndarray) -> None:
        """Mine one image: features [R, D] (scaled), overlap [R, C] (IoU with each class's objects)."""
        if image != self.position % self.num_images:
            raise ValueError(f"image {image} given where the pass is at image {self.position % self.num_images}")
        first_time = self.position == 0
        is_last_time = self.position == self.epochs * self.num_images - 1
        scores = None if first_time else features @ self.W + self.B
        keys = image * (1 << 32) + np.arange(len(features), dtype=np.int64)
        for c in range(len(self.positives)):
            if not len(self.positives[c]):
                continue  # no positive: no detector (the class is left out of the test)
            candidate = overlap[:, c] < self.neg_iou
            if not first_time:
                candidate &= scores[:, c] > self.hard_thresh
                candidate &= ~np.isin(keys, self.keys_neg[c])
            if candidate.any():
                self.x_neg[c] = np.concatenate([self.x_neg[c], features[candidate]])
                self.keys_neg[c] = np.concatenate([self.keys_neg[c], keys[candidate]])
                self.num_added[c] += int(candidate.sum())
            if (first_time or self.num_added[c] > self.retrain_limit or is_last_time) and len(self.x_neg[c]):
                self._update(c)
        self.position += 1

    def _update(self, c: int) -> None:
        w, b = fit_rcnn_svm(self.positives[c], self.x_neg[c], **self.solver)
        self.W[:, c], self.B[c] = w, b
        self.num_added[c] = 0
        self.updates[c] += 1
        self.last_update[c] = self.position
        keep = self.x_neg[c] @ w + b >= self.evict_thresh  # evict the easy ones
        self.x_neg[c], self.keys_neg[c] = self.x_neg[c][keep], self.keys_neg[c][keep]

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [D, C], B [C]); B is -inf for a class without positives (no detector)."""
        bias = self.B.copy()
        bias[[not len(p) for p in self.positives]] = -np.inf
        return self.W, bias

    def cache_sizes(self) -> list[int]:
        return [len(x) for x in self.x_neg]

    # ------------------------------------------------------------ resuming

    def save(self, path: Path) -> None:
        arrays = {
            "W": self.W,
            "B": self.B,
            "num_added": self.num_added,
            "updates": self.updates,
            "last_update": self.last_update,
            "position": np.array(self.position),
        }
        for c in range(len(self.positives)):
            arrays[f"x_neg{c}"], arrays[f"keys_neg{c}"] = self.x_neg[c], self.keys_neg[c]
        write_npz(path, arrays)

    def load(self, path: Path) -> None:
        with np.load(path) as z:
            self.W, self.B = z["W"], z["B"]
            self.num_added, self.updates, self.position = z["num_added"], z["updates"], int(z["position"])
            self.last_update = z["last_update"]
            self.x_neg = [z[f"x_neg{c}"] for c in range(len(self.positives))]
            self.keys_neg = [z[f"keys_neg{c}"] for c in range(len(self.positives))]


def save_scale(path: Path, scale: float, mean_norm: float) -> None:
    write_json(path, {"scale": scale, "mean_norm": mean_norm})
