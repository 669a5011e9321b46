"""CaffeNet's equal-output implementation choices (vidrep/models/ops.py), side by side in one run.

    python bench/ops.py                                   # a GPU: bf16 autocast, channels_last, 256 pairs
    python bench/ops.py --device cpu --patches 8 --threads 1 --rounds 7 --steps 2   # bench/README.md's CPU table

Each variant is the whole trunk (CaffeNet at --input-size) with one key changed from the default
(lrn=torch, conv1_in_channels=3, grouped_conv=grouped); timed as forward + backward of --patches
patches, the variants interleaved within each of --rounds rounds (a shared machine's noise hits
them alike), the median per variant reported with its ratio to the default. On a GPU, end-to-end
figures with the loader come from `bench/gpu.py --override model.net.trunk.<key>=<value>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from _table import markdown_table

from vidrep.models import CaffeNet

VARIANTS = {
    "default (lrn=torch, conv1 3 ch, grouped)": {},
    "lrn=slices": {"lrn": "slices"},
    "conv1_in_channels=4": {"conv1_in_channels": 4},
    "grouped_conv=split": {"grouped_conv": "split"},
    "grouped_conv=dense": {"grouped_conv": "dense"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patches", type=int, default=512)
    p.add_argument("--input-size", type=int, default=227)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="timed passes per variant per round (after one untimed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="autocast to bf16; default: on for cuda"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each variant (the first pass compiles)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    channels_last = cuda if args.channels_last is None else args.channels_last
    bf16 = cuda if args.bf16 is None else args.bf16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    x = (torch.randn(args.patches, 3, args.input_size, args.input_size, device=device) * 50).contiguous(
        memory_format=fmt
    )
    nets = {}
    for name, kw in VARIANTS.items():
        net = CaffeNet(input_size=args.input_size, **kw).to(device).to(memory_format=fmt)
        nets[name] = torch.compile(net) if args.compile else net

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(net) -> None:
        with torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext():
            out = net(x)
        out.float().square().mean().backward()

    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, net in nets.items():
            step(net)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(net)
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    what = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{what}, torch {torch.__version__}, {args.patches} patches at {args.input_size}, bf16={bf16}, "
        f"channels_last={channels_last}, compile={args.compile}, median of {args.rounds} rounds x {args.steps} passes"
    )
    base = statistics.median(next(iter(times.values())))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            [
                name,
                f"{1000 * med:.1f}",
                f"{args.patches / med:,.0f}",
                f"{med / base:.3f}",
                f"{1000 * min(ts):.1f}-{1000 * max(ts):.1f}",
            ]
        )
    print(markdown_table(["variant", "fwd+bwd (ms)", "patches/s", "time vs default", "range (ms)"], rows))


if __name__ == "__main__":
    main()
