"""Can the demo's check show learning at all with the demo's network and budget? The same network
trained with the world's labels, scored by the same check.

    python bench/demo_labels.py --lr-scales 1 10   # the dated table (48 min on 2 cores at load 6-8; 440 steps)
    python bench/demo_labels.py                    # seeds 0 1 2 to 20 steps, seed 0 to 200 (240 steps)
    python bench/demo_labels.py --checkpoint outputs/train/<run>/checkpoints/last.ckpt   # + the demo's network
    python bench/demo_labels.py --steps 2 5 --seeds 0 --override data.demo.num_videos=4   # a smoke run

The demo (`python train.py`, data=demo) does not beat its initialisation on the test world's hard
protocol, and its shape probe is at chance for every feature (docs/evaluation.md, "The demo's
check"). That says nothing until something is shown to move the check: here the demo's trunk
(experiment=cpu, composed from vidrep/conf as train.py composes it) learns the answer the probe
asks for. Windows centred on each object of the **training** world's videos
(vidrep.demo.check.object_windows, re-rendered from data.demo's seeds: 128 videos x 3 frames x 3
objects) with their shapes (5 classes), a linear head on the L2-normalised fc7 embedding the demo's
loss sees (logits / TEMPERATURE), cross-entropy, and the demo's solver: SGD with model.optimizer's
lr, momentum and weight decay, biases at lr x bias_lr_mult without decay, 2 x data.batch_size
windows a step (the demo's patches a step: 32 pairs), flipped with data.flip_p. Snapshots at each
of --steps (20: the demo's budget; 200: ten times it): every one of --seeds' initialisations
(seed 0 draws the demo's own) to the first, --long-seeds on to the last; --lr-scales other than 1
train the long seeds at that multiple of the demo's lr as well. A step is ~0.3 s on 2 idle cores
(experiment=cpu's figure); scoring a network on the test world ~1-2 min.

Then on the demo's **test world** (callbacks.demo_check.test_world, built and cached as the
DemoCheck builds it), with vidrep.demo.check's functions: hard-protocol retrieval (fc7) and the
shape probe (logistic regression on frozen fc7, the first half of the test videos' objects fit,
the other half scored) for each labels-trained snapshot, the initialisation of each seed,
colour_histogram and pixels. Each labels-trained network is compared pair by pair with its own
seed's initialisation (wins / losses, sign test). Two further columns: the trained head itself on
all the test world's windows (does what labels training learned transfer to new videos?) and the
share of fc7 units zero on every test window (vidrep.eval.monitor.dead_share).

If labels training lifts the probe far above the initialisation, the probe can show learning and
the self-supervised signal is what is missing; if it does not, the network and budget are the limit.
Tables are printed and written to --out (demo_labels.md, demo_labels.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _table import markdown_table  # noqa: E402

# The scale of the head's logits: the demo's losses see cosine similarities in [-1, 1]; dividing by
# InfoNCE's temperature (vidrep/conf/model/loss/infonce.yaml) gives the cross-entropy a trunk gradient
# of the same order as the demo's losses give, at the demo's lr.
TEMPERATURE = 0.1
NUM_CLASSES = 5  # vidrep.data.synthetic.SHAPES


def compose(overrides: list[str]):
    """The demo's training config, as train.py composes it (data=demo, experiment=cpu)."""
    from vidrep.common.preflight import compose as compose_config

    return compose_config("train", ["data=demo", "logger=none", *overrides])


def resize(windows: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, S, S, 3] -> [N, 3, size, size], resized as the check's featurizer resizes them."""
    out = np.stack([cv2.resize(w, (size, size), interpolation=cv2.INTER_AREA) for w in windows])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def parameter_groups(modules: list[nn.Module], bias_lr_mult: float, bias_weight_decay: float, lr: float):
    """The released solver's groups (vidrep.training.module.TripletModule.configure_optimizers):
    weights with the weight decay, biases at lr x bias_lr_mult with bias_weight_decay."""
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not n.endswith("bias")]},
        {
            "params": [p for n, p in named if n.endswith("bias")],
            "lr": lr * bias_lr_mult,
            "weight_decay": bias_weight_decay,
        },
    ]


