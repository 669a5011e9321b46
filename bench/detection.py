"""Per-stage cost of the detection protocol, projected to VOC2012 train + val on one H200 + 16 cores.

    python bench/detection.py --photos DIR         # CPU (or the GPU when there is one), ~5-10 min on 2 cores
    python bench/detection.py --device cpu --regions 32 --ft-regions 16 --svm-negatives 3000 12000

Inputs as at paper scale: 500 px images, 2,000 proposals, CaffeNet 227 with fc 4,096, 20 classes.
Each stage is timed on a sample and projected with R-CNN's counts (VOC2012 train 5,717 and val 5,823
images; feature passes over train = feature statistics (200 x 200 regions) + positives (13.6K
objects) + the mining pass (5,717 x 2,000), and val x 2,000 at test; fine-tuning `--iterations`
(70,000, R-CNN's VOC2012 snapshot) steps of 128 regions, each the slower of the network step and
the loader's `--loader-workers` workers):

- selective search as R-CNN's (mode rcnn) on the photographs in `--photos` (each resized to a
  500 px longer side, as VOC's), or on a synthetic image: seconds and boxes per image;
- the network parts (warp + conv1..fc7 per region, one fine-tuning step) on `--device`; for the
  H200 projection they are this run's figures when it runs on CUDA, otherwise the H200 figures
  recorded in bench/README.md's GPU section (CaffeNet at 227: forward 2.8 ms and whole step 7.4 ms
  per 100 patches, bench/profile_step.py), scaled to the batch;
- the CPU parts (selective search, JPEG decode, the fine-tuning loader, SVM mining, liblinear
  retraining at each K of `--svm-negatives`, test scoring + NMS) in this process, as CPU time (this
  process's, all its threads: a machine shared with other jobs inflates wall time, not this), one
  core each; the projection divides the parallel ones by the cores they get on 16 (selective
  search 16, loader `--loader-workers`, SVM retrainings min(16, 20 classes)).

K, the hard negatives a class holds, is not measured on a VOC2012 run here (no VOC2012 and no GPU
in this project's sessions): it is bounded above by what a retraining keeps (negatives scoring
above -1.2) plus the 2,000 added before the next one, and the projection is printed for each K of
`--svm-negatives` (default 5,000 and 20,000; per class x 16 KB: 80 MB / 330 MB; liblinear's fit time
grows about linearly with K, so 50,000 is ~2.5x the 20,000 row).
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
from vidrep.eval.boxes import nms  # noqa: E402
from vidrep.eval.images import read_rgb  # noqa: E402
from vidrep.eval.proposals import selective_search  # noqa: E402
from vidrep.eval.rcnn_svm import HardNegativeMiner, fit_rcnn_svm  # noqa: E402
from vidrep.eval.regions import DetectionNet  # noqa: E402
from vidrep.eval.warp import warp_regions  # noqa: E402
from vidrep.eval.windows import DecodedImages, WindowCrops, Windows, image_windows  # noqa: E402
from vidrep.models.caffenet import CaffeNet  # noqa: E402

TRAIN, VAL, PROPOSALS, OBJECTS, CLASSES = 5717, 5823, 2000, 13609, 20
CORES = 16
# bench/README.md's GPU section: bench/profile_step.py on one H200, CaffeNet at 227, 100 patches
H200_FORWARD_PER_REGION = 2.8e-3 / 100
H200_STEP_PER_REGION = 7.4e-3 / 100
HARD_PER_IMAGE = 20  # hard negatives a class adds per image after its first SVM (R-CNN's order of magnitude)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, reps: int = 1, clock=time.perf_counter) -> float:
    """Seconds per call after a warm-up: wall time, or with clock=time.process_time this process's
    CPU time (all its threads), which a machine shared with other jobs does not inflate."""
    fn()  # warm-up (allocations, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (clock() - start) / reps


def cpu_timed(fn, reps: int = 1) -> float:
    return timed(fn, reps, time.process_time)


def image(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A natural-ish image: smoothed noise with a few flat shapes (selective search's cost depends on texture)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 3)
    for _ in range(8):
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        size = (x + int(rng.integers(30, 150)), y + int(rng.integers(30, 150)))
        cv2.rectangle(img, (x, y), size, rng.integers(0, 255, 3).tolist(), -1)
    return img


def proposals_like(n: int, h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 20, h - 20], (n, 2))
    wh = rng.uniform(20, [w, h], (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], 1).astype(np.float32)


def photographs(folder: str | None) -> list[tuple[str, np.ndarray]]:
    """BGR images with a 500 px longer side (VOC's size), from `folder` or one synthetic image."""
    if not folder:
        return [("synthetic", image())]
    out = []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        img = cv2.imread(str(path))
        if img is not None:
            s = 500 / max(img.shape[:2])
            out.append((path.name, cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)))
    if not out:
        raise SystemExit(f"--photos {folder}: no readable .jpg/.png there")
    return out


