"""Sparse CPU kernels against the best dense oneDNN convolution (SPEC "Real sparse execution on the CPU").

    python benchmarks/sparse_cpu.py layers [--nf 20 64] [--batch 32 96] [--sparsity 0.75 0.9 0.95]
                                           [--threads 1] [--clock cpu] [--repeats 7] [--forward-only]
                                           [--json out.json]

``layers``: forward + backward (input gradient and weight gradient) of each 3x3 convolution inside
ResNet-18's BasicBlocks (the layers SparCL's residual-3x3 policy masks), dense best of NCHW and
channels_last against the sparse kernels (weight gradient at the mask only) on a random unstructured
mask (``--forward-only``: the inference forward alone, where a batch below 16 runs vectorised along
the output row). Runs are interleaved (A B B A ...); the table gives medians, the spread (max/min - 1 over
repeats) and the speed-up, per layer and over all 16 block convs weighted by count. On a shared
machine quote ratios only, and prefer ``--threads 1 --clock cpu`` (process CPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecl.sparse.kernels import SparseConvIndex, load_extension, sparse_conv2d
from sparsecl.sparse.masks import random_mask

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def resnet18_block_convs(nf: int) -> list[tuple[str, int, int, int, int, int]]:
    """(name, C, OC, input H, stride, count) of the 3x3 convs inside the reduced ResNet-18's blocks."""
    return [
        ("layer1", nf, nf, 32, 1, 4),
        ("layer2.0.conv1", nf, 2 * nf, 32, 2, 1),
        ("layer2", 2 * nf, 2 * nf, 16, 1, 3),
        ("layer3.0.conv1", 2 * nf, 4 * nf, 16, 2, 1),
        ("layer3", 4 * nf, 4 * nf, 8, 1, 3),
        ("layer4.0.conv1", 4 * nf, 8 * nf, 8, 2, 1),
        ("layer4", 8 * nf, 8 * nf, 4, 1, 3),
    ]


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float],
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin with the order reversed every other round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def layer_fns(C: int, OC: int, H: int, stride: int, N: int, sparsity: float, gen: torch.Generator,
              forward_only: bool = False):
    """The three closures (dense NCHW, dense channels_last, sparse) of one layer: forward + backward,
    or with ``forward_only`` the inference forward under ``torch.no_grad``."""
    shape = (OC, C, 3, 3)
    mask = random_mask(shape, round((1 - sparsity) * OC * C * 9), generator=gen)
    w = (torch.randn(shape, generator=gen) * mask).requires_grad_()
    x = torch.randn(N, C, H, H, generator=gen).requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    gy = torch.randn(N, OC, (H - 1) // stride + 1, (H - 1) // stride + 1, generator=gen)
    gy_cl = gy.to(memory_format=torch.channels_last)
    index = SparseConvIndex(mask, stride=stride, padding=1)
    xb = x.detach().permute(1, 2, 3, 0).contiguous().requires_grad_()
    gyb = gy.permute(1, 2, 3, 0).contiguous()

    def dense(xx, gg):
        def step():
            F.conv2d(xx, w, stride=stride, padding=1).backward(gg)
            xx.grad = w.grad = None
        return step

    def sparse():
        sparse_conv2d(xb, w, index).backward(gyb)
        xb.grad = w.grad = None

    if forward_only:
        return {"nchw": torch.no_grad()(lambda: F.conv2d(x, w, stride=stride, padding=1)),
                "channels_last": torch.no_grad()(lambda: F.conv2d(x_cl, w, stride=stride, padding=1)),
                "sparse": torch.no_grad()(lambda: sparse_conv2d(xb, w, index))}
    return {"nchw": dense(x, gy), "channels_last": dense(x_cl, gy_cl), "sparse": sparse}


def run_layers(args: argparse.Namespace) -> list[dict]:
    load_extension()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for nf in args.nf:
        for N in args.batch:
            for sp in args.sparsity:
                tot = {"dense": 0.0, "sparse": 0.0}
                for name, C, OC, H, s, count in resnet18_block_convs(nf):
                    times = interleaved(layer_fns(C, OC, H, s, N, sp, gen, args.forward_only), args.repeats, clock)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    best = min(("nchw", "channels_last"), key=med.get)
                    spread = {k: max(v) / min(v) - 1 for k, v in times.items()}
                    row = dict(nf=nf, N=N, sparsity=sp, layer=name, count=count, dense_best=best,
                               dense_ms=1e3 * med[best], sparse_ms=1e3 * med["sparse"],
                               dense_spread=spread[best], sparse_spread=spread["sparse"],
                               speedup=med[best] / med["sparse"])
                    rows.append(row)
                    tot["dense"] += count * med[best]
                    tot["sparse"] += count * med["sparse"]
                    print(f"nf {nf:3d} N {N:3d} s {sp:.2f} {name:15s} x{count} dense({best[:4]}) {row['dense_ms']:8.2f} ms "
                          f"±{100 * row['dense_spread']:3.0f}%  sparse {row['sparse_ms']:8.2f} ms ±{100 * row['sparse_spread']:3.0f}%"
                          f"  {row['speedup']:.2f}x", flush=True)
                rows.append(dict(nf=nf, N=N, sparsity=sp, layer="16 block convs", count=16,
                                 dense_ms=1e3 * tot["dense"], sparse_ms=1e3 * tot["sparse"],
                                 speedup=tot["dense"] / tot["sparse"]))
                print(f"nf {nf:3d} N {N:3d} s {sp:.2f} all 16 block convs: dense {1e3 * tot['dense']:.1f} ms, "
                      f"sparse {1e3 * tot['sparse']:.1f} ms, {tot['dense'] / tot['sparse']:.2f}x", flush=True)
    return rows


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace) -> dict:
    """Threads, clock, CPU and load recorded beside the numbers."""
    return dict(threads=args.threads, clock=args.clock, forward_only=args.forward_only, torch=torch.__version__, cpu=cpu_model(),
                cores=os.cpu_count(), loadavg_start=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layers", help="per-layer fwd+bwd: dense best-of vs sparse kernels")
    lay.add_argument("--nf", type=int, nargs="+", default=[20, 64])
    lay.add_argument("--batch", type=int, nargs="+", default=[32, 96])
    lay.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.90, 0.95])
    lay.add_argument("--threads", type=int, default=1)
    lay.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    lay.add_argument("--repeats", type=int, default=7)
    lay.add_argument("--forward-only", action="store_true", help="inference: the forward alone, under no_grad")
    lay.add_argument("--json", help="write rows and environment to this file")
    args = ap.parse_args(argv)
    env = environment(args)
    print(f"threads {env['threads']}, clock {env['clock']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores), "
          f"load {env['loadavg_start']:.2f}")
    rows = run_layers(args)
    env["loadavg_end"] = os.getloadavg()[0]
    print(f"load average at the end: {env['loadavg_end']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
