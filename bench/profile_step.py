"""Where one training step's time goes on a GPU: the paper's model in a bare PyTorch loop.

    python bench/profile_step.py                      # on a GPU machine; ~30 s on one H200
    python bench/profile_step.py --device cpu --pairs 2 --steps 1 --warmup 1 --top 5   # a smoke run

For each batch size (pairs): the forward pass alone, forward + ranking loss, and the whole step
(+ backward + SGD), each timed over `--steps` steps after `--warmup`, with no Lightning and no
loader, so the rates are the network's ceiling on this device; then torch.profiler's top operators
and kernels of `--profile-steps` whole steps by device time. bf16 autocast, as
`trainer.precision=bf16-mixed`; `--channels-last` as `model.channels_last=true`.
"""

from __future__ import annotations

import argparse
import time

import torch
from _table import markdown_table
from train_step import build_module


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--pairs", type=int, nargs="+", default=[50, 256])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15, help="rows of the profiler's table")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    if min(args.steps, args.profile_steps) < 1:
        p.error("--steps and --profile-steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu for a smoke run")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True
    module = build_module(args.input_size).to(device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    rows, tables = [], []
    for pairs in args.pairs:
        g = torch.Generator().manual_seed(0)
        patches = torch.randint(
            0, 256, (2 * pairs, 3, args.input_size, args.input_size), generator=g, dtype=torch.uint8
        ).to(device)
        if args.channels_last:
            patches = patches.contiguous(memory_format=torch.channels_last)
        video_id = torch.arange(pairs, device=device)

        def step(upto: str) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                embeddings = module(patches).float()
            if upto == "forward":
                return
            loss, _ = module.loss(embeddings[:pairs], embeddings[pairs:], video_id, hard_ratio=1.0)
            if upto == "loss":
                return
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        times = {}
        for upto in ("forward", "loss", "step"):
            for _ in range(args.warmup):
                step(upto)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(upto)
            sync()
            times[upto] = (time.perf_counter() - start) / args.steps
        rows.append([str(2 * pairs)] + [f"{1e3 * t:.1f} ms ({2 * pairs / t:,.0f}/s)" for t in times.values()])
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step("step")
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables.append(
            f"{2 * pairs} patches per batch, {args.profile_steps} whole steps, by {sort}:\n"
            + prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60)
        )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}, bf16 autocast, {args.input_size}x{args.input_size}, channels_last={args.channels_last}, "
        f"torch {torch.__version__}; time per step (patches/s)"
    )
    print(markdown_table(["patches per batch", "forward", "forward + loss", "whole step (+ backward, SGD)"], rows))
    for table in tables:
        print("\n" + table)


if __name__ == "__main__":
    main()
