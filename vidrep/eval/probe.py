"""A linear probe on frozen features: multinomial logistic regression fit on training features and
labels, its accuracy on held-out ones. What a representation makes linearly separable, with no
fine-tuning (the demo world's object classes, the Fashion-MNIST test set).

    probe_accuracy(train_x, train_y, test_x, test_y)  # {"accuracy", "num_train", "num_test"}

Features are standardised with the training set's mean and spread (so one regularisation strength
`c` suits layers of any scale); lbfgs, deterministic. Cost: sklearn's lbfgs on N x D float64, about
N x D x classes x iterations FLOP (10K x 1024 x 10 x 1000 = 1e11: a minute on one core).
"""

from __future__ import annotations

import numpy as np


def probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    c: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """Fit on (train_x [N, D], train_y [N]), score on (test_x, test_y); accuracy in [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(
            f"probe: {len(train_x)} training features for {len(train_y)} labels, {len(test_x)} test features for "
            f"{len(test_y)} labels; give one label per feature row"
        )
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"probe: the training labels hold {len(np.unique(train_y))} class; a probe needs at least 2")
    mean = train_x.mean(axis=0)
    scale = train_x.std(axis=0)
    scale[scale == 0] = 1.0  # a dead unit stays 0, not NaN
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit((train_x - mean) / scale, train_y)
    predicted = model.predict((test_x - mean) / scale)
    return {"accuracy": float(np.mean(predicted == test_y)), "num_train": len(train_y), "num_test": len(test_y)}
