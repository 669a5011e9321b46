"""The `retrieval` protocol: does a network find a query patch's tracked patch (the same object 30
frames later) among the tracked patches of other videos? What the method optimises, measured on
videos training never saw.

Every pair of the chosen videos is a query. Its candidates are its own tracked patch and the
tracked patches of every pair of the *other* videos (its own video's other pairs may show the same
object, so they are left out). Rank = 1 + the number of other candidates at least as similar as
its own tracked patch (ties count against it); recall@k = the fraction of queries of rank <= k.

Two feature-free baselines say what trivial cues achieve: `colour_histogram` (4x4x4 joint RGB
histogram) and `pixels` (a 16x16 thumbnail minus its mean).

Cost: features are kept for the chosen pairs only, 2 x N x D float32 (held-out 5 % of 4M pairs =
200K pairs at fc7's 4096: 6.6 GB; at the demo's 256: a few MB); the N x N similarities are never
held whole, but in blocks of about CHUNK_ELEMENTS (64 MB of float32 + 16 MB of mask).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vidrep.data.corpus import CorpusError, PairIndex, read_manifest
from vidrep.eval.features import Network, pool_to_dims

log = logging.getLogger(__name__)

BASELINES = ("colour_histogram", "pixels")
CHUNK_ELEMENTS = 1 << 24
METRIC_KEYS = ("recall_at_1", "recall_at_5", "median_rank", "num_pairs", "num_videos", "num_candidates_mean")

# uint8 RGB patches [N, H, W, 3] -> {name: float32 [N, D] L2-normalised}
Featurizer = Callable[[np.ndarray], dict[str, np.ndarray]]


# ---------------------------------------------------------------- ranks and metrics (pure)


def retrieval_ranks(
    query: np.ndarray, tracked: np.ndarray, video: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """int64 [N]: the rank of each pair's tracked patch among its candidates (see the module doc).

    `query`, `tracked`: [N, D] features (cosine = dot product when L2-normalised); `video`: [N] ids.
    Similarities are computed `chunk_elements // N` queries at a time, so memory stays bounded.
    """
    n = len(query)
    video = np.asarray(video)
    rows = max(1, chunk_elements // max(n, 1))
    ranks = np.empty(n, np.int64)
    t = np.ascontiguousarray(tracked, dtype=np.float32)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sim = np.ascontiguousarray(query[start:stop], dtype=np.float32) @ t.T
        # own similarity taken from the same product, so that an exact tie stays a tie
        own = sim[np.arange(stop - start), np.arange(start, stop)]
        other_video = video[None, :] != video[start:stop, None]
        ranks[start:stop] = 1 + ((sim >= own[:, None]) & other_video).sum(axis=1)
    return ranks


def num_candidates(video: np.ndarray) -> np.ndarray:
    """int64 [N]: own tracked patch + the pairs of every other video."""
    _, inverse, counts = np.unique(np.asarray(video), return_inverse=True, return_counts=True)
    return 1 + len(inverse) - counts[inverse]


def retrieval_metrics(ranks: np.ndarray, video: np.ndarray) -> dict:
    ranks = np.asarray(ranks)
    return {
        "recall_at_1": float(np.mean(ranks <= 1)),
        "recall_at_5": float(np.mean(ranks <= 5)),
        "median_rank": float(np.median(ranks)),
        "num_pairs": int(len(ranks)),
        "num_videos": int(len(np.unique(video))),
        "num_candidates_mean": float(np.mean(num_candidates(video))),
    }


# ---------------------------------------------------------------- features


def decode_patch(jpeg: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3], never flipped, whatever decoder training used."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise CorpusError("a corpus patch is not a decodable JPEG; the shard may be damaged (re-mine its videos)")
    return np.ascontiguousarray(img[:, :, ::-1])


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def colour_histogram(patches: np.ndarray) -> np.ndarray:
    """[N, 64]: joint RGB histogram, 4 bins per channel (bin = value // 64, index = 16 r + 4 g + b),
    L2-normalised."""
    q = np.asarray(patches, np.uint8).reshape(len(patches), -1, 3) // 64
    index = (16 * q[..., 0] + 4 * q[..., 1] + q[..., 2]).astype(np.int64)
    index += 64 * np.arange(len(patches))[:, None]
    counts = np.bincount(index.ravel(), minlength=64 * len(patches)).reshape(len(patches), 64)
    return l2_normalise(counts)


def pixels(patches: np.ndarray) -> np.ndarray:
    """[N, 768]: the patch resized to 16x16 (INTER_AREA), RGB, float, minus its own mean, L2-normalised."""
    small = np.stack([cv2.resize(p, (16, 16), interpolation=cv2.INTER_AREA) for p in patches]).astype(np.float32)
    flat = small.reshape(len(patches), -1)
    return l2_normalise(flat - flat.mean(axis=1, keepdims=True))


def baseline_featurizer(name: str) -> Featurizer:
    fn = {"colour_histogram": colour_histogram, "pixels": pixels}[name]
    return lambda patches: {name: fn(patches)}


def network_featurizer(networks: Sequence[Network], layers: Sequence[str], device: str = "cpu") -> Featurizer:
    """{layer: features} of one network or an ensemble (normalised features side by side,
    re-normalised); conv maps average-pooled to ~9K values as the svm protocol pools them."""
    trunks = [n.trunk.to(device).eval() for n in networks]

    @torch.no_grad()
    def featurize(patches: np.ndarray) -> dict[str, np.ndarray]:
        per_net = []
        for net, trunk in zip(networks, trunks):
            size = net.input_size
            x = np.stack(
                [
                    p if p.shape[:2] == (size, size) else cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA)
                    for p in patches
                ]
            )
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
            feats = trunk.forward_features(net.preprocess(x), list(layers))
            per_net.append(
                {k: F.normalize(pool_to_dims(f) if f.dim() == 4 else f, dim=1).cpu().numpy() for k, f in feats.items()}
            )
        if len(per_net) == 1:
            return {k: per_net[0][k] for k in layers}
        return {k: l2_normalise(np.concatenate([f[k] for f in per_net], axis=1)) for k in layers}

    return featurize


def pair_features(
    index: PairIndex, rows: np.ndarray, featurizers: Sequence[Featurizer], batch_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({name: query features [N, D]}, {name: tracked features [N, D]}) of manifest rows `rows`;
    each batch of patches is decoded once for all featurizers."""
    out: tuple[dict[str, list], dict[str, list]] = ({}, {})
    for start in tqdm(
        range(0, len(rows), batch_size), desc="retrieval: features", unit="batch", disable=len(rows) <= batch_size
    ):
        pairs = [index.read_pair(int(r)) for r in rows[start : start + batch_size]]
        for side, feats in enumerate(out):
            patches = np.stack([decode_patch(p[side]) for p in pairs])
            for fz in featurizers:
                for name, f in fz(patches).items():
                    feats.setdefault(name, []).append(f)
    return tuple({k: np.concatenate(v) for k, v in feats.items()} for feats in out)  # type: ignore[return-value]


def retrieval_results(
    index: PairIndex, rows: np.ndarray, featurizers: Sequence[Featurizer], batch_size: int = 64
) -> dict[str, dict]:
    """{feature name: metrics} for the pairs `rows` of a corpus."""
    rows = np.asarray(rows, np.int64)
    video = index.video_id[rows]
    if len(np.unique(video)) < 2:
        raise CorpusError(
            f"retrieval needs pairs of at least 2 videos (candidates come from other videos); "
            f"got {len(rows)} pairs of {len(np.unique(video))} video(s) from {index.root}"
        )
    query, tracked = pair_features(index, rows, featurizers, batch_size)
    return {name: retrieval_metrics(retrieval_ranks(query[name], tracked[name], video), video) for name in query}


# ---------------------------------------------------------------- which pairs


def select_videos(root: str | Path, videos_file: str | Path | None) -> tuple[PairIndex, np.ndarray, list[str]]:
    """The corpus, the rows of the pairs to use and the names of their videos: all videos, or
    those listed (one per line, as the manifest's `video` column names them) in `videos_file`."""
    table = read_manifest(root)
    index = PairIndex(root, table)
    names = np.asarray(table.column("video").to_numpy(zero_copy_only=False), dtype=object)
    if videos_file is None:
        rows = np.arange(len(index))
    else:
        path = Path(videos_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"retrieval.videos={path} does not exist; give a text file with one video per line")
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise CorpusError(
                f"{len(unknown)} video(s) of {path} are not in corpus {root}, e.g. {unknown[:3]}; "
                "list them as the manifest's `video` column names them"
            )
        rows = np.flatnonzero(np.isin(names, wanted))
    used = sorted(set(names[rows]))
    if len(used) < 2:
        raise CorpusError(
            f"retrieval needs at least 2 videos (candidates come from other videos); "
            f"{videos_file or root} gives {len(used)}"
        )
    return index, rows, used


# ---------------------------------------------------------------- evaluate.py protocol=retrieval


def featurizers_for(
    specs: Sequence[str], layers: Sequence[str], load: Callable[[str], Network], device: str
) -> tuple[list[Featurizer], list[str]]:
    """The featurizer of `ckpt=`: a baseline name alone, or one network or an ensemble; and the
    names of what was evaluated."""
    baselines = [s for s in specs if s in BASELINES]
    if baselines:
        if len(specs) > 1:
            raise ValueError(
                f"ckpt={list(specs)}: {baselines[0]} is a baseline without a network; give it alone "
                f"(ckpt={baselines[0]})"
            )
        return [baseline_featurizer(baselines[0])], list(specs)
    networks = [load(s) for s in specs]
    return [network_featurizer(networks, layers, device)], [n.name for n in networks]


def retrieval_table(results: dict[str, dict]) -> str:
    lines = [
        "| features | R@1 (%) | R@5 (%) | median rank | pairs | videos | candidates (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['recall_at_1']:.1f} | {100 * r['recall_at_5']:.1f} | {r['median_rank']:g} | "
            f"{r['num_pairs']} | {r['num_videos']} | {r['num_candidates_mean']:.1f} |"
        )
    return "\n".join(lines)


def evaluate_retrieval(cfg, load: Callable[[str], Network], checkpoints: Sequence[str], device: str) -> dict:
    """results.json's content for protocol=retrieval (written by the caller)."""
    r = cfg.retrieval
    if r.corpus in (None, "", "???"):
        raise ValueError("protocol=retrieval needs retrieval.corpus=<a mine.py corpus>")
    layers = list(r.layers)
    start = time.perf_counter()
    index, rows, videos = select_videos(Path(r.corpus).expanduser(), r.get("videos"))
    featurizers, names = featurizers_for(checkpoints, layers, load, device)
    log.info("retrieval on %d pairs of %d videos of %s", len(rows), len(videos), r.corpus)
    results = retrieval_results(index, rows, featurizers, int(r.get("batch_size", 64)))
    return {
        "row": "retrieval",
        "label": cfg.label or f"retrieval ({', '.join(Path(c).parent.parent.name or c for c in checkpoints)})",
        "protocol": {"name": "retrieval", "layers": layers},
        "checkpoints": names,
        "data": {
            "corpus": str(Path(r.corpus).expanduser().resolve()),
            "videos_file": r.get("videos"),
            "videos": videos,
            "num_pairs": int(len(rows)),
            "num_videos": len(videos),
        },
        "seed": cfg.seed,
        "input_size": cfg.input_size,
        "seconds": time.perf_counter() - start,
        "retrieval": results,
    }


def gathered_retrieval_table(results: Sequence[dict], paths: Sequence[Path]) -> str:
    """Several protocol=retrieval results, one row per evaluated feature (the gathered report)."""
    lines = [
        "| label | features | R@1 (%) | R@5 (%) | median rank | pairs | videos | corpus | results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result, path in zip(results, paths):
        for name, r in result["retrieval"].items():
            lines.append(
                f"| {result['label']} | {name} | {100 * r['recall_at_1']:.1f} | {100 * r['recall_at_5']:.1f} | "
                f"{r['median_rank']:g} | {r['num_pairs']} | {r['num_videos']} | {result['data']['corpus']} | {path} |"
            )
    return "\n".join(lines)


def _log_wandb(cfg, run_dir: Path, result: dict) -> None:
    from vidrep.eval.report import wandb_eval_run

    with wandb_eval_run(cfg, run_dir, result["label"]) as run:
        if run is None:
            return
        import wandb

        table = wandb.Table(columns=["features", *METRIC_KEYS])
        for name, r in result["retrieval"].items():
            table.add_data(name, *(r[k] for k in METRIC_KEYS))
            run.summary.update(
                {f"eval/retrieval/{name}/{k}": r[k] for k in ("recall_at_1", "recall_at_5", "median_rank")}
            )
        run.log({"eval/retrieval": table})


def run_retrieval(cfg, checkpoints: Sequence[str], device: str, load: Callable[[str], Network]) -> dict:
    """evaluate.py protocol=retrieval: measure, write results.json / results.md, print, log."""
    from vidrep.eval.report import write_results

    result = evaluate_retrieval(cfg, load, checkpoints, device)
    run_dir = Path(cfg.run_dir)
    write_results(run_dir, result)
    print(retrieval_table(result["retrieval"]))
    print(
        f"{result['data']['num_pairs']} pairs of {result['data']['num_videos']} videos of {result['data']['corpus']}; "
        f"results: {run_dir / 'results.json'}"
    )
    _log_wandb(cfg, run_dir, result)
    return result
