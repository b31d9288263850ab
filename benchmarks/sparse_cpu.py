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

    python benchmarks/sparse_cpu.py step [--nf 20 64] [--batch 96] [--sparsity ...] [--chunks 1|3]
    python benchmarks/sparse_cpu.py memory [same options]
    python benchmarks/sparse_cpu.py inference [--nf 20 64] [--batch 1 32] [--sparsity ...]
    python benchmarks/sparse_cpu.py auto [--nf 20 64] [--batch 1 32 96] [--sparsity ...]
    python benchmarks/sparse_cpu.py run --variant NAME=FLAGS [--variant ...] [--repeats 2] [--data-dir DATA]

``step``: a whole DER++-shaped training step (CE on a third of the samples, logit MSE on a third,
CE on the rest; forward, backward, SGD with the mask hooks) of ResNet-18: dense DER++ (best of NCHW
and channels_last) against SparCL-DER++'s masks (``--policy``, uniform) with DGM's gradient mask
(gradient sparsity s + 0.2 (1 - s)) on the kernels through :class:`SparseExecution`, the network
batch-last end to end. ``--chunks 3`` runs three forwards of a third each, as DER++ does unless
``fused_forward``. SparCL's importance gathering (every 64th step) is not in it. ``memory``: peak
resident memory of three such steps, each variant in its own process. ``inference``: eval-mode
forward latency of the same masked network, dense best-of against the kernels. ``auto``: what
``--sparse-kernels auto`` chooses for that network, training and inference, measured afresh. ``run``: whole
``sparsecl run`` invocations, one per ``--variant`` in turn (A B B A ...), their training seconds
from result.json and the median ratio to the first variant.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecl.models import build_model
from sparsecl.sparse.allocation import allocate
from sparsecl.sparse.execution import SparseExecution
from sparsecl.sparse.kernel_choice import KernelChoices
from sparsecl.sparse.kernels import SparseConvIndex, load_extension, sparse_conv2d
from sparsecl.sparse.masks import MaskSet, random_mask, topk_mask
from sparsecl.sparse.policy import MaskPolicy

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


def prepare(args: argparse.Namespace) -> tuple[Callable[[], float], torch.Generator]:
    """Build the kernels, set the thread count; the clock and a seeded generator."""
    load_extension()
    torch.set_num_threads(args.threads)
    return CLOCKS[args.clock], torch.Generator().manual_seed(0)


def run_layers(args: argparse.Namespace) -> list[dict]:
    clock, gen = prepare(args)
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


# ---------------------------------------------------------------------------------------------- step
def masked_resnet(nf: int, sparsity: float, policy: str, gen: torch.Generator, grad_sparsity: float | None):
    """ResNet-18 (10 classes) with uniform random masks over ``policy``'s layers (weights masked)."""
    model = build_model("resnet18", (3, 32, 32), 10, nf=nf)
    names = MaskPolicy(policy, False, False, False).select(model)
    params = dict(model.named_parameters())
    counts = allocate("uniform", {n: tuple(params[n].shape) for n in names}, 1.0 - sparsity)
    masks = MaskSet.from_counts(model, counts, generator=gen)
    masks.apply_()
    if grad_sparsity is not None:  # SparCL's DGM: a gradient mask over the active weights
        for n in names:
            k = round((1.0 - grad_sparsity) * masks.numel(n))
            score = torch.rand(params[n].shape, generator=gen).masked_fill(~masks.masks[n], -1.0)
            masks.set_grad_mask(n, topk_mask(score, k), count=k, push=False)
    return model, masks


