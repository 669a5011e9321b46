"""The `retrieval` protocol: does a network find a query patch's tracked patch (the same object 30
frames later) among candidates that trivial cues do not separate? What the method optimises,
measured on videos training never saw.

Every pair of the chosen videos is a query. Its candidates (`retrieval.candidates`):
- `hard` (the default): its own tracked patch, plus (a) the tracked patches of the other pairs of
  the *same* video whose query frame is at least `min_gap_frames` away (its video's palette and
  background, another moment), (b) `distractors` windows of its own tracked frame, of the tracked
  window's size, overlapping it by IoU <= `max_distractor_iou` (vidrep/eval/distractors.py: cut
  and encoded as the miner cuts patches, stored beside the corpus by a command), (c) the tracked
  patches of every pair of every other video;
- `other_videos`: its own tracked patch and (c) only. Colour alone separates videos (a 4x4x4
  colour histogram reached 98-100 % recall@1), so this setting cannot show a gain.
Rank = 1 + the number of other candidates at least as similar as its own tracked patch (ties count
against it); recall@k = the fraction of queries of rank <= k.

Two feature-free baselines say what trivial cues achieve: `colour_histogram` (4x4x4 joint RGB
histogram) and `pixels` (a 16x16 thumbnail minus its mean). Every network is also compared pair by
pair with its initialisation (`compare_pairs`: queries it gets right at rank 1 that the other gets
wrong, the reverse, and the two-sided sign-test p).

API (what the demo's check and other callers use):

    settings = RetrievalSettings()                       # hard, 90, 8, 0.3 (or candidates="other_videos")
    queries = load_queries(index, rows, settings)        # PairIndex + manifest rows; reads the distractors
    feats = candidate_features(queries, featurizers)     # {name: CandidateFeatures}, one decode per patch
    ranks = {n: ranks_of(queries, f, device) for n, f in feats.items()}   # int64 [N] each
    #   (ranks_by_feature(queries, featurizers, batch_size, device) does both lines)
    metrics = retrieval_metrics(ranks[n], queries.video, queries.num_candidates)
    compare_pairs(ranks["trained"], ranks["initialisation"])  # {"wins", "losses", "p"}: rank-1 wins/losses, sign test
    sign_test_p(wins, losses)                            # = scipy.stats.binomtest(wins, wins + losses).pvalue
    retrieval_results(index, rows, featurizers, settings=settings)  # {name: metrics}, the above in one call
    settings.to_dict()                                   # results.json's "retrieval_settings"

Featurizers: `network_featurizer([Network], layers, device)`, `baseline_featurizer("colour_histogram" |
"pixels")`, `renamed(featurizer, label)` to put several networks' same layer side by side. The
distractors of a corpus: `vidrep.eval.distractors.write_distractors(corpus, videos)` (what
`python -m vidrep.eval.distractors` runs). A linear probe on frozen features: vidrep/eval/probe.py.

Cost: features are kept for the chosen pairs only, (2 + distractors) x N x D float32 (held-out 5 %
of 4M pairs = 200K pairs at fc7's 1024: 8 GB with 8 distractors; at the demo's 256: a few MB). The
N x N similarities are never held whole: `ranks_of` multiplies `chunk_elements // N` queries at a
time on the evaluation device (torch; 200K x 200K x 1024 x 2 = 8e13 FLOP: seconds on a GPU,
about an hour on 2 CPU cores), 64 MB of float32 a block.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vidrep.data.corpus import CorpusError, PairIndex, read_manifest
from vidrep.eval.distractors import Distractors, read_distractors
from vidrep.eval.features import Network, pool_to_dims
from vidrep.eval.report import retrieval_table, wandb_eval_run, write_results

log = logging.getLogger(__name__)

BASELINES = ("colour_histogram", "pixels")
CANDIDATES = ("hard", "other_videos")
CHUNK_ELEMENTS = 1 << 24
METRIC_KEYS = ("recall_at_1", "recall_at_5", "median_rank", "num_pairs", "num_videos", "num_candidates_mean")

# uint8 RGB patches [N, H, W, 3] -> {name: float32 [N, D] L2-normalised}
Featurizer = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class RetrievalSettings:
    """Which candidates each query is ranked among (results.json's "retrieval_settings")."""

    candidates: str = "hard"
    min_gap_frames: int = 90
    distractors: int = 8
    max_distractor_iou: float = 0.3

    def __post_init__(self) -> None:
        if self.candidates not in CANDIDATES:
            raise ValueError(f"retrieval.candidates={self.candidates!r}: choose from {CANDIDATES}")
        if self.min_gap_frames < 1 or self.distractors < 0 or not 0 <= self.max_distractor_iou < 1:
            raise ValueError(
                "need retrieval.min_gap_frames >= 1, retrieval.distractors >= 0 and 0 <= "
                f"retrieval.max_distractor_iou < 1; got {self.min_gap_frames}, {self.distractors}, "
                f"{self.max_distractor_iou}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Queries:
    """The pairs to rank (manifest `rows` of `index`) and what decides their candidates."""

    index: PairIndex
    rows: np.ndarray
    video: np.ndarray  # [N] video ids
    frame: np.ndarray  # [N] query frames
    settings: RetrievalSettings
    distractors: Distractors | None  # hard only

    @property
    def min_gap_frames(self) -> int | None:
        return self.settings.min_gap_frames if self.settings.candidates == "hard" else None

    @property
    def num_candidates(self) -> np.ndarray:
        counts = None if self.distractors is None else np.bincount(self.distractors.owner, minlength=len(self.rows))
        return num_candidates(self.video, self.frame, self.min_gap_frames, counts)


@dataclass(frozen=True)
class CandidateFeatures:
    query: np.ndarray  # [N, D]
    tracked: np.ndarray  # [N, D]
    distractor: np.ndarray | None  # [M, D], owners as Queries.distractors.owner


# ---------------------------------------------------------------- ranks and metrics (pure)


def _as_tensor(x, device, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype)


@torch.no_grad()
def retrieval_ranks(
    query,
    tracked,
    video,
    frame=None,
    min_gap_frames: int | None = None,
    distractors=None,
    distractor_owner=None,
    chunk_elements: int = CHUNK_ELEMENTS,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """int64 [N]: the rank of each pair's tracked patch among its candidates (see the module doc).

    `query`, `tracked`: [N, D] features (cosine = dot product when L2-normalised); `video`: [N] ids.
    `min_gap_frames` None: other videos' tracked patches only; else also the same video's pairs whose
    query `frame` is at least that far. `distractors` [M, D] with `distractor_owner` [M] (sorted
    positions 0..N-1): extra candidates of their owner only. Numpy arrays or tensors in; computed in
    float32 on `device` (TF32 off, so a GPU ranks as the CPU does), `chunk_elements // N` queries a
    block (distractors: `block x (1 + max per pair) x D` more); each comparison takes the query's own
    similarity from the same product as the candidate's (an exact tie stays a tie).
    """
    device = torch.device(device)
    q = _as_tensor(query, device, torch.float32)
    t = _as_tensor(tracked, device, torch.float32)
    v = _as_tensor(np.asarray(video, np.int64), device)
    n = len(q)
    f = _as_tensor(np.asarray(frame, np.int64), device) if min_gap_frames is not None else None
    kmax = 0
    if distractors is not None and len(distractors):
        d = _as_tensor(distractors, device, torch.float32)
        bounds = np.searchsorted(np.asarray(distractor_owner, np.int64), np.arange(n + 1))
        kmax = int(np.diff(bounds).max())
    rows = max(1, chunk_elements // max(n, 1))
    ranks = torch.empty(n, dtype=torch.int64, device=device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            qb = q[start:stop]
            local = torch.arange(stop - start, device=device)
            sim = qb @ t.T
            own = sim[local, start + local]
            mask = v[None, :] != v[start:stop, None]
            if f is not None:
                gap = (f[None, :] - f[start:stop, None]).abs() >= min_gap_frames
                mask |= gap & (v[None, :] == v[start:stop, None])
            mask[local, start + local] = False
            count = ((sim >= own[:, None]) & mask).sum(dim=1)
            if kmax:
                # each query's own tracked patch and its distractors in one batched product (the
                # own similarity and theirs from the same kernel); padded to the most distractors a pair has
                first = torch.from_numpy(bounds[start:stop]).to(device)
                have = torch.from_numpy(bounds[start + 1 : stop + 1] - bounds[start:stop]).to(device)
                slot = torch.arange(kmax, device=device)
                valid = slot[None, :] < have[:, None]
                idx = torch.where(valid, first[:, None] + slot[None, :], 0)
                cand = torch.cat([t[start:stop, None, :], d[idx]], dim=1)  # [b, 1 + kmax, D]
                s_d = torch.bmm(cand, qb[:, :, None])[:, :, 0]
                count += ((s_d[:, 1:] >= s_d[:, :1]) & valid).sum(dim=1)
            ranks[start:stop] = 1 + count
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return ranks.cpu().numpy()


def num_candidates(
    video: np.ndarray,
    frame: np.ndarray | None = None,
    min_gap_frames: int | None = None,
    distractor_counts: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [N]: own tracked patch + the pairs of every other video (+ the same video's pairs at
    least `min_gap_frames` away, + each pair's distractors)."""
    video = np.asarray(video)
    _, inverse, counts = np.unique(video, return_inverse=True, return_counts=True)
    out = 1 + len(inverse) - counts[inverse]
    if min_gap_frames is not None:
        frame = np.asarray(frame, np.int64)
        for vid in np.unique(video):
            members = np.flatnonzero(video == vid)
            far = np.abs(frame[members, None] - frame[None, members]) >= min_gap_frames
            out[members] += far.sum(axis=1)
    if distractor_counts is not None:
        out = out + np.asarray(distractor_counts, np.int64)
    return out


def retrieval_metrics(ranks: np.ndarray, video: np.ndarray, candidates: np.ndarray | None = None) -> dict:
    """recall@1, recall@5, median rank and counts; `candidates` [N] each query's number of
    candidates (default: other_videos' count)."""
    ranks = np.asarray(ranks)
    candidates = num_candidates(video) if candidates is None else np.asarray(candidates)
    return {
        "recall_at_1": float(np.mean(ranks <= 1)),
        "recall_at_5": float(np.mean(ranks <= 5)),
        "median_rank": float(np.median(ranks)),
        "num_pairs": int(len(ranks)),
        "num_videos": int(len(np.unique(video))),
        "num_candidates_mean": float(np.mean(candidates)),
    }


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least as uneven as wins:losses) under a fair coin
    (scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue); 1.0 when there is nothing to compare."""
    n, k = wins + losses, min(wins, losses)
    if n == 0 or 2 * k == n:
        return 1.0
    log_half = n * math.log(2.0)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2.0 * math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def compare_pairs(ranks: np.ndarray, reference: np.ndarray) -> dict:
    """Pair by pair at rank 1: `wins` = queries `ranks` gets right that `reference` gets wrong,
    `losses` the reverse, `p` their two-sided sign test."""
    right, ref_right = np.asarray(ranks) <= 1, np.asarray(reference) <= 1
    wins, losses = int(np.sum(right & ~ref_right)), int(np.sum(~right & ref_right))
    return {"wins": wins, "losses": losses, "p": sign_test_p(wins, losses)}


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


def load_queries(index: PairIndex, rows: np.ndarray, settings: RetrievalSettings) -> Queries:
    """The pairs `rows` of `index` as queries under `settings` (hard: their distractors read, or a
    CorpusError naming the command that cuts them)."""
    rows = np.asarray(rows, np.int64)
    video = index.video_id[rows]
    if len(np.unique(video)) < 2:
        raise CorpusError(
            f"retrieval needs pairs of at least 2 videos (candidates come from other videos); "
            f"got {len(rows)} pairs of {len(np.unique(video))} video(s) from {index.root}"
        )
    distractors = None
    if settings.candidates == "hard" and settings.distractors == 0:
        distractors = Distractors(np.zeros(0, np.int64), [])
    elif settings.candidates == "hard":
        distractors = read_distractors(
            index.root,
            video,
            [index.pair_id(int(r)) for r in rows],
            settings.distractors,
            settings.max_distractor_iou,
        )
    return Queries(index, rows, video, index.query_frame[rows].astype(np.int64), settings, distractors)


def _featurize(jpegs: Sequence[bytes], featurizers: Sequence[Featurizer], out: dict[str, list]) -> None:
    patches = np.stack([decode_patch(j) for j in jpegs])
    for fz in featurizers:
        for name, f in fz(patches).items():
            out.setdefault(name, []).append(f)


def candidate_features(
    queries: Queries, featurizers: Sequence[Featurizer], batch_size: int = 64
) -> dict[str, CandidateFeatures]:
    """{feature name: query, tracked and distractor features}; each patch is decoded once for all
    featurizers."""
    query: dict[str, list] = {}
    tracked: dict[str, list] = {}
    rows = queries.rows
    for start in tqdm(
        range(0, len(rows), batch_size), desc="retrieval: features", unit="batch", disable=len(rows) <= batch_size
    ):
        pairs = [queries.index.read_pair(int(r)) for r in rows[start : start + batch_size]]
        _featurize([p[0] for p in pairs], featurizers, query)
        _featurize([p[1] for p in pairs], featurizers, tracked)
    distractor: dict[str, list] = {}
    jpegs = queries.distractors.jpeg if queries.distractors is not None else []
    for start in range(0, len(jpegs), batch_size):
        _featurize(jpegs[start : start + batch_size], featurizers, distractor)
    return {
        name: CandidateFeatures(
            np.concatenate(query[name]),
            np.concatenate(tracked[name]),
            None if queries.distractors is None else _concat_or_empty(distractor.get(name), query[name][0].shape[1]),
        )
        for name in query
    }


def _concat_or_empty(parts: list | None, dims: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dims), np.float32)


def ranks_of(
    queries: Queries, features: CandidateFeatures, device: str = "cpu", chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """int64 [N]: each query's rank among its candidates under `queries.settings`."""
    owner = None if queries.distractors is None else queries.distractors.owner
    return retrieval_ranks(
        features.query,
        features.tracked,
        queries.video,
        queries.frame,
        queries.min_gap_frames,
        features.distractor,
        owner,
        chunk_elements,
        device,
    )


def ranks_by_feature(
    queries: Queries, featurizers: Sequence[Featurizer], batch_size: int = 64, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """{feature name: ranks [N]} of the queries."""
    return {
        name: ranks_of(queries, f, device) for name, f in candidate_features(queries, featurizers, batch_size).items()
    }


def retrieval_results(
    index: PairIndex,
    rows: np.ndarray,
    featurizers: Sequence[Featurizer],
    batch_size: int = 64,
    settings: RetrievalSettings | None = None,
    device: str = "cpu",
) -> dict[str, dict]:
    """{feature name: metrics} for the pairs `rows` of a corpus (`settings` default: hard)."""
    queries = load_queries(index, rows, settings or RetrievalSettings())
    ranks = ranks_by_feature(queries, featurizers, batch_size, device)
    return {name: retrieval_metrics(r, queries.video, queries.num_candidates) for name, r in ranks.items()}


# ---------------------------------------------------------------- which pairs


def select_videos(
    root: str | Path, videos_file: str | Path | Sequence[str] | None
) -> tuple[PairIndex, np.ndarray, list[str]]:
    """The corpus, the rows of the pairs to use and the names of their videos: all videos, or
    those listed (one per line, as the manifest's `video` column names them) in `videos_file`, or
    given as a list of names."""
    table = read_manifest(root)
    index = PairIndex(root, table)
    names = np.asarray(table.column("video").to_numpy(zero_copy_only=False), dtype=object)
    if videos_file is None:
        rows = np.arange(len(index))
    else:
        if isinstance(videos_file, str | Path):
            path = Path(videos_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"retrieval.videos={path} does not exist; give a text file with one video per line"
                )
            wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            path, wanted = "the run's held_out.json", list(videos_file)
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
            f"{videos_file if isinstance(videos_file, str | Path) else root} gives {len(used)}"
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


def renamed(featurizer: Featurizer, label: str) -> Featurizer:
    """The featurizer with its features named "<label> (<name>)" (several networks side by side)."""
    return lambda patches: {f"{label} ({k})": v for k, v in featurizer(patches).items()}


def initialisations(checkpoint: str, seeds: Sequence[int]) -> list[Network]:
    """Fresh initialisations (one per seed) of the network a train.py checkpoint stores; [] for
    checkpoints that store none (from before networks were stored)."""
    from vidrep.eval.features import _stored_net_config, random_network, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    stored = _stored_net_config(ckpt)
    if stored is None:
        return []
    size = int(ckpt.get("hyper_parameters", {}).get("input_size", 227))
    return [random_network(size, seed=int(s), trunk_config=stored["trunk"]) for s in seeds]


def summarise_seeds(results: dict[str, dict], names: Sequence[str]) -> dict:
    """{metric: {"mean", "std", "per_seed"}} of the initialisation's features `names` (one per seed)."""
    out = {}
    for k in ("recall_at_1", "recall_at_5", "median_rank"):
        values = [results[n][k] for n in names]
        out[k] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}
    return out


def settings_of(r) -> RetrievalSettings:
    """The RetrievalSettings of a `retrieval:` config node."""
    return RetrievalSettings(
        str(r.get("candidates", "hard")),
        int(r.get("min_gap_frames", 90)),
        int(r.get("distractors", 8)),
        float(r.get("max_distractor_iou", 0.3)),
    )


def held_out_of(run: str | Path) -> dict:
    """A train.py run directory's held_out.json (vidrep/training/start.py), or an error saying what to do."""
    path = Path(run).expanduser() / "held_out.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"run={run} has no held_out.json (runs record their validation videos there since it was added); "
            "evaluate with retrieval.corpus=<corpus> retrieval.videos=<a list of videos it never trained on>"
        )
    return json.loads(path.read_text())


def _training_videos_included(checkpoints: Sequence[str], corpus: Path, videos: Sequence[str]) -> int | None:
    """How many of `videos` the checkpoint's run trained on (None when its run recorded no held-out set
    of this corpus)."""
    if len(checkpoints) != 1 or not _is_file(checkpoints[0]):
        return None
    record = Path(checkpoints[0]).expanduser().resolve().parent.parent / "held_out.json"
    if not record.is_file():
        return None
    held = json.loads(record.read_text())
    if held.get("corpora") != [str(corpus.resolve())] or "videos" not in held:
        return None
    return len(set(videos) - set(held["videos"]))


def evaluate_retrieval(cfg, load: Callable[[str], Network], checkpoints: Sequence[str], device: str) -> dict:
    """results.json's content for protocol=retrieval (written by the caller). A single train.py
    checkpoint is ranked beside its initialisations (with run=: the run's own init.ckpt first; then
    fresh ones of its network, `retrieval.init_seeds`), compared with them pair by pair, and beside
    the baselines (`retrieval.baselines`). run=<train.py run dir>: its last.ckpt (unless ckpt= is
    given) on its own held-out videos (held_out.json)."""
    r = cfg.retrieval
    run = cfg.get("run")
    held = held_out_of(run) if run else None
    from omegaconf import OmegaConf

    corpus = None if OmegaConf.is_missing(r, "corpus") else r.corpus
    if corpus in (None, "") and held is not None:
        if len(held["corpora"]) != 1 or "videos" not in held:
            raise ValueError(
                f"run={run} trained on several corpora {held['corpora']}: evaluate one with retrieval.corpus=<corpus> "
                "retrieval.videos=<its held-out videos>"
            )
        corpus = held["corpora"][0]
    if corpus in (None, ""):
        raise ValueError("protocol=retrieval needs retrieval.corpus=<a mine.py corpus> (or run=<train.py run dir>)")
    corpus = Path(corpus).expanduser()
    layers = list(r.layers)
    settings = settings_of(r)
    start = time.perf_counter()
    wanted = held["videos"] if held is not None and not r.get("videos") else r.get("videos")
    index, rows, videos = select_videos(corpus, wanted)
    mixed = None if held is not None or r.get("videos") else _training_videos_included(checkpoints, corpus, videos)
    if held is None and not r.get("videos"):
        log.warning(
            "retrieval over every video of %s%s: a network trained on this corpus is then scored on its training "
            "videos too; evaluate a run on what it never saw with run=<run dir> (its held_out.json)",
            corpus,
            "" if mixed is None else f" ({mixed} of these {len(videos)} videos are this checkpoint's training videos)",
        )
    queries = load_queries(index, rows, settings)
    featurizers, names = featurizers_for(checkpoints, layers, load, device)
    references: list[tuple[str, Network]] = []
    if len(checkpoints) == 1 and _is_file(checkpoints[0]):
        init_file = Path(run).expanduser() / "checkpoints" / "init.ckpt" if run else None
        if init_file is not None and init_file.is_file():
            references.append(("initialisation init.ckpt", load(str(init_file))))
        seeds = [int(s) for s in r.get("init_seeds", [])]
        references += [(f"initialisation seed {s}", n) for s, n in zip(seeds, initialisations(checkpoints[0], seeds))]
    featurizers += [renamed(network_featurizer([n], layers, device), label) for label, n in references]
    if r.get("baselines", True) and checkpoints[0] not in BASELINES:
        featurizers += [baseline_featurizer(b) for b in BASELINES]
    log.info(
        "retrieval (%s candidates) on %d pairs of %d videos of %s", settings.candidates, len(rows), len(videos), corpus
    )
    ranks = ranks_by_feature(queries, featurizers, int(r.get("batch_size", 64)), device)
    results = {name: retrieval_metrics(k, queries.video, queries.num_candidates) for name, k in ranks.items()}
    extra: dict = {}
    if references:
        labels = [label for label, _ in references]
        extra["initialisation"] = {
            layer: {**summarise_seeds(results, [f"{lab} ({layer})" for lab in labels]), "references": labels}
            for layer in layers
        }
        versus = {}
        for name in ranks:
            if name.startswith("initialisation "):
                continue
            layer = name if name in layers else layers[0]
            per = [{"reference": lab, **compare_pairs(ranks[name], ranks[f"{lab} ({layer})"])} for lab in labels]
            versus[name] = {**{k: per[0][k] for k in ("wins", "losses", "p")}, "reference": labels[0], "each": per}
        extra["vs_initialisation"] = versus
    return {
        "row": "retrieval",
        "label": cfg.label or f"retrieval ({', '.join(Path(c).parent.parent.name or c for c in checkpoints)})",
        "protocol": {"name": "retrieval", "layers": layers},
        "checkpoints": names,
        "data": {
            "corpus": str(corpus.resolve()),
            "videos_file": None if held is not None and not r.get("videos") else r.get("videos"),
            "run": str(Path(run).expanduser().resolve()) if run else None,
            "videos": videos,
            "num_pairs": int(len(rows)),
            "num_videos": len(videos),
            "training_videos_included": mixed,
        },
        "seed": cfg.seed,
        "input_size": cfg.input_size,
        "seconds": time.perf_counter() - start,
        "retrieval_settings": settings.to_dict(),
        "retrieval": results,
        **extra,
    }


def _is_file(spec: str) -> bool:
    """A train.py checkpoint (one that can have a run, an init.ckpt and seeds of its own network)."""
    return spec not in BASELINES and spec != "random" and not spec.startswith(("imagenet:", "caffe:"))


def _log_wandb(cfg, run_dir: Path, result: dict) -> None:
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
    result = evaluate_retrieval(cfg, load, checkpoints, device)
    run_dir = Path(cfg.run_dir)
    write_results(run_dir, result)
    print(retrieval_table(result["retrieval"], result.get("vs_initialisation")))
    print(
        f"{result['data']['num_pairs']} pairs of {result['data']['num_videos']} videos of {result['data']['corpus']}; "
        f"results: {run_dir / 'results.json'}"
    )
    _log_wandb(cfg, run_dir, result)
    return result
