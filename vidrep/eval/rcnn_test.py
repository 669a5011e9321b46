"""R-CNN's test stage (rcnn_test.m, then imdb_eval_voc.m's NMS): score every proposal of every test
image with the SVMs, keep each class's top `max_per_image` boxes per image, prune each class to its
`max_per_set` x images best boxes over the whole set, suppress overlaps (NMS at `nms_iou`, nms.m).

rcnn_test.m's pruning ("heuristic that yields at most 100k pre-NMS boxes per 2500 images":
max_per_set = ceil(100000 / 2500) x images = 40 per image) raises each class's threshold to its
max_per_set-th best score among the per-image top-100s and then drops every box below it. The
threshold is a score, so pruning and NMS commute (a box that survives the threshold has every
higher-scored box surviving too): detections are saved per chunk of `test_chunk` images after NMS,
with each image's pre-NMS top scores, and the set's threshold is applied once all chunks exist, so
a killed test resumes at its last finished chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidrep.common.io import write_npz
from vidrep.eval.boxes import nms


def detect(
    scores: np.ndarray, boxes: np.ndarray, bias: np.ndarray, max_per_image: int, nms_iou: float
) -> tuple[dict, np.ndarray]:
    """One image's detections per class with a detector (finite bias): the top `max_per_image`
    regions by score (rcnn_test.m), then NMS at `nms_iou` (inclusive pixels, nms.m). Returns
    ({"boxes", "scores", "labels"}, the pre-NMS top scores [N] float32 with their labels)."""
    keep_all, top_all = [], []
    for c in range(scores.shape[1]):
        if not np.isfinite(bias[c]):
            continue
        top = np.argsort(-scores[:, c], kind="stable")[:max_per_image]
        keep_all.append((c, top[nms(boxes[top], scores[top, c], nms_iou)]))
        top_all.append((c, top))
    labels = np.concatenate([np.full(len(k), c, np.int64) for c, k in keep_all] or [np.zeros(0, np.int64)])
    det = {
        "boxes": np.concatenate([boxes[k] for _, k in keep_all] or [np.zeros((0, 4), np.float32)]).astype(np.float32),
        "scores": np.concatenate([scores[k, c] for c, k in keep_all] or [np.zeros(0)]).astype(np.float32),
        "labels": labels,
    }
    tops = {
        "top_scores": np.concatenate([scores[t, c] for c, t in top_all] or [np.zeros(0)]).astype(np.float32),
        "top_labels": np.concatenate([np.full(len(t), c, np.int64) for c, t in top_all] or [np.zeros(0, np.int64)]),
    }
    return det, tops


def set_thresholds(
    top_scores: np.ndarray, top_labels: np.ndarray, num_classes: int, max_per_set: int | None
) -> np.ndarray:
    """[C] per-class score thresholds of rcnn_test.m's pruning: the `max_per_set`-th best of the
    class's per-image top scores when it has more, else -inf (nothing pruned)."""
    out = np.full(num_classes, -np.inf)
    if max_per_set is None:
        return out
    for c in range(num_classes):
        s = top_scores[top_labels == c]
        if len(s) > max_per_set:
            out[c] = np.partition(s, len(s) - max_per_set)[len(s) - max_per_set]
    return out


def test_detections(
    p, feats: Callable, test: Sequence, store, W: np.ndarray, B: np.ndarray, scale: float, folder: Path
) -> list[dict]:
    """Detections per test image (boxes 1-based inclusive, as the devkit's). `p`: the protocol's
    settings (max_per_image, max_per_set, nms_iou, test_chunk)."""
    chunks, bar = [], tqdm(total=len(test), desc="test: detections", unit="image")
    for start in range(0, len(test), p.test_chunk):
        chunk = folder / f"chunk{start:07d}.npz"
        images = test[start : start + p.test_chunk]
        if not chunk.exists():
            arrays = {}
            for k, im in enumerate(images):
                bar.update()
                boxes = store.boxes(im)
                det, tops = detect(feats(im, boxes) * scale @ W + B, boxes, B, p.max_per_image, p.nms_iou)
                arrays.update({f"{k}_{name}": v for name, v in {**det, **tops}.items()})
            write_npz(chunk, arrays)
        with np.load(chunk) as z:
            chunks.append(
                [{name: z[f"{k}_{name}"] for name in ("boxes", "scores", "labels")} for k in range(len(images))]
            )
            tops = [(z[f"{k}_top_scores"], z[f"{k}_top_labels"]) for k in range(len(images))]
        chunks[-1] = (chunks[-1], tops)
        bar.n = min(len(test), start + p.test_chunk)  # chunks read back from an earlier run count too
        bar.refresh()
    bar.close()
    per_set = None if p.max_per_set is None else int(np.ceil(p.max_per_set * len(test)))
    top_scores = np.concatenate([s for _, tops in chunks for s, _ in tops] or [np.zeros(0, np.float32)])
    top_labels = np.concatenate([lab for _, tops in chunks for _, lab in tops] or [np.zeros(0, np.int64)])
    thresh = set_thresholds(top_scores, top_labels, len(B), per_set)
    preds = []
    for dets, _ in chunks:
        for d in dets:
            keep = d["scores"] >= thresh[d["labels"]]
            preds.append(
                {
                    "boxes": torch.from_numpy(d["boxes"][keep] + 1.0).float(),
                    "scores": torch.from_numpy(d["scores"][keep]).float(),
                    "labels": torch.from_numpy(d["labels"][keep]).long(),
                }
            )
    return preds
