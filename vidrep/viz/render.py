"""Pictures of existing results, without training or mining again:

python -m vidrep.viz train --ckpt <run>/checkpoints/last.ckpt [--corpus <corpus>] [--out <dir>]
python -m vidrep.viz corpus <corpus> [--videos <folder or list>] [--max-videos 8] [--out <dir>]
python -m vidrep.viz eval <results.json> [<results.json> ...] [--out <dir>]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from vidrep.viz.canvas import PictureSink

log = logging.getLogger(__name__)


def _run_data(ckpt: Path) -> dict:
    """The data settings of the checkpoint's training run (<run>/.hydra/config.yaml beside
    <run>/checkpoints/), each resolved where it can be outside Hydra; {} without that file."""
    path = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    data = OmegaConf.load(path).get("data") or {}
    out = {}
    for key in ("root", "val_fraction", "seed", "num_patches", "batch_size", "decoder"):
        try:
            out[key] = data.get(key)
        except Exception:  # noqa: BLE001 - an interpolation only Hydra resolves (${hydra:...}): leave it to the user
            continue
    return out


def triplet_module_from_checkpoint(ckpt: str | Path):
    """A TripletModule holding a train.py checkpoint's trunk, loss settings and preprocessing
    (weights_only loading, like evaluate.py), and the (epoch, step) it was saved at."""
    from vidrep.eval.features import load_checkpoint_trunk, read_checkpoint
    from vidrep.models import EmbeddingNet
    from vidrep.training.module import TripletModule

    saved = read_checkpoint(ckpt)
    network = load_checkpoint_trunk(ckpt, saved)
    hp = saved.get("hyper_parameters", {})
    module = TripletModule(
        EmbeddingNet(network.trunk),
        hp.get("loss", {}),
        optimizer=None,
        pixel_mean=hp.get("pixel_mean"),
        input_size=network.input_size,
    )
    return module, int(saved.get("epoch", 0)), int(saved.get("global_step", 0))


def render_training(
    ckpt: str | Path,
    corpus: str | Path | None = None,
    out: str | Path | None = None,
    *,
    num_heldout: int = 256,
    val_fraction: float | None = None,
    seed: int | None = None,
    embedding: str = "tsne",
) -> list[Path]:
    """The training pictures of a checkpoint, drawn from the held-out pairs of its own run (the
    corpus, split and seed in <run>/.hydra/config.yaml; or those given). Written to
    <run>/pictures/render-stepNNNNNNN/ unless `out` is given."""
    from vidrep.data.corpora import open_index
    from vidrep.data.corpus import CorpusError, select_pairs
    from vidrep.data.datamodule import PairDataset
    from vidrep.data.transforms import PatchTransform
    from vidrep.viz.pictures import HeldOut, TrainingPictures

    ckpt = Path(ckpt).expanduser()
    module, epoch, step = triplet_module_from_checkpoint(ckpt)
    data = _run_data(ckpt)
    root = corpus or data.get("root")
    if root is None:
        raise CorpusError(f"no corpus for {ckpt}: its run's config names none; pass --corpus <corpus dir>")
    val_fraction = data.get("val_fraction") or 0.05 if val_fraction is None else val_fraction
    seed = data.get("seed") or 0 if seed is None else seed
    num_patches = data.get("num_patches")
    index = open_index(root)
    sel = select_pairs(
        index.video_id, index.query_frame, None if num_patches is None else num_patches // 2, val_fraction, seed
    )
    heldout = HeldOut.from_dataset(
        PairDataset(index, sel.val, PatchTransform(module.input_size, 0.0, data.get("decoder") or "opencv")),
        num_heldout,
        seed,
    )
    out = Path(out) if out is not None else ckpt.resolve().parent.parent / "pictures" / f"render-step{step:07d}"
    sink = PictureSink(out)
    TrainingPictures(batch_size=data.get("batch_size") or 50, embedding=embedding).draw(
        module, heldout, *module.negatives_at(epoch, step), f"{ckpt.name} (step {step})", sink
    )
    return sink.written


def render_corpus(
    root: str | Path,
    videos: str | Path | None = None,
    out: str | Path | None = None,
    max_videos: int = 8,
    max_pairs: int = 24,
) -> list[Path]:
    from vidrep.mining.inputs import list_videos
    from vidrep.viz.mining import render_corpus_pictures

    paths = {v.name: v.path for v in list_videos(videos)} if videos is not None else None
    if paths is None:
        log.info("no --videos given: contact sheets only (the frame pictures re-read the videos)")
    return render_corpus_pictures(root, out, max_videos=max_videos, max_pairs=max_pairs, video_paths=paths)


def _folder_names(results: Sequence[Path]) -> list[str]:
    """One folder per results.json, named after its run directory (suffixed -2, -3 on a clash)."""
    names, seen = [], {}
    for path in results:
        base = path.resolve().parent.name or "results"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def render_evaluations(results: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Per results.json: AP bars and PR curves (in its folder's pictures/, or `out`/<its run directory's name>/); with
    several, the paper-table image and the side-by-side AP bars in `out` (default: the first's)."""
    from vidrep.viz.evaluation import comparison_pictures, evaluation_pictures

    results = [Path(r) for r in results]
    missing = [str(r) for r in results if not r.is_file()]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)} (evaluate.py writes <run dir>/results.json)")
    loaded = [json.loads(r.read_text()) for r in results]
    written = []
    names = _folder_names(results)
    for path, result, name in zip(results, loaded, names):
        target = path.parent / "pictures" if out is None else Path(out) / (name if len(results) > 1 else "")
        sink = PictureSink(target)
        evaluation_pictures(result, sink)
        written += sink.written
    if len(results) > 1:
        sink = PictureSink(Path(out) if out is not None else results[0].parent / "pictures" / "comparison")
        comparison_pictures(loaded, results, sink)
        written += sink.written
    return written


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vidrep.viz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pictures of a checkpoint: triplets, retrieval, conv1, top responses, embedding")
    t.add_argument("--ckpt", required=True, type=Path, help="a train.py checkpoint")
    t.add_argument("--corpus", type=Path, help="the corpus (default: the run's data.root)")
    t.add_argument("--out", type=Path, help="output folder (default: <run>/pictures/render-step<step>)")
    t.add_argument("--num-heldout", type=int, default=256)
    t.add_argument("--val-fraction", type=float, help="default: the run's data.val_fraction")
    t.add_argument("--seed", type=int, help="default: the run's data.seed")
    t.add_argument("--embedding", choices=("tsne", "pca"), default="tsne")
    c = sub.add_parser("corpus", help="pictures of a mined corpus: contact sheets, and frame pictures with --videos")
    c.add_argument("corpus", type=Path)
    c.add_argument("--videos", type=Path, help="the folder or list file the corpus was mined from (for frame pictures)")
    c.add_argument("--out", type=Path, help="output folder (default: <corpus>/pictures)")
    c.add_argument("--max-videos", type=int, default=8)
    c.add_argument("--max-pairs", type=int, default=24)
    e = sub.add_parser("eval", help="pictures of evaluate.py results: AP bars, PR curves, the paper table")
    e.add_argument("results", nargs="+", type=Path)
    e.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vidrep.data.corpus import CorpusError
    from vidrep.eval.features import CheckpointError
    from vidrep.mining.inputs import InputError

    try:
        if args.command == "train":
            written = render_training(
                args.ckpt,
                args.corpus,
                args.out,
                num_heldout=args.num_heldout,
                val_fraction=args.val_fraction,
                seed=args.seed,
                embedding=args.embedding,
            )
        elif args.command == "corpus":
            written = render_corpus(args.corpus, args.videos, args.out, args.max_videos, args.max_pairs)
        else:
            written = render_evaluations(args.results, args.out)
    except (CheckpointError, CorpusError, InputError, FileNotFoundError) as e:
        raise SystemExit(f"python -m vidrep.viz {args.command}: {e}") from None
    for path in written:
        print(path)
    if not written:
        raise SystemExit("nothing drawn")
