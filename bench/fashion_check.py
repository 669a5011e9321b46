"""A learning check on data nobody here made: Fashion-MNIST items moving over desktop backgrounds.

    python bench/fashion_check.py --fetch        # apt-get download dataset-fashion-mnist gnome-backgrounds
    python bench/fashion_check.py                # videos, mining, training (experiment=cpu, <= 20 epochs), tables
    python bench/fashion_check.py --videos 40 --epochs 2 --probe-train 1000   # a smoke run

Videos (MJPEG, 600x448, seeds 0 ... --videos - 1): the demo world's motion (vidrep/data/synthetic.py:
objects that move, turn, grow and shrink under drifting light, a panning camera) with its textures
replaced by data from Debian packages: each object is a Fashion-MNIST *training* image (Debian
`dataset-fashion-mnist`; its grey level is the object's opacity, tinted by a random colour), the
background a random crop of one of Debian `gnome-backgrounds`' pictures (mostly rendered
illustrations and a few photographs). mine.py's pipeline mines them with the paper's settings, a
quarter of the videos are held out, and train.py's fit trains `experiment=cpu` for `--epochs`
(at most 20). Then, for the trained trunk, its initialisation (the run's and 2 more seeds) and pixels:

- a frozen linear probe on the **Fashion-MNIST test set** (10K images, 10 classes; logistic
  regression trained on `--probe-train` training images) from pool5, fc6 and fc7;
- the hard retrieval protocol (vidrep/eval/retrieval.py) on the held-out videos, each network
  compared pair by pair with the run's initialisation.

Everything lives under --work (videos, corpus; reused by a rerun) and --out (fashion_check.md,
fashion_check.json). The probe's accuracies are cached by the weights' sha256 under
~/.cache/vidrep/probe-cache (bench/learning_check.py's cached_probe): this check and
bench/learning_check.py start from the same experiment=cpu initialisations, so whichever runs second
probes only its trained network (~10 min of the ~40 the four networks take on 2 shared cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning_check import CACHE, compose_config, held_out_tables, read_idx, train  # noqa: E402

from vidrep.data.synthetic import SyntheticVideo  # noqa: E402

PACKAGES = ("dataset-fashion-mnist", "gnome-backgrounds")
FASHION = "dataset-fashion-mnist/usr/share/datasets/fashion-mnist"
BACKGROUNDS = "gnome-backgrounds/usr/share/backgrounds/gnome"
WORLD = {"num_objects": 3, "spin": 2.0, "breathe": 0.25, "lighting": 0.2}
MAX_EPOCHS = 20
PROBE_LAYERS = ("pool5", "fc6", "fc7")


class FashionVideo(SyntheticVideo):
    """A SyntheticVideo whose objects are Fashion-MNIST images and whose background is a picture."""

    def __init__(
        self, seed: int, items: np.ndarray, pictures: list[np.ndarray], num_frames: int = 100, **world
    ) -> None:
        super().__init__(seed, num_frames=num_frames, object_size=(84, 140), **world)
        rng = np.random.default_rng([seed, 7])
        picture = pictures[int(rng.integers(len(pictures)))]
        height, width = self._bg.shape[:2]
        side = int(rng.integers(max(height, width), min(picture.shape[:2]) + 1))
        top, left = (int(rng.integers(0, n - side + 1)) for n in picture.shape[:2])
        self._bg = cv2.resize(picture[top : top + side, left : left + side], (width, height)).astype(np.float32)
        self.items = rng.choice(len(items), size=len(self.sizes), replace=False)
        for i, (k, size) in enumerate(zip(self.items, self.sizes)):
            grey = cv2.resize(items[k], (int(size), int(size)), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            self._masks[i] = np.clip(grey / 40.0, 0, 1)[..., None]
            self._textures[i] = np.clip(grey[..., None] * rng.uniform(0.6, 1.3, 3).astype(np.float32), 0, 255)


def load_pictures(folder: Path, side: int = 1024) -> list[np.ndarray]:
    pictures = []
    for path in sorted(folder.iterdir()):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # the SVGs do not load and are left out
        if img is not None and min(img.shape[:2]) >= 448:
            pictures.append(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA))
    if not pictures:
        raise SystemExit(f"no pictures in {folder}; run: python bench/fashion_check.py --fetch")
    return pictures


def write_videos(folder: Path, count: int, num_frames: int, items: np.ndarray, pictures: list[np.ndarray]) -> None:
    """<folder>/<seed>.avi for seeds 0 ... count - 1; those already written are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        path = folder / f"{seed:05d}.avi"
        if not path.exists():
            tmp = FashionVideo(seed, items, pictures, num_frames, **WORLD).write(folder / f".{seed:05d}.tmp.avi")
            tmp.rename(path)


