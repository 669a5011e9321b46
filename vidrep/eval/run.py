"""The task behind evaluate.py: load the networks, run the protocol, write and print the results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vidrep.data.synthetic_voc import is_synthetic
from vidrep.data.voc import read_voc
from vidrep.eval.features import load_network, trained_with_labels
from vidrep.eval.report import data_name, default_row, per_class_table, wandb_eval_run, write_results
from vidrep.eval.splits import check_disjoint, resolve_splits, use_07_metric_for

log = logging.getLogger(__name__)


def _checkpoints(ckpt) -> list[str]:
    ckpts = list(ckpt) if OmegaConf.is_list(ckpt) or isinstance(ckpt, list | tuple) else [ckpt]
    if not ckpts or any(c in (None, "", "???") for c in ckpts):
        raise ValueError(
            "set ckpt=<train.py checkpoint>, ckpt=random, ckpt=imagenet:<file>, ckpt=caffe:<file>, or ckpt=[a,b,c] "
            "for an ensemble "
            "(protocol=retrieval also takes ckpt=colour_histogram or ckpt=pixels)"
        )
    return [str(c) for c in ckpts]


def _log_wandb(cfg: DictConfig, run_dir: Path, result: dict, pictures: list[Path]) -> None:
    with wandb_eval_run(cfg, run_dir, result["label"]) as run:
        if run is None:
            return
        import wandb

        table = wandb.Table(columns=["layer", "mAP", *result["data"]["classes"]])
        for layer, r in result["layers"].items():
            table.add_data(layer, r["map"], *r["ap"])
            run.summary[f"eval/map/{layer}"] = r["map"]
        run.summary["eval/map"] = result["map"]
        run.log({"eval/per_class_ap": table, **{f"pictures/{p.stem}": wandb.Image(str(p)) for p in pictures}})


def _data_key(root, year, classes) -> str:
    """Names the data in cache paths: a hash, as the root itself is an absolute path."""
    import hashlib

    text = f"{Path(root).expanduser().resolve()}|VOC{year}|{','.join(classes)}"
    return f"VOC{year}-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


# Overrides that say where a run's files are, not what it trained.
_NOT_A_NAME = (
    "data.root",
    "hydra.",
    "paths.",
    "ckpt_path",
    "logger.",
    "trainer.devices",
    "trainer.num_nodes",
    "data.num_workers",
)


def checkpoint_name(ckpt: str) -> str:
    """A readable name for a network: what its train.py run changed (its .hydra/overrides.yaml, e.g.
    "experiment=paper_8M"), else its data option ("demo"), else its run directory's name; "random"
    and "imagenet" as given."""
    if ckpt == "random" or ckpt.startswith("imagenet:"):
        return ckpt.split(":")[0]
    if ckpt.startswith("caffe:"):  # e.g. caffe:color_model, caffe:bvlc_reference_caffenet
        return f"caffe:{Path(ckpt[len('caffe:') :].split('+')[0]).stem}"
    run = Path(ckpt).expanduser().resolve().parent.parent
    overrides_file, hydra_file = run / ".hydra" / "overrides.yaml", run / ".hydra" / "hydra.yaml"
    if overrides_file.exists():
        kept = [o for o in OmegaConf.load(overrides_file) if not str(o).lstrip("+~").startswith(_NOT_A_NAME)]
        if kept:
            return ",".join(map(str, kept))
    if hydra_file.exists():
        data = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.data")
        if data:
            return str(data)
    return run.name or ckpt


def _data_name(voc: DictConfig) -> dict:
    """A synthetic VOC-format set is labelled as such in every table and picture, never as VOC."""
    synthetic = is_synthetic(voc.root, voc.year)
    return {"name": "synthetic VOC-format" if synthetic else f"VOC{voc.year}", "synthetic": synthetic}


def _network_loader(cfg: DictConfig):
    """spec -> Network; ckpt=random builds the trunk of `model.net.trunk` (the model config group)."""
    trunk = OmegaConf.select(cfg, "model.net.trunk")
    trunk_config = OmegaConf.to_container(trunk, resolve=True) if trunk is not None else None
    return lambda spec: load_network(spec, input_size=cfg.input_size, seed=cfg.seed, trunk_config=trunk_config)


def evaluate(cfg: DictConfig, draw: Callable[[dict, Path], list[Path]] | None = None) -> dict:
    """Run the protocol, write results.json; `draw(result, folder)` (evaluate.py passes
    vidrep.viz.evaluation.draw_evaluation) makes the pictures, which W&B then logs."""
    load = _network_loader(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.protocol.get("name") == "retrieval":
        from vidrep.eval.retrieval import run_retrieval

        run = cfg.get("run")
        ckpt = f"{run}/checkpoints/last.ckpt" if run and OmegaConf.is_missing(cfg, "ckpt") else cfg.ckpt
        return run_retrieval(cfg, _checkpoints(ckpt), device, load)
    checkpoints = _checkpoints(cfg.ckpt)
    classes = tuple(cfg.voc.classes)
    train_split, test_split = resolve_splits(cfg.voc.year, cfg.voc.train_split, cfg.voc.test_split)
    train = read_voc(cfg.voc.root, cfg.voc.year, train_split, classes)
    test = read_voc(cfg.voc.root, cfg.voc.year, test_split, classes)
    check_disjoint([im.id for im in train], [im.id for im in test], train_split, test_split, cfg.voc.year)
    networks = [load(c) for c in checkpoints]
    # use_07_metric: null follows the year, as the devkit does
    ap_variant = (
        {"use_07_metric": use_07_metric_for(cfg.voc.year, None)}
        if cfg.protocol.get("use_07_metric", False) is None
        else {}
    )
    protocol = hydra.utils.instantiate(cfg.protocol, **ap_variant)
    start = time.perf_counter()
    # the split names too: the protocols cache per role (train, test), and the roles' images change with them
    data_key = f"{_data_key(cfg.voc.root, cfg.voc.year, classes)}-{train_split}-{test_split}"
    # the detection protocol's training runs: the re-adaptation's TripletModule (`model`) and
    # their W&B curves (`logger`)
    trainers = (
        {"model": cfg.get("model"), "logger": cfg.get("logger") if cfg.wandb.enabled else None}
        if protocol.settings()["name"] == "detection"
        else {}
    )
    outcome = protocol.run(networks, train, test, classes, Path(cfg.cache_dir), data_key, device, **trainers)
    run_dir = Path(cfg.run_dir)
    row = default_row(
        protocol.settings()["name"],
        cfg.protocol.get("finetune"),
        checkpoints,
        any(trained_with_labels(n) for n in networks),
    )
    result = {
        "row": row,
        "label": cfg.label or f"{protocol.settings()['name']}:{'+'.join(checkpoint_name(c) for c in checkpoints)}",
        "protocol": protocol.settings(),
        "checkpoints": [n.name for n in networks],
        "data": {
            "root": str(Path(cfg.voc.root).expanduser().resolve()),
            "year": cfg.voc.year,
            **_data_name(cfg.voc),
            "train_split": train_split,
            "test_split": test_split,
            "classes": list(classes),
            "num_train_images": len(train),
            "num_test_images": len(test),
        },
        "splits": {
            "train": {"name": train_split, "images": len(train)},
            "test": {"name": test_split, "images": len(test)},
        },
        "seed": cfg.seed,
        "input_size": cfg.input_size,
        "seconds": time.perf_counter() - start,
        **outcome,
    }
    write_results(run_dir, result)
    print(per_class_table(result))
    print(
        f"mAP {100 * result['map']:.1f} on {data_name(result)} ({result.get('best_layer', '')}); "
        f"results: {run_dir / 'results.json'}"
    )
    pictures = draw(result, run_dir / "pictures") if draw is not None and cfg.get("pictures", True) else []
    if pictures:
        print(f"pictures: {run_dir / 'pictures'}")
    _log_wandb(cfg, run_dir, result, pictures)
    return result