def train_on_labels(
    trunk: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    steps: list[int],
    cfg,
    seed: int,
    lr_scale: float = 1.0,
) -> tuple[dict[int, nn.Module], dict[int, nn.Linear], list[dict]]:
    """Train `trunk` (a copy) and a linear head on its L2-normalised output to name `labels` from
    `images` (uint8 [N, 3, S, S]) under the demo's solver and batch (module doc); snapshots of trunk
    and head at each of `steps`, and a log of (step, loss, accuracy) every 10 steps."""
    import hydra

    torch.manual_seed(seed)
    trunk = copy.deepcopy(trunk).train()
    head = nn.Linear(trunk.out_dim, NUM_CLASSES)
    lr = float(cfg.model.optimizer.lr) * lr_scale
    optimizer = hydra.utils.instantiate(cfg.model.optimizer, lr=lr)(
        parameter_groups([trunk, head], float(cfg.model.bias_lr_mult), float(cfg.model.bias_weight_decay), lr)
    )
    mean = torch.tensor(list(cfg.model.pixel_mean), dtype=torch.float32).view(1, 3, 1, 1)
    batch, flip_p = 2 * int(cfg.data.batch_size), float(cfg.data.flip_p)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(len(images)), 0
    snapshots, heads, log = {}, {}, []
    for step in range(1, max(steps) + 1):
        if at + batch > len(order):  # epochs of the windows in a new order, as a shuffling loader deals them
            order, at = rng.permutation(len(images)), 0
        idx = torch.from_numpy(order[at : at + batch])
        at += batch
        x = images[idx].float() - mean
        flip = torch.from_numpy(rng.random(len(idx)) < flip_p)
        x[flip] = x[flip].flip(-1)
        logits = head(F.normalize(trunk(x), dim=1)) / TEMPERATURE
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 1:
            acc = float((logits.argmax(1) == labels[idx]).float().mean())
            log.append({"step": step, "loss": loss.item(), "accuracy": acc})
            print(f"  seed {seed} step {step}: loss {loss.item():.3f}, batch accuracy {acc:.2f}", flush=True)
        if step in steps:
            snapshots[step] = copy.deepcopy(trunk).eval()
            heads[step] = copy.deepcopy(head).eval()
    return snapshots, heads, log


@torch.no_grad()
def head_accuracy(trunk: nn.Module, head: nn.Linear, images: np.ndarray, labels: np.ndarray, mean, bs: int) -> float:
    """The labels-trained classifier itself on `images` (uint8 [N, 3, S, S])."""
    mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    predicted = [
        head(F.normalize(trunk(torch.from_numpy(images[i : i + bs]).float() - mean), dim=1)).argmax(1)
        for i in range(0, len(images), bs)
    ]
    return float((torch.cat(predicted).numpy() == labels).mean())


