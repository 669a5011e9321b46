"""Per-stage cost of the detection protocol on real-sized inputs, projected to VOC2012 train + val.

    python bench/detection.py                      # CPU (or the GPU when there is one), ~2-4 min on 2 cores
    python bench/detection.py --device cpu --regions 64 --svm-negatives 4000

Inputs as at paper scale: a 500x375 image, 2,000 proposals, AlexNet (CaffeNet 227, fc 4096), 20
classes. Each stage is timed on a sample (a batch of warped regions, one RoI-pooled image, one
fine-tuning step's network part, the fine-tuning loader's batch of 128 windows from 128 JPEGs in one
worker process, one mining step, one SVM retraining, one test image) and projected with R-CNN's
counts: VOC2012 train 5,717 and val 5,823 images; feature passes over train = feature statistics
(200 x 200 regions) + positives (13.6K objects) + the mining pass (5,717 x 2,000), and val x 2,000
at test; fine-tuning 100,000 steps of 128 regions (each step the slower of the network and the
loader's `--loader-workers` workers, which prefetch in parallel); a 3-network ensemble triples the network stages
and the SVM dimension. Peak memory: the process's peak RSS after each stage (it only grows, so a
stage's own peak is at most the figure on its row) and the arrays a stage holds, as arithmetic.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import markdown_table  # noqa: E402
from vidrep.eval.detection import DetectionNet, nms_inclusive  # noqa: E402
from vidrep.eval.proposals import selective_search  # noqa: E402
from vidrep.eval.rcnn_svm import HardNegativeMiner, fit_rcnn_svm  # noqa: E402
from vidrep.eval.warp import warp_regions  # noqa: E402
from vidrep.eval.windows import WindowCrops, Windows, image_windows  # noqa: E402
from vidrep.models.caffenet import CaffeNet  # noqa: E402

TRAIN, VAL, PROPOSALS, OBJECTS, CLASSES, FT_STEPS = 5717, 5823, 2000, 13609, 20, 100_000


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, reps: int = 1) -> float:
    fn()  # warm-up (allocations, kernels)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def image(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A natural-ish image: smoothed noise with a few flat shapes (selective search's cost depends on texture)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 3)
    for _ in range(8):
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        cv2.rectangle(
            img,
            (x, y),
            (x + int(rng.integers(30, 150)), y + int(rng.integers(30, 150))),
            rng.integers(0, 255, 3).tolist(),
            -1,
        )
    return img


def proposals_like(n: int, h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 20, h - 20], (n, 2))
    wh = rng.uniform(20, [w, h], (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--regions", type=int, default=128, help="warped regions per timed batch")
    p.add_argument("--ft-regions", type=int, default=32, help="regions in the timed fine-tuning step (scaled to 128)")
    p.add_argument("--svm-negatives", type=int, default=6000, help="cache size of the timed SVM retraining")
    p.add_argument("--workers", type=int, default=16, help="selective-search processes assumed in the projection")
    p.add_argument(
        "--loader-workers", type=int, default=14, help="fine-tuning DataLoader workers assumed in the projection"
    )
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)
    rows, seconds = [], {}
    img = image()

    t = timed(lambda: selective_search(img[:, :, ::-1].copy(), max_side=500, mode="fast", max_proposals=2000))
    n_props = len(selective_search(img[:, :, ::-1].copy(), max_side=500, mode="fast", max_proposals=2000))
    seconds["proposals"] = t * (TRAIN + VAL) / args.workers
    rows.append(
        [
            "selective search (fast), 1 image",
            f"{t:.2f} s ({n_props} boxes)",
            f"{peak_mb():.0f}",
            f"{seconds['proposals'] / 3600:.2f} h on {args.workers} processes",
        ]
    )

    trunk = CaffeNet(227, 4096, 4096).to(dev).eval()
    model = DetectionNet(trunk, CLASSES, "warp", 227, 4096, 4096).to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).to(dev)
    boxes = proposals_like(args.regions)
    mean = torch.tensor([104.0, 117.0, 123.0], device=dev).view(1, 3, 1, 1)

    @torch.no_grad()
    def warp_batch():
        crops, mask = warp_regions(x, boxes, 227, 16)
        return model.warped((crops - mean) * mask)["fc7"]

    t = timed(warp_batch) / args.regions
    regions_per_net = 200 * 200 + OBJECTS + TRAIN * PROPOSALS + VAL * PROPOSALS
    seconds["region features (warp)"] = t * regions_per_net
    rows.append(
        [
            f"warp + conv1..fc7, per region (batches of {args.regions})",
            f"{1e3 * t:.2f} ms",
            f"{peak_mb():.0f}",
            f"{seconds['region features (warp)'] / 3600:.1f} h for {regions_per_net / 1e6:.1f}M regions",
        ]
    )

    roi_model = DetectionNet(CaffeNet(227, 4096, 4096).to(dev), CLASSES, "roi_pool", 227, 4096, 4096).to(dev).eval()
    big = torch.nn.functional.interpolate(x[None].float(), size=(600, 800), mode="bilinear") - mean
    all_boxes = torch.from_numpy(proposals_like(PROPOSALS) * 1.6).to(dev)

    @torch.no_grad()
    def roi_image():
        return roi_model.pooled(big, all_boxes)["fc7"]

    t = timed(roi_image)
    seconds_roi = t * (TRAIN * 2 + VAL)  # positives and statistics are a small share here
    rows.append(
        [
            "roi_pool alternative: 1 image at 600 px, 2,000 RoIs to fc7",
            f"{t:.2f} s",
            f"{peak_mb():.0f}",
            f"{seconds_roi / 3600:.1f} h (instead of the warp row)",
        ]
    )

    ft = DetectionNet(CaffeNet(227, 4096, 4096).to(dev), CLASSES, "warp", 227, 4096, 4096).to(dev).train()
    opt = torch.optim.SGD(ft.parameters(), lr=0.001, momentum=0.9)
    crops, mask = warp_regions(x, proposals_like(args.ft_regions, seed=1), 227, 16)
    target = torch.randint(0, CLASSES + 1, (args.ft_regions,), device=dev)

    def ft_step():  # the network's part of a step: the loader's workers bring the crops
        loss = torch.nn.functional.cross_entropy(ft.warped((crops - mean) * mask)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step = timed(ft_step) * 128 / args.ft_regions
    rows.append(
        [
            f"fine-tuning step, network only, {args.ft_regions} crops (scaled to 128)",
            f"{t_step:.2f} s",
            f"{peak_mb():.0f}",
            f"{t_step * FT_STEPS / 3600:.1f} h for {FT_STEPS:,} steps",
        ]
    )

    # The loader: R-CNN's batch of 128 windows touches ~127 distinct images of 5,717, so each is a
    # JPEG decode plus one warp; measured in this process (= one DataLoader worker).
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(128):
            paths.append(Path(tmp) / f"{i}.jpg")
            cv2.imwrite(str(paths[-1]), image(seed=i))
        windows = Windows(np.arange(128, dtype=np.int32), proposals_like(128, seed=3), np.zeros(128, np.uint8), 0)
        crops_of = WindowCrops(paths, windows, 227, 16)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        t_load = timed(lambda: crops_of.__getitems__([(i, bool(i % 2)) for i in range(128)]))
        torch.set_num_threads(threads)
    loader = t_load / args.loader_workers
    seconds["fine-tuning"] = max(t_step, loader) * FT_STEPS  # the workers prefetch while the network trains
    rows.append(
        [
            "fine-tuning loader, 128 windows from 128 JPEGs (decode + warp), 1 worker",
            f"{t_load:.2f} s",
            f"{peak_mb():.0f}",
            f"{t_load * FT_STEPS / 3600:.1f} worker-h; {args.loader_workers} workers: {loader:.2f} s/step",
        ]
    )
    rows.append(
        [
            "fine-tuning, R-CNN's schedule (max of the two rows above per step)",
            f"{max(t_step, loader):.2f} s/step",
            "",
            f"{seconds['fine-tuning'] / 3600:.1f} h for {FT_STEPS:,} steps x 128 regions",
        ]
    )
    boxes_im = proposals_like(PROPOSALS, seed=4)
    gt_im = proposals_like(3, seed=5)
    t_win = timed(lambda: image_windows(gt_im, np.array([0, 1, 2]), boxes_im, CLASSES, 0.5, (0.0, 0.5)), reps=3)
    n_windows = TRAIN * (PROPOSALS + 2.4)
    rows.append(
        [
            "fine-tuning window index, 1 image (2,000 proposals)",
            f"{1e3 * t_win:.1f} ms",
            f"{peak_mb():.0f}",
            f"{t_win * TRAIN / 60:.1f} min once; {n_windows / 1e6:.1f}M windows x 21 B = {n_windows * 21 / 2**20:.0f} "
            "MB",
        ]
    )

    rng = np.random.default_rng(0)
    feats = (rng.normal(0, 1, (PROPOSALS, 4096)) * 20 / 64).astype(np.float32)
    overlap = rng.uniform(0, 0.6, (PROPOSALS, CLASSES)).astype(np.float32)
    positives = [(rng.normal(0.2, 1, (OBJECTS // CLASSES, 4096)) * 20 / 64).astype(np.float32) for _ in range(CLASSES)]
    miner = HardNegativeMiner(positives, num_images=10**6, retrain_limit=10**9)
    miner.add_image(0, feats[:50], overlap[:50])  # the first image trains every class (small, to keep this quick)
    # a trained detector's score spread: ~0.6 % of the negatives above -1.0001, ~12 per image and class as in R-CNN
    miner.W = rng.normal(0, 0.01, (4096, CLASSES)).astype(np.float32)
    miner.B = np.full(CLASSES, -1.5, np.float32)
    t = timed(lambda: miner.add_image(miner.position, feats, overlap), reps=2)
    seconds["SVM mining (scoring, caches)"] = t * TRAIN
    rows.append(
        [
            "mining step, 1 image (scores, hard negatives, cache)",
            f"{1e3 * t:.0f} ms",
            f"{peak_mb():.0f}",
            f"{seconds['SVM mining (scoring, caches)'] / 60:.1f} min",
        ]
    )

    neg = (rng.normal(0, 1, (args.svm_negatives, 4096)) * 20 / 64).astype(np.float32)
    t = timed(lambda: fit_rcnn_svm(positives[0], neg))
    retrains = CLASSES * (
        2 + TRAIN * 20 // 2000
    )  # R-CNN: ~20 hard negatives per image and class, a retraining per 2,000 added
    seconds["SVM retraining (liblinear)"] = t * retrains
    rows.append(
        [
            f"one SVM retraining ({len(positives[0])} pos + {args.svm_negatives} neg x 4096)",
            f"{t:.2f} s",
            f"{peak_mb():.0f}",
            f"{seconds['SVM retraining (liblinear)'] / 3600:.2f} h for ~{retrains} retrainings",
        ]
    )

    W, B = rng.normal(0, 0.01, (4096, CLASSES)).astype(np.float32), np.full(CLASSES, -1.0, np.float32)
    test_boxes = proposals_like(PROPOSALS, seed=2)

    def test_image():
        scores = feats @ W + B
        for c in range(CLASSES):
            top = np.argsort(-scores[:, c])[:100]
            nms_inclusive(test_boxes[top], scores[top, c], 0.3)

    t = timed(test_image)
    seconds["test scoring + NMS"] = t * VAL
    rows.append(
        [
            "test scoring + NMS, 1 image",
            f"{1e3 * t:.0f} ms",
            f"{peak_mb():.0f}",
            f"{seconds['test scoring + NMS'] / 60:.1f} min",
        ]
    )

    print(f"device: {dev}; torch threads: {torch.get_num_threads()}")
    print(
        markdown_table(
            ["stage (sample)", "time", "peak RSS so far (MB)", "projected to VOC2012 train + val, 1 network"], rows
        )
    )
    one = sum(seconds.values())
    network_stages = seconds["region features (warp)"] + seconds["fine-tuning"]
    three = (
        one + 2 * network_stages + 2 * (seconds["SVM mining (scoring, caches)"] + seconds["SVM retraining (liblinear)"])
    )
    print(
        f"\nwhole protocol, warp regions: 1 network {one / 3600:.1f} h, 3-network ensemble {three / 3600:.1f} h "
        f"(proposals computed once; with precomputed proposals subtract {seconds['proposals'] / 3600:.2f} h)"
    )
    print(
        "memory held by design (arithmetic): one image's fc7 2,000 x 4,096 x 4 B = 33 MB; a warp batch of 128 x 3 x "
        "227^2 "
        "x 4 B = 79 MB; positives 13.6K x 4,096 x 4 B = 223 MB (x3 for 3 networks); hard-negative caches per class up "
        "to "
        "(kept + 2,000) x 4,096 x 4 B, ~0.1-0.3 GB each"
    )


if __name__ == "__main__":
    main()