def derpp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               z: torch.Tensor, chunks: int) -> Callable[[], None]:
    """One DER++-shaped step: CE on the current third, logit MSE on the second, CE on the last
    (one fused forward of all samples, or ``chunks`` forwards), backward, SGD."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        outs = [model(p) for p in x.chunk(chunks)]
        out = torch.cat(outs) if chunks > 1 else outs[0]
        a, b, c = out.chunk(3)
        ya, _, yc = y.chunk(3)
        loss = F.cross_entropy(a, ya) + 0.2 * F.mse_loss(b, z) + 0.5 * F.cross_entropy(c, yc)
        loss.backward()
        optimizer.step()
    return step


def step_fns(nf: int, N: int, sparsity: float, policy: str, chunks: int, gen: torch.Generator,
             only: str | None = None) -> dict:
    """Dense DER++ (NCHW and channels_last) and SparCL-DER++ on the kernels: one training step each
    (``only``: build just that one)."""
    x = torch.randn(N, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    z = torch.randn(len(torch.arange(N).chunk(3)[1]), 10, generator=gen)  # the logits the middle third matches
    fns = {}
    for layout in ("nchw", "channels_last"):
        if only not in (None, layout):
            continue
        model = build_model("resnet18", (3, 32, 32), 10, nf=nf)
        xx = x
        if layout == "channels_last":
            model, xx = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        fns[layout] = derpp_step(model, torch.optim.SGD(model.parameters(), lr=0.03), xx, y, z, chunks)
    if only not in (None, "sparse"):
        return fns
    model, masks = masked_resnet(nf, sparsity, policy, gen, sparsity + 0.2 * (1.0 - sparsity))
    SparseExecution(model, lambda: masks).install()
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    masks.hook_optimizer(opt)
    fns["sparse"] = derpp_step(model, opt, x, y, z, chunks)
    return fns


def run_steps(args: argparse.Namespace) -> list[dict]:
    clock, gen = prepare(args)
    rows = []
    for nf in args.nf:
        for N in args.batch:
            for sp in args.sparsity:
                times = interleaved(step_fns(nf, N, sp, args.policy, args.chunks, gen), args.repeats, clock, warmup=1)
                rows.append(summarise(times, nf=nf, N=N, sparsity=sp, what="DER++ step"))
    return rows


def summarise(times: dict[str, list[float]], **key) -> dict:
    """Median and spread of dense best-of (NCHW / channels_last) against sparse; prints one line."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min((k for k in med if k != "sparse"), key=med.get)
    spread = {k: max(v) / min(v) - 1 for k, v in times.items()}
    row = dict(key, dense_best=best, dense_ms=1e3 * med[best], sparse_ms=1e3 * med["sparse"],
               dense_spread=spread[best], sparse_spread=spread["sparse"], speedup=med[best] / med["sparse"])
    print(" ".join(f"{k} {v}" for k, v in key.items()) + f": dense({best}) {row['dense_ms']:.1f} ms "
          f"±{100 * row['dense_spread']:.0f}%, sparse {row['sparse_ms']:.1f} ms ±{100 * row['sparse_spread']:.0f}%, "
          f"{row['speedup']:.2f}x", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- inference
def run_inference(args: argparse.Namespace) -> list[dict]:
    """Eval-mode latency of one forward, dense best-of against the sparse kernels, batch 1 and 32."""
    clock, gen = prepare(args)
    rows = []
    for nf in args.nf:
        for sp in args.sparsity:
            dense, masks = masked_resnet(nf, sp, args.policy, gen, None)
            dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
            sparse = copy.deepcopy(dense)
            sparse_masks = MaskSet(sparse, masks.masks)
            SparseExecution(sparse, lambda m=sparse_masks: m).install()
            for m in (sparse, dense, dense_cl):
                m.eval()
            for N in args.batch:
                x = torch.randn(N, 3, 32, 32, generator=gen)
                x_cl = x.to(memory_format=torch.channels_last)
                fns = {"nchw": lambda: dense(x), "channels_last": lambda: dense_cl(x_cl), "sparse": lambda: sparse(x)}
                with torch.inference_mode():
                    times = interleaved(fns, args.repeats, clock)
                rows.append(summarise(times, nf=nf, N=N, sparsity=sp, what="inference"))
    return rows


# ---------------------------------------------------------------------------------------------- auto
def run_auto(args: argparse.Namespace) -> list[dict]:
    """What ``--sparse-kernels auto`` chooses, measured afresh: training (fwd+bwd) and inference (fwd)."""
    _, gen = prepare(args)
    rows = []
    for nf in args.nf:
        for sp in args.sparsity:
            model, masks = masked_resnet(nf, sp, args.policy, gen, None)
            with tempfile.TemporaryDirectory() as tmp:
                choices = KernelChoices(file=Path(tmp) / "choices.json")
                SparseExecution(model, lambda m=masks: m, choices=choices).install()
                for N in args.batch:
                    x = torch.randn(N, 3, 32, 32, generator=gen)
                    for train in (True, False):
                        model.train(train)
                        with torch.set_grad_enabled(train):
                            model(x)
            for key, (dense, sparse) in choices.measured.items():
                rows.append(dict(nf=nf, sparsity=sp, situation=key, dense_s=dense, sparse_s=sparse,
                                 kernels=choices.decisions[key]))
                print(f"nf {nf} s {sp}: {key}: dense {dense * 1e3:.1f} ms, kernels {sparse * 1e3:.1f} ms -> "
                      f"{'kernels' if choices.decisions[key] else 'dense'}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- run
def run_protocol(args: argparse.Namespace) -> list[dict]:
    """Whole runs through ``sparsecl run``: each ``--variant`` in turn (A B B A ...), the training
    seconds from result.json (evaluation excluded) and their median ratio to the first variant."""
    data = args.data_dir or os.environ.get("SPARSECL_DATA")
    if not data:
        raise SystemExit("sparse_cpu.py run: give --data-dir or set $SPARSECL_DATA")
    variants = dict(v.split("=", 1) for v in args.variant)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            run_dir = Path(args.out) / f"{name}-r{r}"
            cmd = [sys.executable, "-m", "sparsecl", "run", *variants[name].split(), "--data-dir", data,
                   "--device", "cpu", "--threads", str(args.threads), "--out", str(run_dir), "--quiet"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            result = json.loads((run_dir / "result.json").read_text())
            seconds[name].append(result["timing"]["train_seconds"])
            print(f"{name} repeat {r}: {seconds[name][-1]:.1f} s training, "
                  f"Class-IL {result['accuracy']['class_il']['acc']:.2f}", flush=True)
    base = statistics.median(seconds[next(iter(variants))])
    rows = [dict(variant=v, flags=variants[v], train_seconds=s, median=statistics.median(s),
                 vs_first=statistics.median(s) / base) for v, s in seconds.items()]
    for row in rows:
        print(f"{row['variant']}: median {row['median']:.1f} s ({row['vs_first']:.2f}x the first)", flush=True)
    return rows


def environment(args: argparse.Namespace) -> dict:
    """Threads, clock, CPU and load recorded beside the numbers."""
    return dict(threads=args.threads, clock=getattr(args, "clock", "wall"), forward_only=getattr(args, "forward_only", False),
                torch=torch.__version__, cpu=cpu_model(), cores=os.cpu_count(), loadavg_start=os.getloadavg()[0])


def peak_memory(args: argparse.Namespace) -> list[dict]:
    """Peak resident memory of ``--steps`` training steps of each variant, each in its own process."""
    rows = []
    for variant in ("nchw", "sparse"):
        for nf in args.nf:
            for N in args.batch:
                for sp in args.sparsity:
                    cmd = [sys.executable, __file__, "step-memory", variant, str(nf), str(N), str(sp), args.policy,
                           str(args.chunks), str(args.threads)]
                    peak = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
                    rows.append(dict(variant=variant, nf=nf, N=N, sparsity=sp, peak_rss_mb=peak / 1024))
                    print(f"{variant} nf {nf} N {N} s {sp}: peak RSS {peak / 1024:.0f} MB", flush=True)
    return rows


def step_memory(variant: str, nf: str, N: str, sp: str, policy: str, chunks: str, threads: str) -> None:
    """Child of :func:`peak_memory`: three steps of one variant, then its peak RSS in KB."""
    torch.set_num_threads(int(threads))
    if variant == "sparse":
        load_extension()
    fns = step_fns(int(nf), int(N), float(sp), policy, int(chunks), torch.Generator().manual_seed(0), only=variant)
    for _ in range(3):
        fns[variant]()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def add_common(p: argparse.ArgumentParser, batch: list[int]) -> None:
    p.add_argument("--nf", type=int, nargs="+", default=[20, 64])
    p.add_argument("--batch", type=int, nargs="+", default=batch)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.90, 0.95])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="write rows and environment to this file")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "step-memory":
        return step_memory(*argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layers", help="per-layer fwd+bwd: dense best-of vs sparse kernels")
    add_common(lay, [32, 96])
    lay.add_argument("--forward-only", action="store_true", help="inference: the forward alone, under no_grad")
    for name, text in (("step", "whole DER++-shaped training step: dense best-of vs SparCL-DER++ on the kernels"),
                       ("memory", "peak RSS of dense and sparse training steps, each in its own process")):
        p = sub.add_parser(name, help=text)
        add_common(p, [96])
        p.add_argument("--policy", default="residual-3x3", help="masked layers (SparCL's: residual-3x3)")
        p.add_argument("--chunks", type=int, default=1, help="forwards per step (3: DER++'s three batches of 32)")
    inf = sub.add_parser("inference", help="eval-mode latency of a masked ResNet-18: dense best-of vs kernels")
    add_common(inf, [1, 32])
    inf.add_argument("--policy", default="residual-3x3")
    au = sub.add_parser("auto", help="what --sparse-kernels auto chooses for a masked ResNet-18, measured afresh")
    add_common(au, [1, 32, 96])
    au.add_argument("--policy", default="residual-3x3")
    rp = sub.add_parser("run", help="whole runs through `sparsecl run`, interleaved; training seconds")
    rp.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                    help="a run: a name and its `sparsecl run` flags, e.g. 'derpp=--preset seq-cifar10-der++-500'")
    rp.add_argument("--data-dir", help="datasets (default: $SPARSECL_DATA)")
    rp.add_argument("--out", default="runs/sparse-cpu-runs")
    rp.add_argument("--threads", type=int, default=1)
    rp.add_argument("--repeats", type=int, default=2)
    rp.add_argument("--json")
    args = ap.parse_args(argv)
    env = environment(args)
    print(f"threads {env['threads']}, clock {env['clock']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores), "
          f"load {env['loadavg_start']:.2f}", flush=True)
    run = {"layers": run_layers, "step": run_steps, "memory": peak_memory, "inference": run_inference,
           "auto": run_auto, "run": run_protocol}[args.command]
    rows = run(args)
    env["loadavg_end"] = os.getloadavg()[0]
    print(f"load average at the end: {env['loadavg_end']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
