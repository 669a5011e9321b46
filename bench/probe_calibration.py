"""Did the demo's former check (frozen SVMs on synthetic VOC) reward better features at all? Its
upper bound, by supervision. (The demo now measures retrieval on held-out videos; docs/evaluation.md
"The demo's check" says why this probe was dropped.)

    python bench/probe_calibration.py                  # ~7 min on 2 cores
    python bench/probe_calibration.py --train-images 64 --steps 2 --num-images 20   # a smoke run

Builds the demo's trunk as `python train.py` does (the composed config; extra arguments are Hydra
overrides of it), trains it *supervised* to name the shape classes in images of the demo check's
own world (its own images, drawn with another seed), then runs that check
(`vidrep.demo.check.frozen_svm_report`) on it and on its initialisation. A probe on which even
features trained on its own labels do not beat random ones cannot show what tracking taught. The
supervised head's mAP on its training images and on the probe's test images says whether the
network learned the classes or memorised its images.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from vidrep.data.synthetic import SHAPES
from vidrep.data.synthetic_voc import write_synthetic_voc
from vidrep.data.voc import VOCImage, read_voc
from vidrep.demo.check import format_report, frozen_svm_report
from vidrep.eval.features import load_image, mean_subtract
from vidrep.eval.metrics import voc_classification_ap

CONF = Path(__file__).resolve().parent.parent / "vidrep" / "conf"
BATCH = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=3000, help="supervised training images (not the probe's)")
    p.add_argument("--steps", type=int, default=1500, help=f"Adam steps of {BATCH} images")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    # The probe's settings, as the demo check used them before retrieval replaced it.
    p.add_argument("--num-images", type=int, default=150, help="probe images, trainval and test each")
    p.add_argument("--layers", nargs="+", default=["conv3", "conv5", "pool5", "fc7"])
    p.add_argument("--costs", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    p.add_argument(
        "--voc-root", help="where the probe's images are written (default: <paths.cache_dir>/demo-voc-v1-n<num-images>)"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of train.py's config, e.g. model.input_size=67")
    args = p.parse_args()
    if min(args.train_images, args.steps) < 1:
        p.error("--train-images and --steps must be at least 1")
    return args


def load_images(images: list[VOCImage], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 RGB [N, 3, size, size] and the VOC labels [N, C] in {1, 0 (difficult only), -1}."""
    x = torch.from_numpy(np.stack([load_image(im.path, size) for im in images]))
    return x, np.stack([im.class_labels(len(SHAPES)) for im in images])


def class_logits(trunk, head, preprocess, x: torch.Tensor) -> torch.Tensor:
    return head(F.relu(trunk.forward_features(preprocess(x), ["fc7"])["fc7"]))


@torch.no_grad()
def head_map(trunk, head, preprocess, x: torch.Tensor, labels: np.ndarray) -> float:
    scores = torch.cat(
        [class_logits(trunk, head, preprocess, x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    ).numpy()
    return float(np.nanmean([voc_classification_ap(scores[:, c], labels[:, c], True) for c in range(len(SHAPES))]))


def main() -> None:
    args = parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    torch.manual_seed(args.seed)
    trunk = hydra.utils.instantiate(cfg.model.net.trunk)
    initial = copy.deepcopy(trunk)
    head = torch.nn.Linear(cfg.model.net.trunk.fc7_dim, len(SHAPES))
    size, pixel_mean = cfg.model.input_size, list(cfg.model.pixel_mean)
    preprocess = mean_subtract(pixel_mean)
    voc_root = args.voc_root or f"{cfg.paths.cache_dir}/demo-voc-v1-n{args.num_images}"

    with tempfile.TemporaryDirectory() as tmp:
        # Seed 777: the probe's own images (seed 12345) never appear in training.
        write_synthetic_voc(tmp, num_trainval=args.train_images, num_test=1, seed=777)
        x, labels = load_images(read_voc(tmp, 2007, "trainval", SHAPES), size)
    present = torch.from_numpy((labels != -1).astype(np.float32))  # a difficult object is still there

    optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=args.lr)
    start = time.perf_counter()
    trunk.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (BATCH,))
        batch = x[idx].flip(-1) if torch.rand(()) < 0.5 else x[idx]
        loss = F.binary_cross_entropy_with_logits(class_logits(trunk, head, preprocess, batch), present[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    trunk.eval()

    report = frozen_svm_report(trunk, initial, size, pixel_mean, voc_root, args.num_images, args.layers, args.costs)
    test_x, test_labels = load_images(read_voc(voc_root, 2007, "test", SHAPES), size)
    seen = slice(0, min(len(x), 600))
    print(
        f"\nThe demo check's probe ({args.num_images} + {args.num_images} images), trunk trained supervised on "
        f"{args.train_images} images for {args.steps} steps:\n"
    )
    print(format_report({"supervised": report["trained"], "its initialisation": report["random init"]}))
    print(
        f"\nThe supervised head's mAP: {100 * head_map(trunk, head, preprocess, x[seen], labels[seen]):.1f} on "
        f"{seen.stop} of its training images, {100 * head_map(trunk, head, preprocess, test_x, test_labels):.1f} "
        f"on the probe's test images"
    )


if __name__ == "__main__":
    main()