def mean_sd(values) -> str:
    """Mean +- sd over seeds, in %; a single seed's figure alone."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} +- {100 * np.std(values):.1f}"


def variant_name(step: int, lr_scale: float) -> str:
    return f"{step} steps" + ("" if lr_scale == 1 else f", lr x{lr_scale:g}")


def tables(report: dict) -> str:
    """The summary (seed means +- sd) and the per-seed table, Markdown."""
    rows = []
    per_seed = report["per_seed"]
    for variant in report["variants"]:
        runs = [s[variant] for s in per_seed if variant in s]
        rows.append(
            [
                f"trained with labels, {variant} ({len(runs)} seed{'s' * (len(runs) > 1)})",
                mean_sd([r["retrieval"]["recall_at_1"] for r in runs]),
                mean_sd([r["retrieval"]["recall_at_5"] for r in runs]),
                f"{np.mean([r['retrieval']['median_rank'] for r in runs]):g}",
                "; ".join(f"{r['vs_init']['wins']} / {r['vs_init']['losses']} ({r['vs_init']['p']:.2g})" for r in runs),
                mean_sd([r["probe"]["accuracy"] for r in runs]),
                mean_sd([r["head_accuracy"] for r in runs]),
                mean_sd([r["dead_fc7"] for r in runs]),
            ]
        )
    inits = [s["initialisation"] for s in per_seed]
    rows.append(
        [
            f"initialisation ({len(inits)} seeds)",
            mean_sd([r["retrieval"]["recall_at_1"] for r in inits]),
            mean_sd([r["retrieval"]["recall_at_5"] for r in inits]),
            f"{np.mean([r['retrieval']['median_rank'] for r in inits]):g}",
            "",
            mean_sd([r["probe"]["accuracy"] for r in inits]),
            "",
            mean_sd([r["dead_fc7"] for r in inits]),
        ]
    )
    for name, r in report["others"].items():
        cmp = r["vs_init"]
        rows.append(
            [
                name,
                f"{100 * r['retrieval']['recall_at_1']:.1f}",
                f"{100 * r['retrieval']['recall_at_5']:.1f}",
                f"{r['retrieval']['median_rank']:g}",
                f"{cmp['wins']} / {cmp['losses']} ({cmp['p']:.2g})",
                f"{100 * r['probe']['accuracy']:.1f}",
                "",
                "" if r.get("dead_fc7") is None else f"{100 * r['dead_fc7']:.1f}",
            ]
        )
    header = [
        "features (fc7)",
        "hard R@1 (%)",
        "R@5 (%)",
        "median rank",
        "vs its seed's init: wins / losses (p)",
        "shape probe (%)",
        "its head on the test world (%)",
        "dead fc7 (%)",
    ]
    seeds = ", ".join(str(s["seed"]) for s in per_seed)
    w = report["world"]
    text = [
        f"Test world: {w['pairs']} pairs of {w['videos']} videos (hard protocol, {w['candidates_mean']:.0f} candidates "
        f"a query); probe {w['probe_train']} / {w['probe_test']} objects; labels training on {w['train_windows']} "
        f"windows of the training world. Seeds {seeds}: mean +- sd; wins / losses per seed, against the "
        "initialisation of the same seed (colour_histogram, pixels and --checkpoint: against seed "
        f"{per_seed[0]['seed']}'s).",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(text)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="initialisations (0: the demo's own)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 200], help="snapshots scored (the first: every seed)")
    p.add_argument("--long-seeds", type=int, nargs="+", default=[0], help="the seeds trained on to the last of --steps")
    p.add_argument(
        "--lr-scales", type=float, nargs="+", default=[1.0], help="multiples of the demo's lr (not 1: long seeds only)"
    )
    p.add_argument("--checkpoint", help="a demo run's checkpoint, scored beside them (e.g. its last.ckpt)")
    p.add_argument("--override", nargs="*", default=[], help="train.py config overrides (key=value)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo_labels")
    p.add_argument("--batch-size", type=int, default=64, help="feature extraction batch")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from omegaconf import OmegaConf

    from vidrep.common.io import write_bytes, write_json
    from vidrep.data.corpus import PairIndex
    from vidrep.demo.check import (
        batched_features,
        build_test_world,
        compare_retrieval,
        object_windows,
        probe_split,
        trunk_featurizers,
    )
    from vidrep.eval.features import load_network
    from vidrep.eval.monitor import dead_share
    from vidrep.eval.probe import probe_accuracy
    from vidrep.eval.retrieval import RetrievalSettings, compare_pairs
    from vidrep.models.trunk import build_trunk

    start = time.perf_counter()
    cfg = compose(args.override)
    steps = sorted(set(args.steps))
    size, mean = int(cfg.model.input_size), list(cfg.model.pixel_mean)
    check = cfg.callbacks.demo_check
    world = OmegaConf.to_container(check.test_world, resolve=True)
    retrieval = check.get("retrieval")
    settings = RetrievalSettings(**(OmegaConf.to_container(retrieval, resolve=True) if retrieval else {}))
    root = build_test_world(
        world["root"], world["num_videos"], world["num_frames"], world["seed"], dict(world["world"] or {}), settings
    )
    train_world = OmegaConf.to_container(cfg.data.demo, resolve=True)  # a demo.json's fields
    print(f"rendering the training world's object windows ({train_world['num_videos']} videos)", flush=True)
    train_windows, train_labels, _ = object_windows(train_world)
    train_images = resize(train_windows, size)
    del train_windows
    test_windows, test_labels, test_seeds = object_windows(json.loads((root / "demo.json").read_text()))
    test_images = resize(test_windows, size)

    trunk_config = OmegaConf.to_container(cfg.model.net.trunk, resolve=True)
    trunks, heads, logs = {}, {}, {}
    variants = {}  # {name: (seeds, lr scale)}: every seed to the first step at the demo lr, the long seeds on
    for scale in args.lr_scales:
        for step in steps:
            if step != steps[0] or scale != 1:
                variants[variant_name(step, scale)] = (args.long_seeds, scale)
            else:
                variants[variant_name(step, scale)] = (args.seeds, scale)
    for seed in args.seeds:
        torch.manual_seed(seed)  # as train.py's seed_everything(seed) before instantiating the model
        initial = build_trunk(trunk_config).eval()
        trunks[f"initialisation {seed}"] = initial
        for scale in args.lr_scales:
            runs = [t for t in steps if seed in variants[variant_name(t, scale)][0]]
            if not runs:
                continue
            print(f"training seed {seed} with labels for {runs[-1]} steps at lr x{scale:g}", flush=True)
            snaps, snap_heads, logs[f"{seed} x{scale:g}"] = train_on_labels(
                initial, train_images, train_labels, runs, cfg, seed, scale
            )
            for step in runs:
                trunks[f"{variant_name(step, scale)} seed {seed}"] = snaps[step]
                heads[f"{variant_name(step, scale)} seed {seed}"] = snap_heads[step]
    if args.checkpoint:
        trunks["demo checkpoint"] = load_network(args.checkpoint).trunk.eval()
    train_s = time.perf_counter() - start

    print(f"scoring {len(trunks)} networks on the test world at {root}", flush=True)
    featurizers = trunk_featurizers(trunks, size, mean, "fc7")
    index = PairIndex(root)
    reference = f"initialisation {args.seeds[0]}"
    metrics, ranks = compare_retrieval(
        index, np.arange(len(index)), featurizers, settings, reference=reference, batch_size=args.batch_size
    )
    fit = probe_split(test_seeds)
    probe, dead = {}, {}
    for name, f in featurizers.items():
        x = batched_features(f, test_windows, args.batch_size)
        probe[name] = probe_accuracy(x[fit], test_labels[fit], x[~fit], test_labels[~fit])
        dead[name] = dead_share(x) if name in trunks else None

    def entry(name: str, init: str) -> dict:
        return {"retrieval": metrics[name], "probe": probe[name], "dead_fc7": dead[name]} | {
            "vs_init": compare_pairs(ranks[name], ranks[init])
        }

    per_seed = []
    for seed in args.seeds:
        init = f"initialisation {seed}"
        row = {"seed": seed, "initialisation": entry(init, init)}
        row["training_logs"] = {k.split(" ", 1)[1]: v for k, v in logs.items() if k.split(" ")[0] == str(seed)}
        for variant in variants:
            name = f"{variant} seed {seed}"
            if name in trunks:
                acc = head_accuracy(trunks[name], heads[name], test_images, test_labels, mean, args.batch_size)
                row[variant] = entry(name, init) | {"head_accuracy": acc}
        per_seed.append(row)
    others = {n: entry(n, reference) for n in featurizers if n not in trunks or n == "demo checkpoint"}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/demo_labels.py", *sys.argv[1:]]),
        "variants": {
            v: {"seeds": list(seeds), "lr": float(cfg.model.optimizer.lr) * scale}
            for v, (seeds, scale) in variants.items()
        },
        "temperature": TEMPERATURE,
        "retrieval_settings": settings.to_dict(),
        "world": {
            "test_world": str(root),
            "pairs": int(metrics[reference]["num_pairs"]),
            "videos": int(metrics[reference]["num_videos"]),
            "candidates_mean": float(metrics[reference]["num_candidates_mean"]),
            "probe_train": int(fit.sum()),
            "probe_test": int((~fit).sum()),
            "train_windows": len(train_labels),
        },
        "per_seed": per_seed,
        "others": others,
        "seconds": {"train": train_s, "total": time.perf_counter() - start},
    }
    text = tables(report)
    took = report["seconds"]
    text += f"\n\n{report['date']}, `{report['command']}`: {took['total']:.0f} s ({took['train']:.0f} s training)."
    print("\n" + text)
    write_bytes(args.out / "demo_labels.md", (text + "\n").encode())
    write_json(args.out / "demo_labels.json", report)


if __name__ == "__main__":
    main()
