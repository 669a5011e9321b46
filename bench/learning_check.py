"""Does training learn something on real footage? Held-out retrieval and a Fashion-MNIST probe.

    python bench/learning_check.py --fetch              # fetch the footage once (apt-get download, pip download)
    python bench/learning_check.py                      # the CPU configuration (~20 min on 2 cores)
    python bench/learning_check.py --config gpu         # the paper's 227 network on a GPU
    python bench/learning_check.py --max-steps 20 --probe-images 2000   # a smoke run

Real footage that installs from package registries (SOURCES; `--fetch` runs the commands printed
for each, missing sources are skipped) is mined (every frame a candidate query: see DENSE), split
by video into training and held-out videos (at least a fifth held out), trained on, and measured:

- retrieval on the held-out videos (vidrep.eval.retrieval: each pair's tracked patch among the
  tracked patches of the other held-out videos) for the trained network, its initialisation,
  colour_histogram and pixels;
- a frozen linear probe on Fashion-MNIST (Debian `dataset-fashion-mnist`, 60K train / 10K test
  product photos) for the trained network and its initialisation.

Long films are cut into 1-minute segments that count as separate videos; image sequences become
MJPEG videos. Everything is written under --work (footage, videos, corpus) and --out (the tables in
learning_check.md, the trunks); a rerun reuses the footage, the videos and the mined corpus.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = Path(__import__("os").environ.get("VIDREP_CACHE_DIR", Path.home() / ".cache/vidrep"))
SEGMENT_S = 60
FRAMES_FPS = 25  # image sequences become videos at this rate (the miner counts frames, not seconds)


@dataclass(frozen=True)
class Source:
    name: str
    what: str
    fetch: str  # how to fetch it: "deb:<package>" or "pypi-moviepy"
    paths: tuple[str, ...]  # under the footage folder; a folder = an image sequence
    film: bool = False  # cut into SEGMENT_S segments


MOVIEPY = "moviepy==2.2.1"
BBB_IN_ZIP = "moviepy_10_minutes/resources/bbb.mp4"
SOURCES = (
    Source(
        "bbb", "Big Buck Bunny 720p, 10 min (PyPI moviepy 2.2.1 sdist)", "pypi-moviepy", ("moviepy/bbb.mp4",), film=True
    ),
    Source(
        "opencv-doc",
        "vtest.avi, Megamind.avi (Debian opencv-doc)",
        "deb:opencv-doc",
        (
            "opencv-doc/usr/share/doc/opencv-doc/examples/data/vtest.avi",
            "opencv-doc/usr/share/doc/opencv-doc/examples/data/Megamind.avi",
        ),
    ),
    Source(
        "mecavideo",
        "classroom clips (Debian python3-mecavideo)",
        "deb:python3-mecavideo",
        ("python3-mecavideo/usr/share/pymecavideo/data/video/*",),
    ),
    Source(
        "imageio",
        "cockatoo.mp4 (Debian python3-imageio)",
        "deb:python3-imageio",
        ("python3-imageio/usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4",),
    ),
    Source(
        "pd-extendedview",
        "diver.mov (Debian pd-extendedview)",
        "deb:pd-extendedview",
        ("pd-extendedview/usr/share/doc/pd-extendedview/media/diver.mov",),
    ),
    Source(
        "visp",
        "image sequences mire-2, mbt/cube, cube (Debian visp-images-data)",
        "deb:visp-images-data",
        (
            "visp-images-data/usr/share/visp-images-data/ViSP-images/mire-2/",
            "visp-images-data/usr/share/visp-images-data/ViSP-images/mbt/cube/",
            "visp-images-data/usr/share/visp-images-data/ViSP-images/cube/",
        ),
    ),
    Source(
        "dlib",
        "examples/video_frames, 151 frames (Debian libdlib19.1)",
        "deb:libdlib19.1",
        ("libdlib19.1/usr/share/doc/libdlib19.1/examples/video_frames/",),
    ),
    Source(
        "renpy",
        "oa4_launch.webm (Debian renpy-demo)",
        "deb:renpy-demo",
        ("renpy-demo/usr/share/games/renpy/demo/game/oa4_launch.webm",),
    ),
    Source(
        "kivy",
        "cityCC0.mpg (Debian python-kivy-examples)",
        "deb:python-kivy-examples",
        ("python-kivy-examples/usr/share/kivy-examples/widgets/cityCC0.mpg",),
    ),
)
FASHION = "dataset-fashion-mnist/usr/share/datasets/fashion-mnist"
# Fashion-MNIST images per split the probe uses: on a CPU the first 10K training images (a forward
# pass at 99 input is ~0.14 GMAC, so 60K + 10K images x 2 networks would take longer than training).
PROBE_IMAGES = {"cpu": 10000, "gpu": None}

# Mining settings that differ from the paper's (conf/mine.yaml): real footage is scarce (the
# 10-minute film gives ~60 pairs at candidate_every=5), so every frame is a candidate query. The
# miner tracks one window at a time, so tracks still never overlap.
DENSE = {"candidate_every": 1}

# The CPU configuration: experiment=cpu (the demo's reduced network: 99 input, 1024/256 head,
# Kaiming init, bias 0, lr 0.002, batches of 32 pairs), trained for a number of steps rather than
# epochs, hard negatives after a third of them.
CONFIGS = {
    "cpu": [
        "experiment=cpu",
        "data.num_workers=2",
        "trainer=cpu",
        "trainer.max_steps=1800",
        "trainer.max_epochs=null",
        "model.loss.hard_after_epochs=null",
        "+model.loss.hard_after_steps=600",
    ],
    # The paper's network and solver (conf/model/caffenet.yaml) at 227 input.
    "gpu": [
        "data.batch_size=50",
        "data.num_workers=8",
        "trainer=gpu",
        "trainer.max_steps=20000",
        "model.loss.hard_after_epochs=null",
        "+model.loss.hard_after_steps=6000",
    ],
}


def fetch_command(source: Source, footage: Path) -> str:
    if source.fetch == "pypi-moviepy":
        return (
            f"pip download --no-deps --no-binary :all: {MOVIEPY} -d /tmp/dl && tar xzf /tmp/dl/moviepy-2.2.1.tar.gz "
            "-C /tmp/dl && "
            "unzip -j /tmp/dl/moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/"
            "moviepy_10_minutes.zip "
            f"{BBB_IN_ZIP} -d {footage}/moviepy"
        )
    pkg = source.fetch.removeprefix("deb:")
    return f"apt-get update && apt-get download {pkg} && dpkg-deb -x {pkg}_*.deb {footage}/{pkg}"


def fetch(source_fetch: str, footage: Path) -> None:
    """Runs what fetch_command prints (without apt-get update), into a temporary folder first."""
    with tempfile.TemporaryDirectory() as tmp:
        if source_fetch == "pypi-moviepy":
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", MOVIEPY, "-d", tmp],
                check=True,
            )
            subprocess.run(["tar", "xzf", next(Path(tmp).glob("moviepy-*.tar.gz")), "-C", tmp], check=True)
            zip_path = next(
                Path(tmp).glob(
                    "moviepy-*/docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip"
                )
            )
            (footage / "moviepy").mkdir(parents=True, exist_ok=True)
            with (
                zipfile.ZipFile(zip_path) as z,
                z.open(BBB_IN_ZIP) as src,
                open(footage / "moviepy/.bbb.mp4.tmp", "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            (footage / "moviepy/.bbb.mp4.tmp").rename(footage / "moviepy/bbb.mp4")
            return
        pkg = source_fetch.removeprefix("deb:")
        subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True)
        subprocess.run(["dpkg-deb", "-x", next(Path(tmp).glob(f"{pkg}_*.deb")), f"{tmp}/x"], check=True)
        shutil.rmtree(footage / pkg, ignore_errors=True)
        footage.mkdir(parents=True, exist_ok=True)
        shutil.move(f"{tmp}/x", footage / pkg)


def source_files(source: Source, footage: Path) -> list[Path]:
    found = []
    for rel in source.paths:
        if rel.endswith("/"):
            found += [footage / rel] if (footage / rel).is_dir() else []
        else:
            found += sorted(footage.glob(rel)) if "*" in rel else ([footage / rel] if (footage / rel).is_file() else [])
    return found


def _write_video(frames, path: Path, fps: float) -> int:
    """MJPEG .avi at 600x448 (the miner's frame size), atomically; returns the frames written."""
    tmp = path.with_name(f".{path.name}.tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (600, 448))
    n = 0
    for frame in frames:
        writer.write(cv2.resize(frame, (600, 448), interpolation=cv2.INTER_AREA))
        n += 1
    writer.release()
    tmp.rename(path)
    return n


def cut_film(path: Path, out: Path, stem: str) -> list[Path]:
    """1-minute segments of a long film, each its own video."""
    done = sorted(out.glob(f"{stem}-seg*.avi"))
    if done and (out / f".{stem}.done").exists():
        return done
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 24.0
    per_segment = int(round(SEGMENT_S * fps))

    def frames():
        for _ in range(per_segment):
            ok, frame = cap.read()
            if not ok:
                return
            yield frame

    segments = []
    while True:
        seg = out / f"{stem}-seg{len(segments):02d}.avi"
        if _write_video(frames(), seg, fps) < 2:
            seg.unlink()
            break
        segments.append(seg)
    (out / f".{stem}.done").touch()
    return segments


def prepare_videos(footage: Path, videos: Path) -> tuple[list[str], list[str]]:
    """The videos folder mine.py reads: links to plain videos, film segments, sequences as videos.
    Returns (sources used, sources missing)."""
    videos.mkdir(parents=True, exist_ok=True)
    used, missing = [], []
    for s in SOURCES:
        files = source_files(s, footage)
        if s.name == "opencv-doc" and not files:  # the test suite's copy, if any
            files = [
                p for p in (CACHE / "opencv-sample-videos" / n for n in ("vtest.avi", "Megamind.avi")) if p.is_file()
            ]
        if not files:
            missing.append(s.name)
            print(f"  missing {s.name}: {s.what}; fetch with: {fetch_command(s, footage)}")
            continue
        used.append(s.name)
        for f in files:
            stem = f"{s.name}-{f'{f.parent.name}_{f.name}' if f.is_dir() else f.stem}"
            if f.is_dir():
                dest = videos / f"{stem}.avi"
                if not dest.exists():
                    frames = sorted(p for p in f.iterdir() if p.suffix.lower() in (".pgm", ".jpg", ".png", ".ppm"))
                    _write_video((cv2.imread(str(p), cv2.IMREAD_COLOR) for p in frames), dest, FRAMES_FPS)
            elif s.film:
                cut_film(f, videos, stem)
            else:
                dest = videos / f"{stem}{f.suffix}"
                if not dest.exists():
                    dest.symlink_to(f.resolve())
    return used, missing


def mine(videos: Path, corpus: Path, workers: int) -> None:
    from vidrep.mining.miner import MinerConfig
    from vidrep.mining.run import mine_corpus

    summary = mine_corpus(videos, corpus, MinerConfig(**DENSE), workers=workers, progress=False)
    print(summary.table())


def compose_config(config: str, corpus: Path, out: Path, seed: int, extra: list[str]):
    from hydra import compose, initialize_config_dir

    overrides = [
        "data=corpus",
        f"data.root={corpus}",
        "data.val_fraction=0.25",
        "logger=none",
        f"seed={seed}",
        f"paths.output_dir={out}",
        f"paths.root_dir={ROOT}",
        *CONFIGS[config],
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides), overrides


def train(cfg):
    """(datamodule, trained trunk, initial trunk, seconds): train.py's fit, keeping the initialisation."""
    import hydra
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    initial = copy.deepcopy(model.net.trunk)
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=cfg.paths.output_dir, name="", version="")  # <out>/metrics.csv: follow the steps there
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=logger, callbacks=[], enable_checkpointing=False, enable_progress_bar=False, max_epochs=-1
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    print(
        "final metrics: "
        + ", ".join(f"{k}={metrics[k]:.4f}" for k in ("train/loss", "val/loss", "val/triplet_acc") if k in metrics)
    )
    return datamodule, model.net.trunk.eval(), initial.eval(), time.perf_counter() - start


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def fashion_features(
    trunk, images: np.ndarray, input_size: int, pixel_mean, layers=("pool5", "fc7"), batch: int = 256
) -> dict[str, np.ndarray]:
    """Frozen, L2-normalised features of 28x28 grey images, upscaled (bilinear) and repeated to RGB."""
    import torch
    import torch.nn.functional as F

    from vidrep.eval.features import mean_subtract, pool_to_dims

    preprocess = mean_subtract(pixel_mean)
    out = {k: [] for k in layers}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).float()[:, None]
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
            feats = trunk.forward_features(preprocess(x), list(layers))
            for k in layers:
                f = feats[k]
                out[k].append(F.normalize(pool_to_dims(f) if f.dim() == 4 else f, dim=1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a multinomial logistic regression (fixed C=1, standardised features: no
    choice made on the test set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0, max_iter=300).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def fashion_probe(trunks: dict, footage: Path, input_size: int, pixel_mean, limit: int | None) -> str | None:
    folder = footage / FASHION
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        print(
            "  Fashion-MNIST missing; fetch with: apt-get download dataset-fashion-mnist && dpkg-deb -x "
            f"dataset-fashion-mnist_*.deb {footage}/dataset-fashion-mnist"
        )
        return None
    data = {
        split: (read_idx(folder / f"{split}-images-idx3-ubyte.gz"), read_idx(folder / f"{split}-labels-idx1-ubyte.gz"))
        for split in ("train", "t10k")
    }
    if limit:
        data = {
            s: (x[:limit], y[:limit]) for s, (x, y) in data.items()
        }  # the files are in mixed class order (first 10K: 942-1,027 per class)
    lines = [
        f"Frozen linear probe on Fashion-MNIST ({len(data['train'][0])} train / {len(data['t10k'][0])} test images, "
        "10 classes; test accuracy %, chance 10):",
        "",
        "| network | pool5 | fc7 |",
        "|---|---|---|",
    ]
    for name, trunk in trunks.items():
        feats = {s: fashion_features(trunk, x, input_size, pixel_mean) for s, (x, _) in data.items()}
        acc = {
            k: linear_probe(feats["train"][k], data["train"][1], feats["t10k"][k], data["t10k"][1])
            for k in ("pool5", "fc7")
        }
        lines.append(f"| {name} | {100 * acc['pool5']:.1f} | {100 * acc['fc7']:.1f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument(
        "--work", type=Path, default=CACHE / "learning-check", help="footage/, videos/ and corpus/ live here"
    )
    p.add_argument("--out", type=Path, default=None, help="default: outputs/learning_check/<config>-<time>")
    p.add_argument(
        "--fetch", action="store_true", help="fetch the missing footage (apt-get download, pip download) and exit"
    )
    p.add_argument("--workers", type=int, default=2, help="mining processes")
    p.add_argument(
        "--no-mine",
        action="store_true",
        help="train on the corpus as mined so far (mining resumes where it stopped when run without this)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-steps", type=int, default=None, help="override the configuration's training steps (smoke runs)"
    )
    p.add_argument(
        "--probe-images",
        type=int,
        default=None,
        help=f"use only this many Fashion-MNIST images per split (0: all; default {PROBE_IMAGES})",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of train.py's config, after the configuration's own")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    footage = args.work / "footage"
    if args.fetch:
        for s in [
            *SOURCES,
            Source("fashion", "Fashion-MNIST", "deb:dataset-fashion-mnist", (FASHION + "/train-images-idx3-ubyte.gz",)),
        ]:
            if source_files(s, footage):
                continue
            print(f"fetching {s.name}: {fetch_command(s, footage)}", flush=True)
            try:
                fetch(s.fetch, footage)
            except (subprocess.CalledProcessError, StopIteration, OSError) as e:
                print(f"  could not fetch {s.name} ({e}); it will be skipped")
        return

    out = args.out or ROOT / "outputs/learning_check" / f"{args.config}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    out.mkdir(parents=True, exist_ok=True)
    clock = {}
    t0 = time.perf_counter()
    print(f"footage: {footage}")
    used, missing = prepare_videos(footage, args.work / "videos")
    clock["videos"] = time.perf_counter() - t0
    corpus = args.work / f"corpus-{'-'.join(f'{k}{v}' for k, v in DENSE.items())}"
    print(
        f"{'' if args.no_mine else 'mining '}{args.work / 'videos'} into {corpus} with the paper's settings except "
        f"{DENSE} (conf/mine.yaml: candidate_every=5)",
        flush=True,
    )
    if args.no_mine:
        print("--no-mine: using the videos mined so far")
    else:
        mine(args.work / "videos", corpus, args.workers)
    clock["mining"] = time.perf_counter() - t0 - clock["videos"]

    extra = [*args.overrides, *([f"trainer.max_steps={args.max_steps}"] if args.max_steps else [])]
    cfg, overrides = compose_config(args.config, corpus, out, args.seed, extra)
    datamodule, trained, initial, train_s = train(cfg)
    clock["training"] = train_s

    from vidrep.demo.check import format_weight_change, held_out_retrieval, weight_change
    from vidrep.eval.retrieval import retrieval_table

    index = datamodule.val_set.index
    train_videos = len(np.unique(datamodule.train_set.video_ids()))
    val_videos = len(np.unique(datamodule.val_set.video_ids()))
    if val_videos * 5 < train_videos + val_videos:
        raise SystemExit(
            f"only {val_videos} of {train_videos + val_videos} videos held out (< 1/5); raise data.val_fraction"
        )
    t = time.perf_counter()
    report = held_out_retrieval(
        index, datamodule.val_set.rows, trained, initial, cfg.model.input_size, list(cfg.model.pixel_mean)
    )
    clock["retrieval"] = time.perf_counter() - t
    t = time.perf_counter()
    probe = fashion_probe(
        {"trained": trained, "initialisation": initial},
        footage,
        cfg.model.input_size,
        list(cfg.model.pixel_mean),
        PROBE_IMAGES[args.config] if args.probe_images is None else args.probe_images,
    )
    clock["fashion probe"] = time.perf_counter() - t

    text = "\n".join(
        [
            f"# Learning check ({args.config}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Footage: {', '.join(used)}" + (f"; missing (skipped): {', '.join(missing)}" if missing else ""),
            f"Mining: the paper's settings except {DENSE} (conf/mine.yaml: candidate_every=5): real footage is scarce.",
            f"Videos prepared: {sum(1 for p in (args.work / 'videos').iterdir() if not p.name.startswith('.'))}"
            + (" (--no-mine: those mined so far are used)" if args.no_mine else "")
            + f"; {train_videos + val_videos} gave pairs: "
            f"{train_videos} training ({len(datamodule.train_set)} pairs), {val_videos} held out "
            f"({len(datamodule.val_set)} pairs).",
            f"Training: {int(cfg.trainer.max_steps)} steps of {cfg.data.batch_size} pairs at {cfg.model.input_size} "
            f"input; overrides: {' '.join(overrides)}",
            "",
            "Held-out retrieval: each held-out pair's tracked patch among its own and the tracked patches of the "
            "other held-out videos:",
            "",
            retrieval_table(report),
            "",
            format_weight_change(weight_change(trained, initial)),
            "",
            probe or "Fashion-MNIST probe skipped (not fetched).",
            "",
            "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()),
        ]
    )
    print("\n" + text)
    import io

    import torch

    from vidrep.common.io import write_bytes

    write_bytes(out / "learning_check.md", (text + "\n").encode())
    buffer = io.BytesIO()
    torch.save({"trained": trained.state_dict(), "initial": initial.state_dict()}, buffer)
    write_bytes(out / "trunks.pt", buffer.getvalue())
    print(f"\nwritten: {out / 'learning_check.md'}")


if __name__ == "__main__":
    main()
