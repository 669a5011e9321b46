"""Which VOC splits an evaluation trains and tests on, and the guard that keeps test images out of training.

R-CNN's recipes (rbgirshick/rcnn, experiments/rcnn_exp_train_and_test.m and the fine-tuning
solvers finetuning/voc_2007_prototxt, finetuning/voc_2012_prototxt): VOC2007 trains on trainval
and tests on test; VOC2012 (whose test annotations are not public) trains on train and tests on
val. The paper's VOC2012 figures follow the latter.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SPLITS = {2007: ("trainval", "test")}
LATER_YEARS_SPLITS = ("train", "val")  # 2008-2012: the test annotations are held by the evaluation server


class SplitOverlapError(ValueError):
    """Training and test images overlap; the message gives the overlap and the fix."""


def resolve_splits(year: int | str, train_split: str | None, test_split: str | None) -> tuple[str, str]:
    """(train split, test split): the given names, or R-CNN's defaults for `year` where None."""
    default = DEFAULT_SPLITS.get(int(year), LATER_YEARS_SPLITS)
    return (train_split or default[0], test_split or default[1])


def check_disjoint(
    train_ids: Sequence[str], test_ids: Sequence[str], train_split: str, test_split: str, year: int | str
) -> None:
    """Refuse an evaluation whose training images include test images (e.g. VOC2012 trainval vs val)."""
    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        shown = ", ".join(overlap[:10]) + (f", ... ({len(overlap)} in all)" if len(overlap) > 10 else "")
        default = resolve_splits(year, None, None)
        raise SplitOverlapError(
            f"VOC{year} {train_split} and {test_split} share {len(overlap)} of {len(set(test_ids))} test images "
            f"({shown}): "
            f"the test images would be trained on. Use disjoint splits, e.g. voc.train_split={default[0]} "
            f"voc.test_split={default[1]} "
            f"(R-CNN's VOC{year} recipe)"
        )


def use_07_metric_for(year: int | str, use_07_metric: bool | None) -> bool:
    """The devkit's AP variant: VOC2007's 11-point AP, all-point from VOC2010 on; an explicit bool overrides."""
    return int(year) < 2010 if use_07_metric is None else bool(use_07_metric)
