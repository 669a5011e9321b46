"""Per-class linear SVMs on frozen features, as restartable stages (the VOC07 SVM benchmark).

For each class: a linear SVM (squared hinge, L2, positives weighted 2, tol 1e-4, max_iter 2000:
fair_self_supervision_benchmark tools/svm/train_svm_kfold.py) per cost of the cost list, scored by
k-fold cross-validated AP on trainval (theirs: sklearn's cross_val_score(cv=3,
scoring='average_precision'), i.e. unshuffled stratified folds and sklearn's uninterpolated AP with
difficult-only images as negatives; `cv_scoring="voc"` is our former variant: shuffled folds, the
devkit's AP ignoring difficult-only images); the best cost (the first on ties, np.argmax) is refit
on all of trainval and tested. Difficult-only images are negatives in training and ignored at test. Every (class, cost)
cross-validation and every final per-class result is a small JSON file written atomically, so an
interrupted evaluation resumes where it stopped.

The (class, cost) cross-validations, then the per-class refits, run in `workers` joblib processes
(liblinear is single-threaded); each writes its own file as it finishes, so a killed run keeps every
finished one. The features reach the processes as memory maps (joblib's default for arrays over
1 MB), not as copies.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from tqdm import tqdm

from vidrep.common.io import write_json
from vidrep.eval.metrics import classification_pr, thin_curve, voc_classification_ap

log = logging.getLogger(__name__)


def fit_svm(x: np.ndarray, y: np.ndarray, cost: float, seed: int = 0, max_iter: int = 2000) -> tuple[np.ndarray, float]:
    """(w, b) of a linear SVM on labels y in {1, -1}."""
    from sklearn.svm import LinearSVC

    svm = LinearSVC(
        C=cost,
        loss="squared_hinge",
        penalty="l2",
        class_weight={1: 2.0, -1: 1.0},
        dual=True,
        max_iter=max_iter,
        tol=1e-4,
        random_state=seed,
    )
    svm.fit(x, y)
    return svm.coef_.reshape(-1).astype(np.float32), float(svm.intercept_[0])


def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def cv_folds(y: np.ndarray, folds: int, seed: int, scoring: str) -> list[np.ndarray]:
    """Held-out indices per fold: sklearn's StratifiedKFold without shuffling (what cross_val_score
    uses for a classifier: Goyal et al.) or a seeded random split (scoring="voc")."""
    if scoring == "goyal":
        from sklearn.model_selection import StratifiedKFold

        return [held for _, held in StratifiedKFold(n_splits=folds).split(np.zeros(len(y)), y)]
    return folds_of(len(y), folds, seed)


def cross_validated_ap(
    x: np.ndarray,
    labels: np.ndarray,
    cost: float,
    folds: int,
    seed: int,
    use_07_metric: bool,
    scoring: str = "goyal",
    max_iter: int = 2000,
) -> float:
    from sklearn.metrics import average_precision_score

    aps = []
    y = np.where(labels > 0, 1, -1)
    for held in cv_folds(y, folds, seed, scoring):
        train = np.setdiff1d(np.arange(len(x)), held)
        if (y[train] > 0).sum() == 0 or (y[train] < 0).sum() == 0:
            continue
        w, b = fit_svm(x[train], y[train], cost, seed, max_iter)
        scores = x[held] @ w + b
        if scoring == "goyal":
            aps.append(float(average_precision_score(y[held], scores)) if (y[held] > 0).any() else float("nan"))
        else:
            aps.append(voc_classification_ap(scores, labels[held], use_07_metric))
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def svm_class_results(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    classes: Sequence[str],
    costs: Sequence[float],
    folds: int,
    seed: int,
    use_07_metric: bool,
    cache_dir: Path,
    cv_scoring: str = "goyal",
    max_iter: int = 2000,
    desc: str = "SVMs",
    workers: int = 1,
) -> list[dict]:
    """Per class: {"class", "cost", "cv_ap" per cost, "ap", "pr" (the test PR curve, thinned)};
    labels are [N, C] in {1, 0, -1}. `workers` processes fit in parallel (1: in this process). A
    progress bar named `desc` counts the stages; liblinear's ConvergenceWarnings (one per fit that
    stops at max_iter) are summed into one line."""
    done: dict[str, dict] = {}
    todo = []  # classes to refit
    for c, name in enumerate(classes):
        final = cache_dir / f"{name}.json"
        if final.exists():
            done[name] = json.loads(final.read_text())
        elif (train_labels[:, c] > 0).sum() == 0:
            done[name] = {
                "class": name,
                "cost": None,
                "cv_ap": {},
                "ap": float("nan"),
                "note": "no positive in trainval",
            }
            write_json(final, done[name])
        else:
            todo.append((c, name))
    steps = {(name, cost): cache_dir / "cv" / f"{name}_C{cost:g}.json" for _, name in todo for cost in costs}
    cv_jobs = [
        delayed(_cv_stage)(
            train_x, train_labels[:, c], cost, folds, seed, use_07_metric, cv_scoring, max_iter, name, steps[name, cost]
        )
        for c, name in todo
        for cost in costs
        if not steps[name, cost].exists()
    ]
    unconverged = 0
    with (
        Parallel(n_jobs=workers, return_as="generator_unordered") as parallel,
        tqdm(total=len(cv_jobs) + len(todo), desc=desc, unit="fit") as bar,
    ):
        for count in parallel(cv_jobs):
            unconverged += count
            bar.update()
        final_jobs = []
        for c, name in todo:
            cv = {f"{cost:g}": json.loads(steps[name, cost].read_text())["cv_ap"] for cost in costs}
            final_jobs.append(
                delayed(_final_stage)(
                    train_x,
                    train_labels[:, c],
                    test_x,
                    test_labels[:, c],
                    name,
                    costs,
                    cv,
                    seed,
                    use_07_metric,
                    max_iter,
                    cache_dir / f"{name}.json",
                )
            )
        for result, count in parallel(final_jobs):
            done[result["class"]] = result
            unconverged += count
            bar.update()
    if unconverged:
        log.warning(
            "%s: %d of the SVM fits stopped at max_iter=%d before liblinear's tolerance (a larger max_iter lets "
            "them finish; the benchmark's own setting is 2000)",
            desc,
            unconverged,
            max_iter,
        )
    return [done[name] for name in classes]


def _counting_convergence(fit, *args) -> tuple[object, int]:
    """fit(*args) and the number of ConvergenceWarnings it raised (counted where it runs: a worker
    process's warnings do not reach the parent); other warnings are re-raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        result = fit(*args)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def _cv_stage(x, labels, cost, folds, seed, use_07_metric, scoring, max_iter, name, step: Path) -> int:
    """One (class, cost) cross-validation, written to `step`; returns its unconverged fits."""
    ap, unconverged = _counting_convergence(
        cross_validated_ap, x, labels, cost, folds, seed, use_07_metric, scoring, max_iter
    )
    write_json(step, {"class": name, "cost": cost, "cv_ap": ap})
    return unconverged


def _final_stage(train_x, train_labels, test_x, test_labels, name, costs, cv, seed, use_07_metric, max_iter, final):
    """The best cost's refit on all of trainval, tested, written to `final`; returns (result, unconverged)."""
    best = max(costs, key=lambda k: -np.inf if np.isnan(cv[f"{k:g}"]) else cv[f"{k:g}"])
    (w, b), unconverged = _counting_convergence(
        fit_svm, train_x, np.where(train_labels > 0, 1, -1), best, seed, max_iter
    )
    scores = test_x @ w + b
    result = {
        "class": name,
        "cost": best,
        "cv_ap": cv,
        "ap": voc_classification_ap(scores, test_labels, use_07_metric),
        "pr": thin_curve(classification_pr(scores, test_labels)),
    }
    write_json(final, result)
    return result, unconverged
