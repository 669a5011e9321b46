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
hard-negative caches (K rows x D per class, preallocated and grown geometrically, so an image's
hard negatives are copied once, not the whole cache on every image), never the features of all
images: each image's features are computed, mined and dropped.

Classes are independent (rcnn_train.m loops over them), so their retrainings run in `workers`
processes while the image loop goes on: a class waiting for its new SVM lags behind and catches up
on the images held for it (at most `max_lag` images of features), and every class sees the same
images with the same weights as one process would give it, so the SVMs are the same (tested). The
miner's state (caches, weights, the pass position, all classes caught up) is saved every
`checkpoint_every` images, so a killed pass resumes at the last saved image.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidrep.common.io import write_json, write_npz

log = logging.getLogger(__name__)


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


class NegativeCache:
    """One class's cached negatives (features and their image * 2**32 + box keys): rows
    preallocated and grown geometrically (doubling), eviction compacts in place. Appending an
    image's hard negatives costs those rows, not a copy of the whole cache."""

    def __init__(self, dim: int, x: np.ndarray | None = None, keys: np.ndarray | None = None) -> None:
        self._x = np.zeros((0, dim), np.float32) if x is None else np.array(x, np.float32).reshape(-1, dim)
        self._keys = np.zeros(0, np.int64) if keys is None else np.array(keys, np.int64)
        self.n = len(self._keys)

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.n]

    @property
    def keys(self) -> np.ndarray:
        return self._keys[: self.n]

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def add(self, x: np.ndarray, keys: np.ndarray) -> None:
        need = self.n + len(keys)
        if need > self.capacity:
            grown = max(need, 2 * self.capacity, 1024)
            bigger_x = np.empty((grown, self._x.shape[1]), np.float32)
            bigger_keys = np.empty(grown, np.int64)
            bigger_x[: self.n], bigger_keys[: self.n] = self.x, self.keys
            self._x, self._keys = bigger_x, bigger_keys
        self._x[self.n : need], self._keys[self.n : need] = x, keys
        self.n = need

    def keep(self, mask: np.ndarray) -> None:
        kept = int(mask.sum())
        self._x[:kept], self._keys[:kept] = self.x[mask], self.keys[mask]
        self.n = kept


