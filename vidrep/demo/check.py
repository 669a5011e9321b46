"""The demo's closing check, run by the `DemoCheck` callback that vidrep/conf/data/demo.yaml adds
(callbacks.demo_check), on a fixed **test world**: synthetic videos of the demo's world drawn from
seeds training never uses (built once, mined and cut for distractors, cached like the corpus). For
the trained trunk, its initialisation (the run's own and 2 more seeds) and the two feature-free
baselines:

- retrieval under the hard protocol (vidrep/eval/retrieval.py, `candidates=hard`), each network
  compared pair by pair with the run's initialisation (wins, losses, sign-test p);
- a linear probe on the world's object classes (the generator knows every object's shape): a
  logistic regression on frozen features of a window centred on each object, trained on the objects
  of half the test world's videos and scored on the other half.

`frozen_svm_report` is the check it replaced (frozen-feature SVM mAP on a VOC-format set drawn from
the synthetic world), kept for bench/probe_calibration.py, which shows why it was dropped."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from vidrep.common.io import write_bytes, write_json
from vidrep.data.corpus import PairIndex
from vidrep.data.synthetic import SHAPES, SyntheticVideo
from vidrep.data.synthetic_voc import write_synthetic_voc
from vidrep.data.voc import read_voc
from vidrep.eval.features import Network, mean_subtract
from vidrep.eval.frozen import SvmProtocol
from vidrep.eval.probe import probe_accuracy
from vidrep.eval.retrieval import (
    BASELINES,
    METRIC_KEYS,
    RetrievalSettings,
    baseline_featurizer,
    compare_pairs,
    load_queries,
    network_featurizer,
    ranks_by_feature,
    retrieval_metrics,
    retrieval_results,
)
from vidrep.models.trunk import build_trunk

log = logging.getLogger(__name__)


def frozen_svm_report(
    trained: nn.Module,
    initial: nn.Module,
    input_size: int,
    pixel_mean: Sequence[float],
    voc_root: str | Path,
    num_images: int = 150,
    layers: Sequence[str] = ("conv3", "conv5", "pool5", "fc7"),
    costs: Sequence[float] = (0.1, 1.0, 10.0),
    seed: int = 0,
) -> dict[str, dict]:
    """{"trained": {"layer", "map"}, "random init": {...}} for the best layer of each."""
    write_synthetic_voc(voc_root, num_trainval=num_images, num_test=num_images)
    train = read_voc(voc_root, 2007, "trainval", SHAPES)
    test = read_voc(voc_root, 2007, "test", SHAPES)
    # the settings docs/evaluation.md's probe figures were measured with (11-point AP, adaptive pooling, shuffled folds)
    protocol = SvmProtocol(
        layers=list(layers),
        costs=list(costs),
        seed=seed,
        use_07_metric=True,
        pooling="adaptive",
        cv_scoring="voc",
        max_iter=5000,
    )
    report = {}
    with tempfile.TemporaryDirectory() as cache:  # these weights live only in this run: nothing to reuse
        for name, trunk in (("trained", trained), ("random init", initial)):
            net = Network(
                name, copy.deepcopy(trunk).cpu().eval(), input_size, mean_subtract(pixel_mean), name.replace(" ", "-")
            )
            result = protocol.run([net], train, test, SHAPES, Path(cache), "demo-voc", "cpu")
            report[name] = {
                "layer": result["best_layer"],
                "map": result["map"],
                "per_layer": {k: v["map"] for k, v in result["layers"].items()},
            }
    return report


def held_out_retrieval(
    index,
    rows,
    trained: nn.Module,
    initial: nn.Module,
    input_size: int,
    pixel_mean: Sequence[float],
    layer: str = "fc7",
    batch_size: int = 64,
) -> dict[str, dict]:
    """{"trained (fc7)": metrics, "initialisation (fc7)": ..., "colour_histogram": ..., "pixels": ...}
    on the pairs `rows` of the corpus `index` (the held-out videos)."""
    nets = {
        name: Network(name, copy.deepcopy(trunk).cpu().eval(), input_size, mean_subtract(pixel_mean), name)
        for name, trunk in (("trained", trained), ("initialisation", initial))
    }
    featurizers = [network_featurizer([net], [layer]) for net in nets.values()] + [
        baseline_featurizer(b) for b in BASELINES
    ]
    # one pass over the patches for all four: the two networks both name their features `layer`
    renamed = [lambda p, f=f, n=n: {f"{n} ({layer})": v for v in f(p).values()} for n, f in zip(nets, featurizers[:2])]
    settings = RetrievalSettings(candidates="other_videos")
    return retrieval_results(index, rows, renamed + featurizers[2:], batch_size, settings)


def weight_change(trained: nn.Module, initial: nn.Module) -> dict[str, float]:
    """{layer: ||W - W0|| / ||W0||} over each layer's weights: how far training moved the trunk
    from its initialisation (biases left out: the demo starts them at zero, where a relative change
    means nothing)."""
    start = {name: w.detach().cpu() for name, w in initial.named_parameters()}
    with torch.no_grad():
        return {
            name.removesuffix(".weight"): float((w.cpu() - start[name]).norm() / start[name].norm())
            for name, w in trained.named_parameters()
            if name.endswith(".weight")
        }


def format_weight_change(change: dict[str, float]) -> str:
    return "Weights moved from their initialisation (||W - W0|| / ||W0||): " + ", ".join(
        f"{name} {100 * v:.1f} %" for name, v in change.items()
    )


def format_report(report: dict[str, dict]) -> str:
    layers = list(next(iter(report.values()))["per_layer"])
    lines = ["| network | " + " | ".join(layers) + " | best |", "|" + "---|" * (len(layers) + 2)]
    for name, r in report.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r['per_layer'][k]:.1f}" for k in layers)
            + f" | {100 * r['map']:.1f} ({r['layer']}) |"
        )
    return "\n".join(lines)


FEATURES = ("trained", "initialisation", *BASELINES)
PROBE_FRAMES = (10, 50, 90)  # the frames whose objects the probe sees (clipped to the video's length)


def build_test_world(root: str | Path, num_videos: int, num_frames: int, seed: int, world: dict, settings) -> Path:
    """The test world at `root` (a demo corpus of seeds seed ... seed + num_videos - 1, mined), with
    the distractors of the hard protocol cut from its videos; each step done once and cached."""
    from vidrep.demo.corpus import build_demo_corpus
    from vidrep.eval.distractors import write_distractors

    root = Path(root)
    build_demo_corpus(root, num_videos, num_frames, seed, world=world, progress=False)
    if settings.candidates == "hard":
        done = write_distractors(
            root, root.with_name(f"{root.name}-videos"), settings.distractors, settings.max_distractor_iou
        )
        if done["failed"]:
            raise RuntimeError(
                f"cutting the test world's distractors failed for {sorted(done['failed'])[:3]}: delete "
                f"{root} and its -videos folder to rebuild"
            )
    return root


def object_windows(params: dict, window: int = 227) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 RGB windows [M, window, window, 3], shape labels [M], video seeds [M]): a window of the
    miner's size centred on every object (clipped to the frame) at PROBE_FRAMES of each video of the
    demo world `params` (a demo.json), re-rendered from its seeds."""
    patches, labels, seeds = [], [], []
    for seed in range(params["seed"], params["seed"] + params["num_videos"]):
        video = SyntheticVideo(seed, num_frames=params["num_frames"], **params.get("world", {}))
        for t in sorted({min(t, video.num_frames - 1) for t in PROBE_FRAMES}):
            frame = video.frame(t)
            for (x, y, w, h), shape in zip(video.boxes(t), video.shapes):
                left = int(np.clip(x + w // 2 - window // 2, 0, video.width - window))
                top = int(np.clip(y + h // 2 - window // 2, 0, video.height - window))
                patches.append(frame[top : top + window, left : left + window, ::-1])
                labels.append(SHAPES.index(shape))
                seeds.append(seed)
    return np.ascontiguousarray(np.stack(patches)), np.asarray(labels), np.asarray(seeds)


def batched_features(featurizer, patches: np.ndarray, batch_size: int) -> np.ndarray:
    """A one-layer featurizer's features [N, D] of `patches`, `batch_size` at a time."""
    parts = [featurizer(patches[i : i + batch_size]) for i in range(0, len(patches), batch_size)]
    (name,) = parts[0]
    return np.concatenate([p[name] for p in parts])


def probe_split(seeds: np.ndarray) -> np.ndarray:
    """The probe's fit mask over objects: those of the first half of the videos (by seed) fit it, the
    other half score it, so no video is on both sides."""
    return seeds < np.median(np.unique(seeds))


def initial_trunks(initial: nn.Module, seeds: Sequence[int]) -> list[nn.Module]:
    """The run's initialisation, then the same trunk drawn afresh with each of `seeds` (the global
    random state is left as it was)."""
    trunks = [initial]
    for seed in seeds:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trunks.append(build_trunk(initial.config()))
    return trunks


def trunk_featurizers(trunks: dict[str, nn.Module], input_size: int, pixel_mean: Sequence[float], layer: str) -> dict:
    """{name: featurizer of `layer`} for each trunk, then the baselines; each gives {name: features}."""
    featurizers = {
        name: network_featurizer(
            [Network(name, copy.deepcopy(t).cpu().eval(), input_size, mean_subtract(pixel_mean), name)], [layer]
        )
        for name, t in trunks.items()
    } | {b: baseline_featurizer(b) for b in BASELINES}
    return {n: (lambda p, f=f, n=n: {n: next(iter(f(p).values()))}) for n, f in featurizers.items()}


def compare_retrieval(
    index: PairIndex,
    rows: np.ndarray,
    featurizers: dict,
    settings: RetrievalSettings,
    reference: str = "initialisation 0",
    batch_size: int = 64,
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """({name: retrieval metrics + wins_vs_init, losses_vs_init, p_vs_init against `reference`},
    {name: ranks}) for the pairs `rows` of `index` under `settings`."""
    queries = load_queries(index, np.asarray(rows, np.int64), settings)
    ranks = ranks_by_feature(queries, list(featurizers.values()), batch_size)
    metrics = {n: retrieval_metrics(r, queries.video, queries.num_candidates) for n, r in ranks.items()}
    for n in metrics:
        c = compare_pairs(ranks[n], ranks[reference])
        metrics[n] |= {"wins_vs_init": c["wins"], "losses_vs_init": c["losses"], "p_vs_init": c["p"]}
    return metrics, ranks


def seed_mean(rows: Sequence[dict]) -> dict:
    """The mean of each float figure over the seeds' rows (counts taken from the first)."""
    return {k: float(np.mean([r[k] for r in rows])) if isinstance(rows[0][k], float) else rows[0][k] for k in rows[0]}


def summarise(metrics: dict, probe: dict, ranks: dict, init_seeds: Sequence, settings, layer: str) -> dict:
    """demo_eval.json's layout from per-network figures named trained, initialisation <i>, baselines."""
    init_names = [f"initialisation {i}" for i in range(len(init_seeds))]

    def pick(table: dict) -> dict:
        return {"trained": table["trained"], "initialisation": seed_mean([table[n] for n in init_names])} | {
            b: table[b] for b in BASELINES
        }

    return {
        "candidates": settings.candidates,
        "retrieval_settings": settings.to_dict(),
        "layer": layer,
        "retrieval": pick(metrics),
        "probe": pick(probe),
        "initialisation_seeds": [
            {
                "seed": s,
                "retrieval": metrics[n],
                "probe": probe[n],
                "trained_vs_this_seed": compare_pairs(ranks["trained"], ranks[n]),
            }
            for s, n in zip(init_seeds, init_names)
        ],
    }


def test_world_report(
    root: str | Path,
    trained: nn.Module,
    initial: nn.Module,
    input_size: int,
    pixel_mean: Sequence[float],
    layer: str = "fc7",
    init_seeds: Sequence[int] = (1, 2),
    settings: RetrievalSettings | None = None,
    batch_size: int = 64,
) -> dict:
    """demo_eval.json's content (see DemoCheck) for the test world at `root`."""
    settings = settings or RetrievalSettings()
    root = Path(root)
    index = PairIndex(root)
    inits = initial_trunks(initial, init_seeds)
    trunks = {"trained": trained, **{f"initialisation {i}": t for i, t in enumerate(inits)}}
    featurizers = trunk_featurizers(trunks, input_size, pixel_mean, layer)
    metrics, ranks = compare_retrieval(index, np.arange(len(index)), featurizers, settings, batch_size=batch_size)

    patches, labels, seeds = object_windows(json.loads((root / "demo.json").read_text()))
    fit = probe_split(seeds)
    probe = {}
    for n, f in featurizers.items():
        x = batched_features(f, patches, batch_size)
        probe[n] = probe_accuracy(x[fit], labels[fit], x[~fit], labels[~fit])
    return {"test_world": str(root)} | summarise(metrics, probe, ranks, ["run", *init_seeds], settings, layer)


def retrieval_rows(retrieval: dict[str, dict], seeds: Sequence[dict], title: str) -> list[str]:
    """The retrieval table: `retrieval` {trained, initialisation (the seeds' mean), baselines...},
    `seeds` the initialisation's per-seed metrics (for its spread)."""
    lines = [
        title,
        "",
        "| features | R@1 (%) | R@5 (%) | median rank | pairs | videos | candidates (mean) "
        "| vs init: wins / losses (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in retrieval.items():
        r1 = f"{100 * r['recall_at_1']:.1f}"
        if name == "initialisation":
            r1 += f" +- {100 * np.std([m['recall_at_1'] for m in seeds]):.1f}"
        cmp = "" if name == "initialisation" else f"{r['wins_vs_init']} / {r['losses_vs_init']} ({r['p_vs_init']:.2g})"
        lines.append(
            f"| {name} | {r1} | {100 * r['recall_at_5']:.1f} | {r['median_rank']:g} | {r['num_pairs']} | "
            f"{r['num_videos']} | {r['num_candidates_mean']:.1f} | {cmp} |"
        )
    return lines


def format_test_world_report(report: dict) -> str:
    seeds = report["initialisation_seeds"]
    spread = lambda k, table: float(np.std([s[table][k] for s in seeds]))  # noqa: E731
    lines = retrieval_rows(
        report["retrieval"],
        [s["retrieval"] for s in seeds],
        f"Retrieval ({report['candidates']} candidates, {report['layer']}) on the test world:",
    )
    lines += [
        "",
        "Linear probe on the objects' shapes (logistic regression, frozen features):",
        "",
        "| features | accuracy (%) | train / test objects |",
        "|---|---|---|",
    ]
    for name, r in report["probe"].items():
        acc = f"{100 * r['accuracy']:.1f}" + (
            f" +- {100 * spread('accuracy', 'probe'):.1f}" if name == "initialisation" else ""
        )
        lines.append(f"| {name} | {acc} | {r['num_train']} / {r['num_test']} |")
    lines += [
        "",
        "initialisation: the mean over the run's own and seeds "
        + ", ".join(str(s["seed"]) for s in seeds[1:])
        + " (+- their standard deviation); wins / losses: "
        "queries right at rank 1 where the run's initialisation is wrong, and the reverse (two-sided sign test).",
    ]
    return "\n".join(lines)


class DemoCheck(L.Callback):
    """After fit, on rank 0: on the test world (`test_world`: root, num_videos, num_frames, seed,
    world; built once), does the trained network retrieve each pair's tracked patch (hard protocol)
    and classify the objects' shapes (linear probe) better than its initialisation and trivial cues?

    Printed, saved as `<output_dir>/demo_eval.md` and `<output_dir>/demo_eval.json`
    ({"candidates", "retrieval": {F: metrics + wins_vs_init, losses_vs_init, p_vs_init}, "probe":
    {F: {accuracy, num_train, num_test}}, "initialisation_seeds": [...]}, F in trained, initialisation
    (the seeds' mean), colour_histogram, pixels) and logged as demo_eval/<F>/<metric>; `final_metrics`
    holds the same figures for train()'s return value (sweepers read it)."""

    def __init__(
        self,
        output_dir: str | Path,
        test_world: dict,
        layer: str = "fc7",
        batch_size: int = 64,
        init_seeds: Sequence[int] = (1, 2),
        retrieval: dict | None = None,
    ) -> None:
        self.output_dir, self.layer, self.batch_size = Path(output_dir), layer, batch_size
        self.test_world = dict(test_world)
        self.init_seeds = list(init_seeds)
        self.settings = RetrievalSettings(**dict(retrieval or {}))
        self._initial: nn.Module | None = None
        self.final_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup runs before a checkpoint is restored: this is the initialisation, also on resume
        if stage == "fit" and trainer.is_global_zero:
            self._initial = copy.deepcopy(pl_module.net.trunk).cpu()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._initial is None:
            return
        from omegaconf import OmegaConf

        world = self.test_world
        world = OmegaConf.to_container(world, resolve=True) if OmegaConf.is_config(world) else world
        log.info("demo check: building (once) and scoring the test world at %s", world["root"])
        root = build_test_world(
            world["root"],
            world["num_videos"],
            world["num_frames"],
            world["seed"],
            dict(world.get("world") or {}),
            self.settings,
        )
        report = test_world_report(
            root,
            pl_module.net.trunk,
            self._initial,
            pl_module.input_size,
            list(pl_module.hparams["pixel_mean"]),
            self.layer,
            self.init_seeds,
            self.settings,
            self.batch_size,
        )
        table = (
            format_test_world_report(report)
            + "\n\n"
            + format_weight_change(weight_change(pl_module.net.trunk, self._initial))
        )
        print("\nDemo check on the test world (videos training never saw)\n" + table)
        write_bytes(self.output_dir / "demo_eval.md", (table + "\n").encode())
        write_json(self.output_dir / "demo_eval.json", report)
        self.final_metrics = {
            f"demo_eval/{name}/{k}": float(r[k])
            for name, r in report["retrieval"].items()
            for k in ("recall_at_1", "recall_at_5", "median_rank")
        } | {f"demo_eval/{name}/probe_accuracy": float(r["accuracy"]) for name, r in report["probe"].items()}
        for lg in trainer.loggers:
            lg.log_metrics(self.final_metrics)
            if hasattr(lg, "log_table"):  # W&B: the table itself, beside the scalars
                lg.log_table(
                    key="demo_eval/retrieval",
                    columns=["features", *METRIC_KEYS],
                    data=[[name, *(r[k] for k in METRIC_KEYS)] for name, r in report["retrieval"].items()],
                )
            lg.save()