def fetch(work: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True)
            subprocess.run(["dpkg-deb", "-x", next(Path(tmp).glob(f"{pkg}_*.deb")), str(work / pkg)], check=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=CACHE / "fashion-check")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/fashion_check/<time>")
    p.add_argument("--fetch", action="store_true", help="fetch the two Debian packages into --work and exit")
    p.add_argument("--prepare", action="store_true", help="write the videos and mine them, then exit")
    p.add_argument("--videos", type=int, default=160)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--epochs", type=int, default=MAX_EPOCHS)
    p.add_argument("--probe-train", type=int, default=10000, help="Fashion-MNIST training images for the probe")
    p.add_argument("--workers", type=int, default=2, help="mining processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of train.py's config, after this check's own")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.fetch:
        fetch(args.work)
        return
    if not 1 <= args.epochs <= MAX_EPOCHS:
        raise SystemExit(f"--epochs must be 1 ... {MAX_EPOCHS} (the check is bounded so that it cannot memorise)")
    out = args.out or ROOT / "outputs/fashion_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    fashion = args.work / FASHION
    if not (fashion / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not in {fashion}; run: python bench/fashion_check.py --fetch")
    clock, t0 = {}, time.perf_counter()
    videos = args.work / f"videos-{args.frames}"
    items = read_idx(fashion / "train-images-idx3-ubyte.gz")
    write_videos(videos, args.videos, args.frames, items, load_pictures(args.work / BACKGROUNDS))
    clock["videos"] = time.perf_counter() - t0

    from vidrep.mining.miner import MinerConfig
    from vidrep.mining.run import mine_corpus

    corpus = args.work / f"corpus-{args.frames}"
    print(mine_corpus(videos, corpus, MinerConfig(), workers=args.workers, progress=False).table(), flush=True)
    clock["mining"] = time.perf_counter() - t0 - clock["videos"]
    if args.prepare:
        return

    cfg, overrides = compose_config(
        "cpu", corpus, out, args.seed, ["trainer.max_steps=-1", *args.overrides, f"trainer.max_epochs={args.epochs}"]
    )
    t = time.perf_counter()
    datamodule, trained, initial, _ = train(cfg, max_epochs=args.epochs)
    clock["training"] = time.perf_counter() - t

    t = time.perf_counter()
    tables, tables_text = held_out_tables(
        corpus,
        videos,
        datamodule,
        trained,
        initial,
        cfg.model.input_size,
        list(cfg.model.pixel_mean),
        fashion,
        args.probe_train,
    )
    clock["retrieval and probe"] = time.perf_counter() - t

    val = datamodule.val_set
    train_videos, val_videos = (len(np.unique(s.video_ids())) for s in (datamodule.train_set, val))
    text = "\n".join(
        [
            f"# Fashion-MNIST learning check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Videos: {args.videos} x {args.frames} frames (Fashion-MNIST training items over gnome-backgrounds "
            f"pictures, world {WORLD}); pairs from {train_videos} training videos ({len(datamodule.train_set)} "
            f"pairs) and {val_videos} held-out videos ({len(val)} pairs).",
            f"Training: experiment=cpu, {args.epochs} epochs ({trained_steps(out)} steps); overrides: "
            + " ".join(overrides),
            "",
            tables_text,
            "",
            "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()),
        ]
    )
    print("\n" + text)
    from vidrep.common.io import write_bytes, write_json

    write_bytes(out / "fashion_check.md", (text + "\n").encode())
    write_json(
        out / "fashion_check.json",
        tables | {"seconds": clock},
    )
    print(f"\nwritten: {out / 'fashion_check.md'}")


def trained_steps(out: Path) -> str:
    metrics = out / "metrics.csv"
    if not metrics.is_file():
        return "?"
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("step")]
    return str(max(steps) + 1) if steps else "?"


if __name__ == "__main__":
    main()
