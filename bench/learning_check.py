"""Does training learn something on real footage? Held-out retrieval and a Fashion-MNIST probe.

    python bench/learning_check.py --fetch              # fetch the footage once (apt-get download, pip download)
    python bench/learning_check.py --prepare            # only prepare the videos and mine them
    python bench/learning_check.py                      # the CPU configuration (45 min on 2 shared cores, 2026-12-05)
    python bench/learning_check.py --config gpu         # the paper's 227 network on a GPU
    python bench/learning_check.py --max-steps 20 --probe-images 2000   # a smoke run (at most 20 epochs in any run)

Real footage that installs from package registries (SOURCES; `--fetch` runs the commands printed
for each, missing sources are skipped) is mined (every frame a candidate query: see DENSE), split
by video into training and held-out videos (at least a fifth held out), trained on, and measured:

- hard retrieval on the held-out videos (vidrep.eval.retrieval, candidates=hard: distractors cut
  from the held-out videos first) for the trained network, its initialisation (the run's and 2 more
  seeds), colour_histogram and pixels, each compared pair by pair with the initialisation;
- a frozen linear probe on Fashion-MNIST (Debian `dataset-fashion-mnist`, 10K test images, 10
  classes) from pool5, fc6 and fc7 for the same networks and for the 28x28 pixels.

Training is bounded to MAX_EPOCHS (20) epochs. bench/fashion_check.py prints the same tables for
videos made of Fashion-MNIST items.

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

# Mining settings that differ from the paper's (vidrep/conf/mine.yaml): real footage is scarce (the
# 10-minute film gives ~60 pairs at candidate_every=5), so every frame is a candidate query. The
# miner tracks one window at a time, so tracks still never overlap.
DENSE = {"candidate_every": 1}

# At most 20 epochs: with ~100 training pairs, more only memorises them (an earlier 1,800-step
# run, ~900 epochs, drove the training loss to 0.00 and lost to its initialisation).
MAX_EPOCHS = 20
# The CPU configuration: experiment=cpu (the demo's reduced network: 99 input, 1024/256 head,
# Kaiming init, bias 0, lr 0.002, batches of 32 pairs), hard negatives after a third of the epochs.
CONFIGS = {
    "cpu": [
        "experiment=cpu",
        "data.num_workers=2",
        "trainer=cpu",
        "trainer.max_steps=-1",
        f"trainer.max_epochs={MAX_EPOCHS}",
        "model.loss.hard_after_epochs=7",
    ],
    # The paper's network and solver (vidrep/conf/model/caffenet.yaml) at 227 input.
    "gpu": [
        "data.batch_size=50",
        "data.num_workers=8",
        "trainer=gpu",
        "trainer.max_steps=-1",
        f"trainer.max_epochs={MAX_EPOCHS}",
        "model.loss.hard_after_epochs=7",
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
    with initialize_config_dir(config_dir=str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides), overrides


def train(cfg, max_epochs: int = -1):
    """(datamodule, trained trunk, initial trunk, seconds): train.py's fit, keeping the initialisation
    (`max_epochs` -1: as many as cfg.trainer.max_steps take)."""
    import hydra
    import lightning as L

    from vidrep.training import plan

    L.seed_everything(cfg.seed, workers=True)
    datamodule = plan.data_module(cfg.data)  # its planning-only keys (data.train_pairs) left out
    model = hydra.utils.instantiate(cfg.model)
    initial = copy.deepcopy(model.net.trunk)
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=cfg.paths.output_dir, name="", version="")  # <out>/metrics.csv: follow the steps there
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_epochs=max_epochs,
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


PROBE_LAYERS = ("pool5", "fc6", "fc7")


def held_out_tables(
    corpus: Path,
    videos: Path,
    datamodule,
    trained,
    initial,
    input_size: int,
    pixel_mean,
    fashion: Path,
    probe_train: int,
) -> tuple[dict, str]:
    """The check's tables, as json and markdown: hard retrieval on the held-out videos (their
    distractors cut from `videos` first) and the Fashion-MNIST probe, for the trained trunk, its
    initialisation and 2 more seeds (mean +- sd) and the baselines."""
    from vidrep.data.corpus import read_manifest
    from vidrep.demo.check import (
        compare_retrieval,
        format_weight_change,
        initial_trunks,
        retrieval_rows,
        seed_mean,
        trunk_featurizers,
        weight_change,
    )
    from vidrep.eval.distractors import write_distractors
    from vidrep.eval.retrieval import BASELINES, RetrievalSettings

    val = datamodule.val_set
    names = np.asarray(read_manifest(corpus).column("video").to_numpy(zero_copy_only=False), dtype=object)
    settings = RetrievalSettings()
    write_distractors(
        corpus, videos, settings.distractors, settings.max_distractor_iou, only=sorted(set(names[val.rows]))
    )
    inits = initial_trunks(initial, (1, 2))
    trunks = {"trained": trained, **{f"initialisation {i}": t for i, t in enumerate(inits)}}
    featurizers = trunk_featurizers(trunks, input_size, pixel_mean, "fc7")
    metrics, _ = compare_retrieval(val.index, val.rows, featurizers, settings)
    seeds = [metrics[f"initialisation {i}"] for i in range(len(inits))]
    retrieval = {"trained": metrics["trained"], "initialisation": seed_mean(seeds)} | {b: metrics[b] for b in BASELINES}
    title = f"Retrieval (hard candidates, fc7) on the {len(np.unique(val.video_ids()))} held-out videos:"
    probe, probe_text = probe_table(trunks, fashion, input_size, pixel_mean, probe_train)
    text = "\n".join(
        [
            *retrieval_rows(retrieval, seeds, title),
            "",
            format_weight_change(weight_change(trained, initial)),
            "",
            probe_text,
        ]
    )
    return {"retrieval": retrieval, "initialisation_seeds": seeds, "probe": probe}, text


PROBE_CACHE = CACHE / "probe-cache"


def trunk_digest(trunk) -> str:
    """One digest of a trunk's weights (the checkpoint format's hash of every tensor, names, shapes and
    dtypes included): equal digests give equal features."""
    import hashlib
    import json

    from vidrep.common.checkpoint_files import content_hashes

    return hashlib.sha256(json.dumps(content_hashes(dict(trunk.state_dict())), sort_keys=True).encode()).hexdigest()


def cached_probe(key: str, setting: dict, compute) -> dict:
    """compute() once per (weights, probe setting): the two checks start from the same experiment=cpu
    initialisations (seed 0, then seeds 1, 2), so the second check reuses their probe instead of
    repeating ~20K forward passes and 3 fits per network. The file records what it was computed on."""
    import hashlib
    import json

    from vidrep.common.io import write_json

    tag = hashlib.sha256(json.dumps([key, setting], sort_keys=True).encode()).hexdigest()[:16]
    path = PROBE_CACHE / f"{tag}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key and stored.get("setting") == setting:
            print(f"  probe of {key[:12]} reused from {path}", flush=True)
            return stored["accuracy"]
    accuracy = compute()
    write_json(path, {"key": key, "setting": setting, "accuracy": accuracy})
    return accuracy


def probe_table(trunks: dict, fashion: Path, input_size: int, pixel_mean, num_train: int) -> tuple[dict, str]:
    """Fashion-MNIST probe accuracies {network: {layer: acc}} and their table."""
    import inspect

    from vidrep.eval.probe import probe_accuracy

    def linear_probe(*data) -> float:
        return probe_accuracy(*data)["accuracy"]

    train_x = read_idx(fashion / "train-images-idx3-ubyte.gz")[:num_train]
    train_y = read_idx(fashion / "train-labels-idx1-ubyte.gz")[:num_train]
    test_x, test_y = read_idx(fashion / "t10k-images-idx3-ubyte.gz"), read_idx(fashion / "t10k-labels-idx1-ubyte.gz")
    setting = {
        "num_train": len(train_x),
        "input_size": input_size,
        "pixel_mean": [float(m) for m in pixel_mean],
        "solver": str(inspect.signature(probe_accuracy)),  # its defaults: C, iterations
    }
    acc = {}
    for name, trunk in trunks.items():

        def probe(trunk=trunk) -> dict:
            images = np.concatenate([train_x, test_x])  # one forward pass gives all 3 layers of both splits
            feats = fashion_features(trunk, images, input_size, pixel_mean, PROBE_LAYERS)
            n = len(train_x)
            return {k: linear_probe(f[:n], train_y, f[n:], test_y) for k, f in feats.items()}

        acc[name] = cached_probe(trunk_digest(trunk), setting, probe)
        print(f"  probe {name}: {acc[name]}", flush=True)
    pixels = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    acc["pixels"] = cached_probe(
        "pixels", setting, lambda: {"pixels": linear_probe(pixels(train_x), train_y, pixels(test_x), test_y)}
    )
    inits = [v for k, v in acc.items() if k.startswith("initialisation")]
    lines = [
        f"Frozen linear probe on the Fashion-MNIST test set ({len(test_x)} images, 10 classes; logistic regression "
        f"on the first {len(train_x)} training images; accuracy %, chance 10):",
        "",
        "| network | " + " | ".join(PROBE_LAYERS) + " |",
        "|---|" + "---|" * len(PROBE_LAYERS),
        "| trained | " + " | ".join(f"{100 * acc['trained'][k]:.1f}" for k in PROBE_LAYERS) + " |",
        "| initialisation (mean +- sd of 3) | "
        + " | ".join(
            f"{100 * np.mean([a[k] for a in inits]):.1f} +- {100 * np.std([a[k] for a in inits]):.1f}"
            for k in PROBE_LAYERS
        )
        + " |",
        f"| pixels (28x28) | {100 * acc['pixels']['pixels']:.1f} (one layer: the image) | | |",
    ]
    return acc, "\n".join(lines)


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
    p.add_argument("--prepare", action="store_true", help="prepare the videos and mine them, then exit")
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
        f"{DENSE} (vidrep/conf/mine.yaml: candidate_every=5)",
        flush=True,
    )
    if args.no_mine:
        print("--no-mine: using the videos mined so far")
    else:
        mine(args.work / "videos", corpus, args.workers)
    clock["mining"] = time.perf_counter() - t0 - clock["videos"]
    if args.prepare:
        print("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()))
        return

    extra = [*args.overrides, *([f"trainer.max_steps={args.max_steps}"] if args.max_steps else [])]
    cfg, overrides = compose_config(args.config, corpus, out, args.seed, extra)
    if not 1 <= int(cfg.trainer.max_epochs) <= MAX_EPOCHS:
        raise SystemExit(f"trainer.max_epochs must be 1 ... {MAX_EPOCHS}: more only memorises the few training pairs")
    datamodule, trained, initial, train_s = train(cfg, max_epochs=int(cfg.trainer.max_epochs))
    clock["training"] = train_s

    train_videos = len(np.unique(datamodule.train_set.video_ids()))
    val_videos = len(np.unique(datamodule.val_set.video_ids()))
    if val_videos * 5 < train_videos + val_videos:
        raise SystemExit(
            f"only {val_videos} of {train_videos + val_videos} videos held out (< 1/5); raise data.val_fraction"
        )
    t = time.perf_counter()
    fashion = footage / FASHION
    tables, tables_text = None, "Tables skipped: Fashion-MNIST missing (fetch it with --fetch)."
    if fashion.is_dir():
        limit = PROBE_IMAGES[args.config] if args.probe_images is None else args.probe_images
        tables, tables_text = held_out_tables(
            corpus,
            args.work / "videos",
            datamodule,
            trained,
            initial,
            cfg.model.input_size,
            list(cfg.model.pixel_mean),
            fashion,
            limit or 60000,
        )
    clock["retrieval and probe"] = time.perf_counter() - t

    text = "\n".join(
        [
            f"# Learning check ({args.config}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Footage: {', '.join(used)}" + (f"; missing (skipped): {', '.join(missing)}" if missing else ""),
            f"Mining: the paper's settings except {DENSE} (vidrep/conf/mine.yaml: candidate_every=5): "
            "real footage is scarce.",
            f"Videos prepared: {sum(1 for p in (args.work / 'videos').iterdir() if not p.name.startswith('.'))}"
            + (" (--no-mine: those mined so far are used)" if args.no_mine else "")
            + f"; {train_videos + val_videos} gave pairs: "
            f"{train_videos} training ({len(datamodule.train_set)} pairs), {val_videos} held out "
            f"({len(datamodule.val_set)} pairs).",
            f"Training: {int(cfg.trainer.max_epochs)} epochs of batches of {cfg.data.batch_size} pairs at "
            f"{cfg.model.input_size} input; overrides: {' '.join(overrides)}",
            "",
            tables_text,
            "",
            "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()),
        ]
    )
    print("\n" + text)
    import io

    import torch

    from vidrep.common.io import write_bytes

    write_bytes(out / "learning_check.md", (text + "\n").encode())
    if tables is not None:
        from vidrep.common.io import write_json

        write_json(out / "learning_check.json", tables | {"seconds": clock})
    buffer = io.BytesIO()
    torch.save({"trained": trained.state_dict(), "initial": initial.state_dict()}, buffer)
    write_bytes(out / "trunks.pt", buffer.getvalue())
    print(f"\nwritten: {out / 'learning_check.md'}")


if __name__ == "__main__":
    main()
