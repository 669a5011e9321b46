"""What the LightningModule costs per step, and what the loss costs next to the network.

    source /work/venv/bin/activate && cd /work/main && python bench/train_step.py
    python bench/train_step.py --blocks 2 --steps-per-block 3 --warmup 1    # 227 input on 2 CPU cores
    python bench/train_step.py --input-size 99 --blocks 4 --steps-per-block 6  # quicker cross-check

(a) The model of vidrep/conf/model/caffenet.yaml (composed and instantiated by Hydra, as train.py does;
only model.input_size is overridden) trains on one fixed random batch in interleaved blocks:
`lightning.Trainer.fit` with a callback timing on_train_batch_start -> on_train_batch_end, against
a bare loop doing the same work: forward, the loss (`RankingLoss`: `select_negatives` +
`ranking_loss_from_mask` + its stats), backward, optimiser and scheduler step, zero_grad. The batch is already
on the device in both
(Lightning moves it before on_train_batch_start). The first `--warmup` steps of every block are
dropped; the target is a median ratio <= 1.05.
(b) Negative selection + loss (forward and backward on given embeddings) against the network's
forward + backward for the same batch (target <= 2 %); then the loss at `--big-pairs` pairs gathered
from `--ranks` ranks (8 x 200), against the network pass of one rank's own batch (200 pairs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
import torch
from _table import markdown_table
from hydra import compose, initialize_config_dir
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vidrep.training.module import TripletModule
from vidrep.training.ranks import loss_across_ranks

CONF_DIR = Path(__file__).resolve().parents[1] / "vidrep" / "conf"
# The two negative phases of the paper's schedule: random negatives first, then the top K.
PHASES = {"random": 0.0, "hard": 1.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--pairs", type=int, default=50, help="pairs per batch (2x patches)")
    p.add_argument("--blocks", type=int, default=4, help="blocks per variant, interleaved")
    p.add_argument("--steps-per-block", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every block")
    p.add_argument("--net-reps", type=int, default=5, help="timed network forward+backward passes in (b)")
    p.add_argument("--loss-reps", type=int, default=50, help="timed loss passes per network pass in (b)")
    p.add_argument("--big-pairs", type=int, default=1600, help="pairs for the loss-alone row of (b)")
    p.add_argument(
        "--ranks",
        type=int,
        default=8,
        help="--big-pairs are gathered from this many ranks: the share compares the loss with the "
        "network pass of one rank's batch (--big-pairs / --ranks pairs)",
    )
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads; 0 keeps torch's default. 1 on a CPU shared with other jobs: "
        "there 2 threads stall on each other in the loss's small ops and the times scatter 10x",
    )
    return p.parse_args()


def build_module(input_size: int) -> TripletModule:
    # data=corpus: the default data=demo also rewrites model.* (99 input, a smaller head, bias 0).
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=corpus", f"model.input_size={input_size}"])
    return hydra.utils.instantiate(cfg.model)


def fixed_batch(pairs: int, size: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    patches = lambda: torch.randint(0, 256, (pairs, 3, size, size), generator=g, dtype=torch.uint8)  # noqa: E731
    # All video ids distinct: every other patch of the batch is a candidate negative.
    batch = {"anchor": patches(), "positive": patches(), "video_id": torch.arange(pairs, dtype=torch.int64)}
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --- (a) Lightning vs a bare loop ----------------------------------------------------------------


class RepeatBatch(Dataset):
    """The same (CPU) batch `length` times; with batch_size=None the DataLoader yields it as is."""

    def __init__(self, batch: dict[str, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch


class StepTimer(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)


def lightning_block(module: TripletModule, batch: dict[str, Tensor], steps: int, device: torch.device) -> list[float]:
    timer = StepTimer(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    trainer.fit(module, DataLoader(RepeatBatch(cpu_batch, steps), batch_size=None))
    return timer.seconds


def bare_block(module: TripletModule, batch: dict[str, Tensor], steps: int, device: torch.device) -> list[float]:
    # Lightning's teardown moves the module back to the CPU; the optimiser is made afresh, as fit does.
    module.to(device).train()
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    n = batch["anchor"].shape[0]
    hard_ratio = module.negatives_at(0, 0)[0]

    def step() -> None:
        embeddings = module(torch.cat([batch["anchor"], batch["positive"]], dim=0)).float()
        loss, _ = loss_across_ranks(
            module.loss, embeddings[:n], embeddings[n:], batch["video_id"], hard_ratio=hard_ratio
        )
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()  # Lightning steps a per-step scheduler inside the timed window too
        optimizer.zero_grad()

    return [timed(step, device) for _ in range(steps)]


def compare_steps(
    module: TripletModule, batch: dict[str, Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Blocks alternate in ABBA order so that drift (a neighbour's load, clocks) hits both alike."""
    kept: dict[str, list[float]] = {"lightning": [], "bare": []}
    variants = {"lightning": lightning_block, "bare": bare_block}
    for block in range(args.blocks):
        order = ("lightning", "bare") if block % 2 == 0 else ("bare", "lightning")
        for name in order:
            seconds = variants[name](module, batch, args.steps_per_block, device)
            kept[name] += seconds[args.warmup :]
    return kept


# --- (b) the loss next to the network ------------------------------------------------------------


def loss_pass(anchor: Tensor, positive: Tensor, video_ids: Tensor, module: TripletModule, hard_ratio: float) -> None:
    loss, _ = loss_across_ranks(module.loss, anchor, positive, video_ids, hard_ratio=hard_ratio)
    loss.backward()


