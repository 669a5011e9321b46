"""The linear probe (vidrep/eval/probe.py) on data whose answer is known."""

import numpy as np
import pytest

from vidrep.eval.probe import probe_accuracy


def blobs(n, rng, dims=20, separation=4.0):
    y = rng.integers(0, 3, size=n)
    centres = separation * np.eye(3, dims)
    return centres[y] + rng.normal(size=(n, dims)), y


def test_separable_classes_are_found_and_noise_is_chance():
    rng = np.random.default_rng(0)
    x, y = blobs(600, rng)
    tx, ty = blobs(300, rng)
    result = probe_accuracy(x, y, tx, ty)
    assert result["accuracy"] > 0.95 and result["num_train"] == 600 and result["num_test"] == 300
    # features that carry no label: accuracy near chance (1/3)
    noise = probe_accuracy(rng.normal(size=(600, 20)), y, rng.normal(size=(300, 20)), ty)
    assert abs(noise["accuracy"] - 1 / 3) < 0.1


def test_scale_and_dead_units_do_not_matter():
    rng = np.random.default_rng(1)
    x, y = blobs(400, rng)
    tx, ty = blobs(200, rng)
    base = probe_accuracy(x, y, tx, ty)["accuracy"]
    dead = np.zeros((len(x), 5))
    scaled = probe_accuracy(np.c_[1e-4 * x, dead], y, np.c_[1e-4 * tx, np.zeros((len(tx), 5))], ty)["accuracy"]
    assert scaled == pytest.approx(base, abs=0.02)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one label per feature row"):
        probe_accuracy(np.zeros((3, 2)), [0, 1], np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match="at least 2"):
        probe_accuracy(np.zeros((3, 2)), [0, 0, 0], np.zeros((1, 2)), [0])
