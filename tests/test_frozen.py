"""The frozen-feature protocol's parallel parts: images decoded in DataLoader workers (the features
bit-identical to one process's), Goyal et al.'s resize, and SVM fits in joblib processes that a
kill -9 does not set back (a rerun fits only what is not on disk)."""

import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from vidrep.eval.features import extract_features, goyal_resize, load_image, random_network


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEGs of assorted sizes and aspect ratios (one with the shorter side already 256)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(120, 160), (333, 100), (256, 300), (90, 90), (200, 150), (75, 310), (140, 141)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], axis=2) + rng.normal(0, 20, (h, w, 3))
        paths.append(folder / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), np.clip(img, 0, 255).astype(np.uint8))
    return paths


def test_features_are_bit_identical_with_and_without_loader_workers(photos):
    net = random_network(input_size=67, seed=3)
    layers = ["conv3", "conv5", "fc7"]
    serial = extract_features(net, photos, layers, batch_size=3, pooling="goyal", resize="goyal", workers=0)
    parallel = extract_features(net, photos, layers, batch_size=3, pooling="goyal", resize="goyal", workers=2)
    for name in layers:
        assert serial[name].shape[0] == len(photos)
        assert np.array_equal(serial[name], parallel[name]), name


def _bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centred bilinear resampling without antialiasing (cv2.INTER_LINEAR's definition), via torch."""
    x = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("shape", [(120, 160), (333, 100), (256, 300)])
def test_goyal_resize_is_their_scale_to_256_then_the_whole_image_to_the_input(shape):
    h, w = shape
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
    # data_transformation.scale: shorter side 256, the longer floor(long / short * 256); none at 256 already
    if min(h, w) == 256:
        mid = img.astype(np.float64)
    elif w < h:
        mid = _bilinear(img, int(np.floor(h / w * 256)), 256)
    else:
        mid = _bilinear(img, 256, int(np.floor(w / h * 256)))
    expected = _bilinear(mid, 227, 227)
    ours = goyal_resize(img, 227)
    assert ours.dtype == np.float32 and ours.shape == (227, 227, 3)
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_load_image_resizes_rgb(photos):
    bgr = cv2.imread(str(photos[0]))
    goyal = load_image(photos[0], 227, "goyal")
    np.testing.assert_array_equal(goyal, goyal_resize(bgr, 227)[:, :, ::-1].transpose(2, 0, 1))
    warp = load_image(photos[0], 67)
    assert warp.dtype == np.uint8 and warp.shape == (3, 67, 67)
    with pytest.raises(ValueError, match="unknown resize"):
        load_image(photos[0], 67, "crop")


# The data and the call, run in a process of its own (to be killed) and in this one.
SVM_DATA = """
import numpy as np

rng = np.random.default_rng(0)
x = rng.normal(size=(300, 400)).astype(np.float32)
labels = np.where(rng.random((300, 4)) < 0.3, 1, -1)
x[:, :4] += 0.8 * labels  # a signal per class
x /= np.linalg.norm(x, axis=1, keepdims=True)
args = (x[:200], labels[:200], x[200:], labels[200:], ["a", "b", "c", "d"], [1e-3, 0.01, 0.1, 1.0, 10.0, 100.0], 3, 0)
"""
SVM_RUN = (
    SVM_DATA
    + """
import sys
from pathlib import Path
from vidrep.eval.svm import svm_class_results

svm_class_results(*args, False, Path(sys.argv[1]), workers=int(sys.argv[2]))
"""
)


def _run_svms(cache, workers: int) -> list[dict]:
    from vidrep.eval.svm import svm_class_results

    scope = {}
    exec(SVM_DATA, scope)
    return svm_class_results(*scope["args"], False, cache, workers=workers)


def test_a_killed_parallel_svm_stage_refits_only_what_is_not_on_disk(tmp_path):
    cache = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SVM_RUN, str(cache), "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its joblib workers die with it
    )
    deadline = time.monotonic() + 300
    while not list((cache / "cv").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (cache / "cv").glob("*.json")}
    total = 4 * 6
    assert 0 < len(kept) < total and not list(cache.glob("?.json"))
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".json"]  # no partial file left behind
    resumed = _run_svms(cache, 2)
    # what was on disk was not fitted again, the rest was
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    assert len(list((cache / "cv").glob("*.json"))) == total
    fresh = _run_svms(tmp_path / "fresh", 1)  # one process: the same results
    assert resumed == fresh
    assert all(0 <= r["ap"] <= 1 for r in fresh)
