"""Box maths shared by the detection stages and VOC AP, in R-CNN's inclusive pixels (boxoverlap.m,
nms.m: a box x1..x2 is x2 - x1 + 1 pixels wide).

torchvision's `box_iou` and `batched_nms` work in continuous coordinates (width x2 - x1); adding 1
to x2 and y2 makes them R-CNN's, and in float64 they give the same overlaps and the same kept boxes
as the hand-written loops they replaced (tests/test_eval.py checks both on random boxes with tied
scores and duplicate boxes). torchvision's NMS suppresses a box whose IoU with a kept one is above
the threshold, visiting scores in a stable descending order, as nms.m does.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms
from torchvision.ops import box_iou as _box_iou


def _inclusive(boxes) -> torch.Tensor:
    """[N, 4] float64 tensor with x2, y2 moved one pixel out (inclusive -> continuous)."""
    b = torch.as_tensor(np.asarray(boxes, np.float64).reshape(-1, 4)).clone()
    b[:, 2:] += 1.0
    return b


def box_iou(boxes: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[N, M] float64 IoU of boxes x1, y1, x2, y2 in inclusive pixels (boxoverlap.m)."""
    return _box_iou(_inclusive(boxes), _inclusive(other)).numpy()


def class_overlap(boxes: np.ndarray, gt: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[R, C] float32: each box's highest IoU with the objects of each class (0 without one), as
    roidb_from_voc.m."""
    out = np.zeros((len(boxes), num_classes), np.float32)
    if len(gt) and len(boxes):
        iou = box_iou(boxes, gt)
        for c in np.unique(labels):
            out[:, c] = iou[:, labels == c].max(1)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, groups: np.ndarray | None = None) -> np.ndarray:
    """int64 indices kept by greedy NMS (nms.m: a box goes when its IoU with a higher-scored kept box
    exceeds `threshold`), highest score first, ties in input order; with `groups` (e.g. class
    labels) each group is suppressed on its own."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    s = torch.as_tensor(np.asarray(scores, np.float64).reshape(-1))
    g = torch.zeros(len(s), dtype=torch.int64) if groups is None else torch.as_tensor(np.asarray(groups, np.int64))
    return batched_nms(_inclusive(boxes), s, g, float(threshold)).numpy().astype(np.int64)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes of an image of `width` pixels mirrored left-right (inclusive pixels, 0-based)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([width - 1 - b[:, 2], b[:, 1], width - 1 - b[:, 0], b[:, 3]], 1).astype(np.float32)