def proposals_part(args, rows) -> float:
    per_image = []
    for name, img in photographs(args.photos):
        start = time.process_time()
        n = len(selective_search(img))
        per_image.append((name, n, time.process_time() - start))
    counts, secs = np.array([n for _, n, _ in per_image]), np.array([t for _, _, t in per_image])
    if args.photos:
        print("selective search (mode rcnn) per photograph: " + ", ".join(f"{a} {n}" for a, n, _ in per_image))
    rows.append(
        [
            f"selective search (R-CNN's settings), {len(per_image)} image(s), median CPU time",
            f"{np.median(secs):.2f} s ({int(np.median(counts))} boxes; {counts.min()}-{counts.max()})",
            f"{peak_mb():.0f}",
        ]
    )
    return float(np.median(secs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--photos", default=None, help="a folder of photographs for selective search (else synthetic)")
    p.add_argument("--regions", type=int, default=128, help="warped regions per timed batch")
    p.add_argument("--ft-regions", type=int, default=32, help="regions in the timed fine-tuning step (scaled to 128)")
    p.add_argument("--svm-negatives", type=int, nargs="+", default=[5000, 20000], help="cache sizes K")
    p.add_argument("--iterations", type=int, default=70000, help="fine-tuning steps (R-CNN's VOC2012 snapshot)")
    p.add_argument("--loader-workers", type=int, default=14, help="fine-tuning DataLoader workers on 16 cores")
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)
    rows, part = [], {}

    part["ss"] = proposals_part(args, rows)

    img = image()
    with tempfile.TemporaryDirectory() as tmp:
        jpg = Path(tmp) / "a.jpg"
        cv2.imwrite(str(jpg), img)
        part["decode"] = cpu_timed(lambda: read_rgb(jpg), reps=5)
    rows.append(["JPEG decode, 1 image (500x375)", f"{1e3 * part['decode']:.1f} ms", f"{peak_mb():.0f}"])

    model = DetectionNet(CaffeNet(227, 4096, 4096).to(dev), CLASSES, "warp", 227, 4096, 4096).to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))).to(dev)
    boxes = proposals_like(args.regions)
    mean = torch.tensor([104.0, 117.0, 123.0], device=dev).view(1, 3, 1, 1)

    @torch.no_grad()
    def warp_batch():
        crops, mask = warp_regions(x, boxes, 227, 16)
        return model.warped((crops - mean) * mask)["fc7"]

    part["region"] = timed(warp_batch) / args.regions
    rows.append(
        [
            f"warp + conv1..fc7, per region (batches of {args.regions}), {dev}",
            f"{1e3 * part['region']:.2f} ms",
            f"{peak_mb():.0f}",
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

    part["step"] = timed(ft_step) * 128 / args.ft_regions
    rows.append(
        [
            f"fine-tuning step, network only, {args.ft_regions} crops (scaled to 128), {dev}",
            f"{part['step']:.3f} s",
            f"{peak_mb():.0f}",
        ]
    )

    # R-CNN's batch of 128 windows touches ~127 distinct images of 5,717: 128 JPEG decodes + warps
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(128):
            paths.append(Path(tmp) / f"{i}.jpg")
            cv2.imwrite(str(paths[-1]), image(seed=i))
        windows = Windows(np.arange(128, dtype=np.int32), proposals_like(128, seed=3), np.zeros(128, np.uint8), 0)
        crops_of = WindowCrops(paths, windows, 227, 16)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        batch = [(i, bool(i % 2)) for i in range(128)]
        part["load_jpeg"] = cpu_timed(lambda: crops_of.__getitems__(batch))
        decoded = WindowCrops(paths, windows, 227, 16, DecodedImages.build(Path(tmp) / "decoded", paths))
        part["load"] = cpu_timed(lambda: decoded.__getitems__(batch))
        torch.set_num_threads(threads)
    rows.append(
        [
            "fine-tuning loader, 128 windows from 128 JPEGs, 1 worker: decoding each / decoded once (the default)",
            f"{part['load_jpeg']:.2f} s / {part['load']:.2f} s",
            f"{peak_mb():.0f}",
        ]
    )

    gt_im, boxes_im = proposals_like(3, seed=5), proposals_like(PROPOSALS, seed=4)
    part["windows"] = cpu_timed(lambda: image_windows(gt_im, np.array([0, 1, 2]), boxes_im, CLASSES, 0.5, (0.0, 0.5)))
    rows.append(["fine-tuning window index, 1 image", f"{1e3 * part['windows']:.1f} ms", f"{peak_mb():.0f}"])

    rng = np.random.default_rng(0)
    feats = (rng.normal(0, 1, (PROPOSALS, 4096)) * 20 / 64).astype(np.float32)
    overlap = rng.uniform(0, 0.6, (PROPOSALS, CLASSES)).astype(np.float32)
    positives = [(rng.normal(0.2, 1, (OBJECTS // CLASSES, 4096)) * 20 / 64).astype(np.float32) for _ in range(CLASSES)]
    miner = HardNegativeMiner(positives, num_images=10**6, retrain_limit=10**9)
    miner.add_image(0, feats[:50], overlap[:50])  # the first image trains every class (small, to keep this quick)
    for cache in miner.cache:  # room for the timed appends: growth by doubling copies each row at most ~2x
        cache.add(np.zeros((1024, 4096), np.float32), np.arange(1024) + (1 << 40))
        cache.keep(np.zeros(cache.n, bool))
    # a trained detector's score spread: ~1 % of the negatives above -1.0001, ~20 per image and class
    miner.W = rng.normal(0, 0.01, (4096, CLASSES)).astype(np.float32)
    miner.B = np.full(CLASSES, -1.3, np.float32)
    part["mining"] = cpu_timed(lambda: miner.add_image(miner.position, feats, overlap), reps=3)
    added = (miner.cache_sizes()[0] - 50) / 4
    rows.append(
        [
            "mining step, 1 image (scores, hard negatives into the caches; pass 1 does not depend on K)",
            f"{1e3 * part['mining']:.0f} ms (~{added:.0f} hard negatives per class)",
            f"{peak_mb():.0f}",
        ]
    )
    fits = {}
    for k in args.svm_negatives:
        neg = (rng.normal(0, 1, (k, 4096)) * 20 / 64).astype(np.float32)
        fits[k] = cpu_timed(lambda n=neg: fit_rcnn_svm(positives[0], n), reps=1)
        rows.append(
            [
                f"one SVM retraining, K = {k:,} ({len(positives[0])} pos + {k:,} neg x 4096)",
                f"{fits[k]:.1f} s",
                f"{peak_mb():.0f}",
            ]
        )
        del neg

    W, B = rng.normal(0, 0.01, (4096, CLASSES)).astype(np.float32), np.full(CLASSES, -1.0, np.float32)
    test_boxes = proposals_like(PROPOSALS, seed=2)

    def test_image():
        scores = feats @ W + B
        for c in range(CLASSES):
            top = np.argsort(-scores[:, c])[:100]
            nms(test_boxes[top], scores[top, c], 0.3)

    part["test"] = cpu_timed(test_image, reps=3)
    rows.append(["test scoring + top 100 + NMS, 1 image", f"{1e3 * part['test']:.0f} ms", f"{peak_mb():.0f}"])

    print(f"device: {dev}; torch threads: {torch.get_num_threads()}")
    print(markdown_table(["part (sample)", "time (CPU parts: CPU time)", "peak RSS so far (MB)"], rows))
    project(args, part, fits, dev)


def project(args, part: dict, fits: dict, dev: str) -> None:
    """VOC2012 train + val, one network, on one H200 + 16 cores."""
    gpu = dev.startswith("cuda")
    forward = part["region"] if gpu else H200_FORWARD_PER_REGION
    step = part["step"] if gpu else H200_STEP_PER_REGION * 128
    source = "measured" if gpu else "H200 recorded"
    train_regions = 200 * 200 + OBJECTS + TRAIN * PROPOSALS
    images_read = 200 + 2 * TRAIN + VAL
    features_s = (train_regions + VAL * PROPOSALS) * forward + images_read * part["decode"]
    loader = part["load"] / args.loader_workers
    stages = {
        "proposals (selective search, 16 processes)": part["ss"] * (TRAIN + VAL) / CORES,
        f"fine-tuning, {args.iterations:,} steps (max of GPU step, {args.loader_workers} loaders)": args.iterations
        * max(step, loader)
        + part["windows"] * TRAIN,
        "region features, statistics + positives + test": (200 * 200 + OBJECTS + VAL * PROPOSALS) * forward
        + (200 + TRAIN + VAL) * part["decode"],
        "test scoring + NMS (main process)": part["test"] * VAL,
    }
    mining_images = TRAIN * (PROPOSALS * forward + part["decode"])
    retrains = CLASSES * (2 + TRAIN * HARD_PER_IMAGE // 2000)
    lines = []
    for k in args.svm_negatives:
        fit_wall = fits[k] * retrains / min(CORES, CLASSES)
        svm = max(mining_images + TRAIN * part["mining"], fit_wall) + fits[k]  # + the last image's retraining
        total = sum(stages.values()) + svm
        lines.append([f"K = {k:,}", f"{svm / 3600:.2f} h", f"{total / 3600:.2f} h"])
    rows = [[name, f"{s / 3600:.2f} h"] for name, s in stages.items()]
    print(
        f"\nVOC2012 train + val, one network, one H200 + 16 cores (network parts: {source}; "
        f"CPU parts: this machine, one core each; features {features_s / 3600:.2f} h of it):"
    )
    print(markdown_table(["stage", "time"], rows))
    print(
        f"\nSVM stage (mining pass: features + scoring on one GPU + main process; ~{retrains} retrainings in "
        f"min(16, 20) processes) and the whole protocol, by K:"
    )
    print(markdown_table(["K (hard negatives per class)", "SVM stage", "total, 1 network"], lines))
    print(
        f"\nwith R-CNN's published boxes (protocol.proposals.dir) subtract "
        f"{stages['proposals (selective search, 16 processes)'] / 3600:.2f} h. Memory by design: one image's fc7 "
        "2,000 x 4,096 x 4 B = 33 MB, x max_lag held images (128: 4.2 GB) while classes retrain; caches 20 x K x 16 KB "
        "(K = 20,000: 6.6 GB) grown by doubling (at most 2x); positives 13.6K x 16 KB = 223 MB"
    )


if __name__ == "__main__":
    main()
