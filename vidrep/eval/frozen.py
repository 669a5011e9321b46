"""The `svm` protocol: frozen features of one network (or an ensemble) + per-class linear SVMs."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vidrep import usable_cores
from vidrep.common.io import write_array
from vidrep.data.voc import VOCImage
from vidrep.eval.features import Network, extract_features
from vidrep.eval.svm import svm_class_results

log = logging.getLogger(__name__)


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def cached_features(
    net: Network,
    images: Sequence[VOCImage],
    layers: Sequence[str],
    cache_dir: Path,
    split_key: str,
    batch_size: int,
    device: str,
    pooling: str = "adaptive",
    split: str = "",
    resize: str = "warp",
    workers: int = 0,
) -> dict[str, np.ndarray]:
    """Features per layer, stored as .npy per (network, split, resize and pooling, layer) and reused
    by later runs; `workers` loader processes decode the images."""
    folder = cache_dir / "features" / net.key / split_key / f"{resize}-{pooling}"
    missing = [name for name in layers if not (folder / f"{name}.npy").exists()]
    if missing:
        log.info("extracting %s features of the %d %s images for %s", ",".join(missing), len(images), split, net.name)
        feats = extract_features(
            net,
            [im.path for im in images],
            missing,
            batch_size,
            device,
            pooling,
            desc=f"{split} features" if split else "features",
            workers=workers,
            resize=resize,
        )
        for name, f in feats.items():
            write_array(folder / f"{name}.npy", f)
    return {name: np.load(folder / f"{name}.npy") for name in layers}


@dataclass
class SvmProtocol:
    """Goyal et al.'s VOC07 benchmark by default (vidrep/conf/protocol/svm.yaml cites the files): AlexNet's
    conv1-conv5 with their fixed pooling, their resize, their cost list, 3-fold CV scored by
    sklearn's AP, the test AP of their calculate_ap (all points). Deviations are the named options.
    `workers` (None: the cores available) decode images and fit SVMs in parallel; results do not
    depend on it."""

    # None: the trunk's benchmark_layers
    layers: list[str] | None = field(default_factory=lambda: ["conv1", "conv2", "conv3", "conv4", "conv5"])
    costs: list[float] = field(
        default_factory=lambda: (
            [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0] + [0.5**k for k in range(4, 20)]
        )
    )
    folds: int = 3
    seed: int = 0
    use_07_metric: bool = False
    batch_size: int = 64
    pooling: str = "goyal"  # goyal | adaptive (conv maps adaptively pooled to ~9K values)
    cv_scoring: str = "goyal"  # goyal | voc
    max_iter: int = 2000  # liblinear iterations (theirs: 2000)
    resize: str = "goyal"  # goyal: shorter side 256, then the whole image to the input, bilinear | warp: one INTER_AREA
    workers: int | None = None  # processes for image decoding and SVM fits; None: the cores available

    def settings(self) -> dict:
        return {"name": "svm", **asdict(self)}

    def _workers(self) -> int:
        return usable_cores() if self.workers is None else max(1, int(self.workers))

    def run(
        self,
        networks: Sequence[Network],
        train: Sequence[VOCImage],
        test: Sequence[VOCImage],
        classes: Sequence[str],
        cache_dir: Path,
        data_key: str,
        device: str = "cpu",
    ) -> dict:
        """{"layers": {layer: {"ap": [...], "map": float, "classes": [per-class dicts]}}, "best_layer"}."""
        if self.layers is None:  # resolved here, so that settings() (caches, results.json) name the layers evaluated
            self.layers = benchmark_layers(networks)
        feats = {
            split: [
                cached_features(
                    net,
                    images,
                    self.layers,
                    cache_dir,
                    f"{data_key}-{split}",
                    self.batch_size,
                    device,
                    self.pooling,
                    split,
                    self.resize,
                    # 0 decodes in this process: one worker would only add a copy
                    self._workers() if self._workers() > 1 else 0,
                )
                for net in networks
            ]
            for split, images in (("train", train), ("test", test))
        }
        labels = {
            split: np.stack([im.class_labels(len(classes)) for im in images])
            for split, images in (("train", train), ("test", test))
        }
        out = {}
        for layer in self.layers:
            x = {s: _concat([f[layer] for f in feats[s]]) for s in feats}
            # the results do not depend on the number of processes: a rerun with another keeps the stage
            settings = {k: v for k, v in self.settings().items() if k != "workers"}
            stage = cache_dir / "svm" / _key([n.key for n in networks], layer, data_key, settings)
            per_class = svm_class_results(
                x["train"],
                labels["train"],
                x["test"],
                labels["test"],
                classes,
                self.costs,
                self.folds,
                self.seed,
                self.use_07_metric,
                stage,
                self.cv_scoring,
                self.max_iter,
                desc=f"{layer} SVMs",
                workers=self._workers(),
            )
            ap = [r["ap"] for r in per_class]
            valid = [a for a in ap if not np.isnan(a)]
            out[layer] = {"ap": ap, "map": float(np.mean(valid)) if valid else float("nan"), "classes": per_class}
            log.info("%s: mAP %.4f", layer, out[layer]["map"])
        best = max(out, key=lambda k: -np.inf if np.isnan(out[k]["map"]) else out[k]["map"])
        return {"layers": out, "best_layer": best, "map": out[best]["map"]}


def benchmark_layers(networks: Sequence[Network]) -> list[str]:
    """The benchmark layers (`Trunk.benchmark_layers`) of the first network that every network has."""
    layers = [
        name for name in networks[0].trunk.benchmark_layers if all(name in n.trunk.feature_layers for n in networks)
    ]
    if not layers:
        raise ValueError(
            f"the networks {[n.name for n in networks]} share no benchmark layer; name them: protocol.layers=[...]"
        )
    return layers


def _concat(features: list[np.ndarray]) -> np.ndarray:
    """An ensemble's features side by side, re-normalised so every network weighs the same."""
    if len(features) == 1:
        return features[0]
    x = np.concatenate(features, axis=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
