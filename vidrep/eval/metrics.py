"""PASCAL VOC average precision, exactly as the devkit computes it.

Detection (VOCevaldet / voc_eval.py): detections of a class over all images, highest score first;
each matches the ground truth of its image and class with the highest IoU (inclusive pixel
coordinates: width = x2 - x1 + 1, vidrep/eval/boxes.py); IoU >= threshold (VOCevaldet.m: `ovmax >= VOCopts.minoverlap`,
so an IoU equal to the threshold matches) makes it a true positive if that object is not yet
taken, a false positive if it is (a duplicate); a match to a difficult object counts as neither.
Recall is over the non-difficult objects. AP is the area under the interpolated
precision envelope (all points), or VOC2007's 11-point average.

Classification (VOCevalcls): one score per image and class; images whose only objects of the class
are difficult are ignored. torchmetrics' average precision does not interpolate the precision
envelope, so it differs from the devkit whenever precision rises with recall (tested), hence our own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vidrep.eval.boxes import box_iou


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from a precision/recall curve (detections in score order)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _class_pr(preds, targets, c: int, iou_threshold: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(recall, precision) over class c's detections in score order; None without a non-difficult object."""
    gts, taken, npos = [], [], 0
    for t in targets:
        labels = _np(t["labels"]).reshape(-1)
        keep = labels == c
        boxes = _np(t["boxes"]).reshape(-1, 4)[keep].astype(np.float64)
        difficult = (
            _np(t["difficult"]).reshape(-1)[keep].astype(bool) if "difficult" in t else np.zeros(keep.sum(), bool)
        )
        gts.append((boxes, difficult))
        taken.append(np.zeros(len(boxes), bool))
        npos += int((~difficult).sum())
    if npos == 0:
        return None
    image, score, box = [], [], []
    for i, p in enumerate(preds):
        keep = _np(p["labels"]).reshape(-1) == c
        s = _np(p["scores"]).reshape(-1)[keep]
        image.append(np.full(len(s), i))
        score.append(s)
        box.append(_np(p["boxes"]).reshape(-1, 4)[keep].astype(np.float64))
    image, score, box = np.concatenate(image), np.concatenate(score), np.concatenate(box)
    if len(score) == 0:
        return np.zeros(0), np.zeros(0)
    # each detection's best overlap and that object (the devkit's ovmax, jmax), one IoU matrix per image
    best, best_j = np.full(len(score), -np.inf), np.zeros(len(score), np.int64)
    for i in np.unique(image):
        at = np.nonzero(image == i)[0]
        if len(gts[i][0]):
            iou = box_iou(box[at], gts[i][0])
            best[at], best_j[at] = iou.max(1), iou.argmax(1)
    order = np.argsort(-score, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, k in enumerate(order):
        difficult = gts[image[k]][1]
        if not len(difficult):
            fp[d] = 1
            continue
        j = int(best_j[k])
        if best[k] >= iou_threshold:
            if difficult[j]:
                continue
            if not taken[image[k]][j]:
                tp[d] = 1
                taken[image[k]][j] = True
            else:
                fp[d] = 1
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)


def _ap_of(curve: tuple[np.ndarray, np.ndarray] | None, use_07_metric: bool) -> float:
    if curve is None:
        return float("nan")
    recall, precision = curve
    return average_precision(recall, precision, use_07_metric) if len(recall) else 0.0


def voc_detection_pr(
    preds: Sequence[dict], targets: Sequence[dict], *, iou_threshold: float = 0.5, num_classes: int
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per class, the (recall, precision) curve behind `voc_detection_ap` (None for a class without
    a non-difficult object)."""
    if len(preds) != len(targets):
        raise ValueError(
            f"{len(preds)} prediction dicts for {len(targets)} images; give one per image, empty when it has no "
            "detection"
        )
    return [_class_pr(preds, targets, c, iou_threshold) for c in range(num_classes)]


def ap_of_curves(curves: Sequence[tuple[np.ndarray, np.ndarray] | None], use_07_metric: bool = False) -> dict:
    """{"map", "ap"} from per-class PR curves: NaN for a class without a curve, kept out of the mean."""
    ap = [_ap_of(curve, use_07_metric) for curve in curves]
    valid = [a for a in ap if not np.isnan(a)]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": ap}


def voc_detection_ap(
    preds: Sequence[dict],
    targets: Sequence[dict],
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    num_classes: int,
) -> dict:
    """{"map": mean AP over classes with a non-difficult object, "ap": [AP per class]} (NaN for a
    class without any non-difficult object). preds/targets: one dict per image, boxes x1, y1, x2, y2
    in inclusive pixel coordinates, labels in [0, num_classes)."""
    return ap_of_curves(
        voc_detection_pr(preds, targets, iou_threshold=iou_threshold, num_classes=num_classes), use_07_metric
    )


def classification_pr(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(recall, precision) of one class over images in score order (labels as in
    `voc_classification_ap`); None without a positive image."""
    scores, labels = _np(scores).reshape(-1), _np(labels).reshape(-1)
    keep = labels != 0
    scores, labels = scores[keep], labels[keep]
    npos = int((labels > 0).sum())
    if npos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order] > 0)
    fp = np.cumsum(labels[order] < 0)
    return tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)


def voc_classification_ap(scores: np.ndarray, labels: np.ndarray, use_07_metric: bool = False) -> float:
    """AP of one class over images: labels 1 (the class is present), -1 (absent), 0 (only difficult
    objects of the class: ignored), as in the devkit's ground-truth files."""
    return _ap_of(classification_pr(scores, labels), use_07_metric)


def thin_curve(curve: tuple[np.ndarray, np.ndarray] | None, max_points: int = 200) -> dict | None:
    """A PR curve small enough for results.json: at most `max_points` points, evenly spaced along
    the ranking, always keeping the first and the last."""
    if curve is None:
        return None
    recall, precision = curve
    if len(recall) > max_points:
        keep = np.unique(np.linspace(0, len(recall) - 1, max_points).round().astype(int))
        recall, precision = recall[keep], precision[keep]
    return {"recall": [round(float(r), 5) for r in recall], "precision": [round(float(p), 5) for p in precision]}
