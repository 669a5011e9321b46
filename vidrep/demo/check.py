"""The demo's closing check: retrieval on the held-out videos (`held_out_retrieval`) for the trained
trunk, its own initialisation and the two feature-free baselines, run by the `DemoCheck` callback
that conf/data/demo.yaml adds (callbacks.demo_check).

`frozen_svm_report` is the check it replaced (frozen-feature SVM mAP on a VOC-format set drawn from
the synthetic world), kept for bench/probe_calibration.py, which shows why it was dropped."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from vidrep.common.io import write_bytes
from vidrep.data.synthetic import SHAPES
from vidrep.data.synthetic_voc import write_synthetic_voc
from vidrep.data.voc import read_voc
from vidrep.eval.features import Network, mean_subtract
from vidrep.eval.frozen import SvmProtocol
from vidrep.eval.retrieval import (
    BASELINES,
    METRIC_KEYS,
    baseline_featurizer,
    network_featurizer,
    retrieval_results,
    retrieval_table,
)

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
    return retrieval_results(index, rows, renamed + featurizers[2:], batch_size)


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


class DemoCheck(L.Callback):
    """After fit, on rank 0: does the trained network find each held-out pair's tracked patch among
    the other held-out videos' patches better than its own initialisation and trivial cues?

    The table is printed, saved as `<output_dir>/demo_eval.md` and logged as
    demo_eval/<features>/{recall_at_1,recall_at_5,median_rank}; `final_metrics` holds the same
    figures for train()'s return value (sweepers read it)."""

    def __init__(self, output_dir: str | Path, layer: str = "fc7", batch_size: int = 64) -> None:
        self.output_dir, self.layer, self.batch_size = Path(output_dir), layer, batch_size
        self._initial: nn.Module | None = None
        self.final_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup runs before a checkpoint is restored: this is the initialisation, also on resume
        if stage == "fit" and trainer.is_global_zero:
            self._initial = copy.deepcopy(pl_module.net.trunk).cpu()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._initial is None:
            return
        val = trainer.datamodule.val_set
        if len(set(val.video_ids().tolist())) < 2:
            log.warning("demo check skipped: retrieval needs at least 2 held-out videos (raise data.val_fraction)")
            return
        log.info("retrieval on the %d held-out pairs: trained vs initial trunk vs colour_histogram vs pixels", len(val))
        report = held_out_retrieval(
            val.index,
            val.rows,
            pl_module.net.trunk,
            self._initial,
            pl_module.input_size,
            list(pl_module.hparams["pixel_mean"]),
            self.layer,
            self.batch_size,
        )
        table = (
            retrieval_table(report) + "\n\n" + format_weight_change(weight_change(pl_module.net.trunk, self._initial))
        )
        print(
            "\nDemo check: retrieval of each held-out pair's tracked patch among the tracked patches of the "
            "other held-out videos (R@k: share of queries ranked <= k)\n" + table
        )
        write_bytes(self.output_dir / "demo_eval.md", (table + "\n").encode())
        self.final_metrics = {
            f"demo_eval/{name.split(' ')[0]}/{k}": float(r[k])
            for name, r in report.items()
            for k in ("recall_at_1", "recall_at_5", "median_rank")
        }
        for lg in trainer.loggers:
            lg.log_metrics(self.final_metrics)
            if hasattr(lg, "log_table"):  # W&B: the table itself, beside the scalars
                lg.log_table(
                    key="demo_eval/retrieval",
                    columns=["features", *METRIC_KEYS],
                    data=[[name, *(r[k] for k in METRIC_KEYS)] for name, r in report.items()],
                )
            lg.save()