class HardNegativeMiner:
    """rcnn_train.m's training caches and their update rule, for all classes at once.

    Call `add_image(image_index, features, overlap)` for every training image in order, for
    `epochs` passes (`position` says where a restored miner continues); then `weights()`. With
    `workers` > 1 the classes' retrainings run in that many processes (see the module's docstring);
    `close()` (or `weights()`) ends them.
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
        workers: int = 1,
        max_lag: int = 128,
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
        self.workers, self.max_lag = max(1, int(workers)), max(1, int(max_lag))
        c = len(self.positives)
        self.W = np.zeros((self.dim, c), np.float32)
        self.B = np.zeros(c, np.float32)
        self.cache = [NegativeCache(self.dim) for _ in range(c)]
        self.num_added = np.zeros(c, np.int64)
        self.updates = np.zeros(c, np.int64)  # trainings per class
        self.last_update = np.full(c, -1, np.int64)  # the pass position of each class's latest training
        self.position = 0  # images given, over all passes
        self._class_position = np.zeros(c, np.int64)  # the next image each class mines
        self._held: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # (position, features, overlap)
        self._fits: dict[int, tuple[Future, int]] = {}  # class -> (its retraining, the position it was asked at)
        self._pool: ProcessPoolExecutor | None = None

    @property
    def done(self) -> bool:
        return self.position >= self.epochs * self.num_images

    def add_image(self, image: int, features: np.ndarray, overlap: np.ndarray) -> None:
        """Mine one image: features [R, D] (scaled), overlap [R, C] (IoU with each class's objects)."""
        if image != self.position % self.num_images:
            raise ValueError(f"image {image} given where the pass is at image {self.position % self.num_images}")
        self._held.append((self.position, features, overlap))
        self.position += 1
        self._advance()
        while len(self._held) > self.max_lag:  # memory: wait for the class furthest behind
            self._finish(min(self._fits, key=lambda c: self._class_position[c]))
            self._advance()

    def _mine(self, c: int, position: int, features: np.ndarray, overlap: np.ndarray) -> bool:
        """Class c's step of rcnn_train.m on one image; True when it asks for a retraining."""
        first_time = position == 0
        is_last_time = position == self.epochs * self.num_images - 1
        candidate = overlap[:, c] < self.neg_iou
        if not first_time:
            candidate &= features @ self.W[:, c] + self.B[c] > self.hard_thresh
        keys = (position % self.num_images) * (1 << 32) + np.nonzero(candidate)[0].astype(np.int64)
        if position >= self.num_images and len(keys):  # a later pass: this image's boxes may be cached already
            fresh = ~np.isin(keys, self.cache[c].keys)
            candidate[candidate] = fresh
            keys = keys[fresh]
        if len(keys):
            self.cache[c].add(features[candidate], keys)
            self.num_added[c] += len(keys)
        return bool((first_time or self.num_added[c] > self.retrain_limit or is_last_time) and self.cache[c].n)

    def _advance(self) -> None:
        """Every class not waiting for a retraining mines the held images it has not seen, up to its
        next retraining; finished retrainings are applied; images every class has passed are dropped."""
        progress = True
        while progress:
            progress = False
            for c in [c for c, (f, _) in self._fits.items() if f.done()]:
                self._finish(c)
                progress = True
            for c in range(len(self.positives)):
                if c in self._fits or not len(self.positives[c]):
                    continue
                for position, features, overlap in self._held:
                    if position < self._class_position[c]:
                        continue
                    self._class_position[c] = position + 1
                    progress = True
                    if self._mine(c, position, features, overlap):
                        self._retrain(c, position)
                        break
            while self._held and all(
                self._class_position[c] > self._held[0][0] for c in range(len(self.positives)) if len(self.positives[c])
            ):
                self._held.popleft()
        if not any(len(p) for p in self.positives):
            self._held.clear()

    def _retrain(self, c: int, position: int) -> None:
        args = (self.positives[c], self.cache[c].x.copy() if self.workers > 1 else self.cache[c].x)
        if self.workers == 1:
            done: Future = Future()
            done.set_result(fit_rcnn_svm(*args, **self.solver))
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
            done = self._pool.submit(fit_rcnn_svm, *args, **self.solver)
        self._fits[c] = (done, position)
        if self.workers == 1:
            self._finish(c)

    def _finish(self, c: int) -> None:
        future, position = self._fits.pop(c)
        w, b = future.result()
        self.W[:, c], self.B[c] = w, b
        self.num_added[c] = 0
        self.updates[c] += 1
        self.last_update[c] = position
        self.cache[c].keep(self.cache[c].x @ w + b >= self.evict_thresh)  # evict the easy ones

    def sync(self) -> None:
        """Wait until every class has mined every image given (its retrainings applied)."""
        while self._fits or self._held:
            if self._fits:
                self._finish(next(iter(self._fits)))
            self._advance()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [D, C], B [C]) once every class has caught up; B is -inf for a class without positives
        (no detector)."""
        self.sync()
        self.close()
        bias = self.B.copy()
        bias[[not len(p) for p in self.positives]] = -np.inf
        return self.W, bias

    def cache_sizes(self) -> list[int]:
        return [cache.n for cache in self.cache]

    # ------------------------------------------------------------ resuming

    def save(self, path: Path) -> None:
        """The state after every image given so far (waits for the classes still behind)."""
        self.sync()
        arrays = {
            "W": self.W,
            "B": self.B,
            "num_added": self.num_added,
            "updates": self.updates,
            "last_update": self.last_update,
            "position": np.array(self.position),
        }
        for c, cache in enumerate(self.cache):
            arrays[f"x_neg{c}"], arrays[f"keys_neg{c}"] = cache.x, cache.keys
        write_npz(path, arrays)

    def load(self, path: Path) -> None:
        with np.load(path) as z:
            self.W, self.B = z["W"], z["B"]
            self.num_added, self.updates, self.position = z["num_added"], z["updates"], int(z["position"])
            self.last_update = z["last_update"]
            self.cache = [
                NegativeCache(self.dim, z[f"x_neg{c}"], z[f"keys_neg{c}"]) for c in range(len(self.positives))
            ]
        self._class_position[:] = self.position


def save_scale(path: Path, scale: float, mean_norm: float) -> None:
    write_json(path, {"scale": scale, "mean_norm": mean_norm})


def train_svms(
    p, feats: Callable, train: Sequence, store, num_classes: int, folder: Path
) -> tuple[np.ndarray, np.ndarray, float]:
    """The SVM stage (rcnn_train.m), each step saved in `folder`: (W [D, C], B [C], feature scale).
    `p`: the protocol's settings (`svm`, `seed`); `feats(image, boxes)`: region features
    (vidrep.eval.regions.RegionFeatures); `store`: the proposals (vidrep.eval.proposals.ProposalStore)."""
    # here, not at the top: the retraining processes import this module, and torch (under boxes) would
    # slow every worker's start
    from vidrep.eval.boxes import class_overlap

    o = p.svm
    done = folder / "svms.npz"
    if done.exists():
        with np.load(done) as z:
            return z["W"], z["B"], float(z["scale"])
    # 1. one global scale to mean norm target_norm (rcnn_feature_stats.m: 200 images x 200 boxes)
    scale_file = folder / "scale.json"
    if not scale_file.exists():
        rng = np.random.default_rng(p.seed)
        norms = []
        for i in rng.permutation(len(train))[: int(o["norm_images"])]:
            im = train[i]
            boxes = np.concatenate([im.boxes0, store.boxes(im)]).astype(np.float32)
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
            f = feats(im, im.boxes0.astype(np.float32)) * scale
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
        seed=p.seed,
        workers=int(o.get("workers", 1)),
        max_lag=int(o.get("max_lag", 128)),
    )
    state = folder / "mining.npz"
    if state.exists():
        miner.load(state)
        log.info("hard-negative mining resumes at image %d of %d x %d", miner.position, len(train), miner.epochs)
    bar = tqdm(
        total=len(train) * miner.epochs, initial=miner.position, desc="train: SVM hard-negative mining", unit="image"
    )
    try:
        while not miner.done:
            bar.update()
            im = train[miner.position % len(train)]
            boxes = np.concatenate([im.boxes0, store.boxes(im)]).astype(np.float32)
            miner.add_image(
                miner.position % len(train),
                feats(im, boxes) * scale,
                class_overlap(boxes, im.boxes0, im.labels, num_classes),
            )
            if miner.position % int(o["checkpoint_every"]) == 0 and not miner.done:
                miner.save(state)
        W, B = miner.weights()
    finally:
        miner.close()
        bar.close()
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