def random_embeddings(pairs: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    make = lambda: torch.nn.functional.normalize(torch.randn(pairs, dim, device=device), dim=1).requires_grad_()  # noqa: E731
    return make(), make(), torch.arange(pairs, device=device)


def loss_seconds(
    pairs: int, dim: int, module: TripletModule, hard_ratio: float, reps: int, device: torch.device
) -> float:
    anchor, positive, ids = random_embeddings(pairs, dim, device)
    loss_pass(anchor, positive, ids, module, hard_ratio)  # warm-up
    return statistics.median(
        timed(lambda: loss_pass(anchor, positive, ids, module, hard_ratio), device) for _ in range(reps)
    )


def gathered_loss_seconds(
    pairs: int, ranks: int, dim: int, module: TripletModule, hard_ratio: float, reps: int, device: torch.device
) -> float:
    """What one rank computes with model.loss.gather_across_ranks (`vidrep.training.ranks`, less
    the collectives): selection + loss of its own pairs / ranks pairs against all 2 x pairs patches."""
    from vidrep.losses import Candidates

    all_anchor, all_positive, ids = random_embeddings(pairs, dim, device)
    own = pairs // ranks

    def one_pass() -> None:
        candidates = Candidates(torch.cat([all_anchor, all_positive]), torch.cat([ids, ids]))
        loss, _ = module.loss(
            all_anchor[:own], all_positive[:own], ids[:own], hard_ratio=hard_ratio, candidates=candidates
        )
        loss.backward()

    one_pass()
    return statistics.median(timed(one_pass, device) for _ in range(reps))


def net_seconds(module: TripletModule, batch: dict[str, Tensor], device: torch.device) -> float:
    patches = torch.cat([batch["anchor"], batch["positive"]], dim=0)

    def forward_backward() -> None:
        embeddings = module(patches)
        embeddings.backward(torch.ones_like(embeddings))
        module.zero_grad(set_to_none=True)

    return timed(forward_backward, device)


def loss_share(
    module: TripletModule, batch: dict[str, Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Network passes interleaved with loss timings (each a median of `--loss-reps`), per phase."""
    module.to(device).train()
    net_seconds(module, batch, device)  # warm-up
    out: dict[str, list[float]] = {"net": [], **{phase: [] for phase in PHASES}}
    for _ in range(args.net_reps):
        out["net"].append(net_seconds(module, batch, device))
        for phase, ratio in PHASES.items():
            out[phase].append(loss_seconds(args.pairs, module.net.out_dim, module, ratio, args.loss_reps, device))
    return out


# --- the run -------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}" if abs(seconds) < 0.01 else f"{1e3 * seconds:.1f}"


def step_note(seconds: list[float]) -> str:
    return f"{len(seconds)} steps, range {ms(min(seconds))}-{ms(max(seconds))}"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({name}), torch {torch.__version__}, lightning {L.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    L.seed_everything(0, verbose=False)
    module = build_module(args.input_size)
    batch = fixed_batch(args.pairs, args.input_size, device)
    print(
        f"input {args.input_size}, {args.pairs} pairs ({2 * args.pairs} patches), {args.blocks} blocks x "
        f"{args.steps_per_block} steps per variant, first {args.warmup} of each block dropped"
    )

    steps = compare_steps(module, batch, args, device)
    lightning, bare = statistics.median(steps["lightning"]), statistics.median(steps["bare"])
    share = loss_share(module, batch, args, device)
    net = statistics.median(share["net"])
    big = {
        phase: gathered_loss_seconds(args.big_pairs, args.ranks, 1024, module, ratio, args.loss_reps, device)
        for phase, ratio in PHASES.items()
    }
    rank_pairs = args.big_pairs // args.ranks
    rank_batch = fixed_batch(rank_pairs, args.input_size, device)
    rank_net = statistics.median(net_seconds(module, rank_batch, device) for _ in range(args.net_reps))

    rows = [
        ("(a) step, Lightning (ms, median)", ms(lightning), step_note(steps["lightning"])),
        ("(a) step, bare loop (ms, median)", ms(bare), step_note(steps["bare"])),
        ("(a) Lightning / bare", f"{lightning / bare:.3f}", "target <= 1.05"),
        (
            "(a) Lightning - bare (ms)",
            ms(lightning - bare),
            "hooks, `triplet_stats`, 8 `self.log` calls; what a faster device's step would have to absorb",
        ),
        (f"(b) network forward + backward, {args.pairs} pairs (ms)", ms(net), f"median of {args.net_reps}"),
    ]
    for phase in PHASES:
        loss = statistics.median(share[phase])
        rows.append(
            (
                f"(b) selection + loss fwd + bwd, {args.pairs} pairs, {phase} negatives (ms)",
                ms(loss),
                f"{100 * loss / net:.2f} % of the network (target <= 2 %)",
            )
        )
    rows.append(
        (
            f"(b) network forward + backward, {rank_pairs} pairs (one of {args.ranks} ranks) (ms)",
            ms(rank_net),
            f"median of {args.net_reps}",
        )
    )
    for phase, seconds in big.items():
        rows.append(
            (
                f"(b) selection + loss fwd + bwd, {rank_pairs} pairs vs {2 * args.big_pairs} gathered patches, D=1024, "
                f"{phase} negatives (ms)",
                ms(seconds),
                f"{100 * seconds / rank_net:.2f} % of one rank's network pass (target <= 2 %)",
            )
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\n")
    print(markdown_table(("measure", "value", "note"), rows))


if __name__ == "__main__":
    main()
