"""Training throughput of DER++ steps on seq-cifar10 shapes (ResNet-18, batch 32 + 2 x 32 replayed).

Prints the command, the device and samples/s. Synthetic uint8 images of CIFAR shape are used so the
step is timed without any dataset; the step is exactly the engine's (device augmentation of the
current batch, DER++ observe with two buffer draws and augmentation, reservoir insert).

    python benchmarks/throughput.py --device cpu --steps 20
    python benchmarks/throughput.py --device cuda --steps 500 [--amp] [--channels-last] [--fused]

The full seq-cifar10 protocol is a normal run; its wall time is in its result.json:

    sparsecl run --preset seq-cifar10-der++-500 --benchmark seq-cifar10-jpeg --data-dir DATA --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from sparsecl.config import merge_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import AugmentSpec, Split, Task, TaskStream
from sparsecl.engine.graph import CapturedStep
from sparsecl.engine.trainer import build_run, describe_device, resolve_device
from sparsecl.methods import Batch


def synthetic_cifar10(n_per_task: int) -> TaskStream:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(5):
        x = torch.randint(0, 256, (n_per_task, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(2 * t, 2 * t + 2, (n_per_task,), generator=g)
        tasks.append(Task(t, [2 * t, 2 * t + 1], Split(x, y), Split(x[:64], y[:64])))
    aug = AugmentSpec(crop_padding=4, hflip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2615))
    return TaskStream("synthetic-cifar10", tasks, (3, 32, 32), 10, aug, "resnet18", [str(i) for i in range(10)], list(range(10)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--nf", type=int, default=64)
    ap.add_argument("--fused", action="store_true", help="DER++ fused forward (one pass over 3 x batch)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true", help="replay the whole step from a CUDA graph")
    args = ap.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    stream = synthetic_cifar10(n_per_task=max(args.buffer, args.batch_size * 4)).to(device)
    cfg = merge_config({"method": "der++", "benchmark": "seq-cifar10", "batch_size": args.batch_size,
                        "backbone_options": {"nf": args.nf}, "device": str(device),
                        "method_options": {"lr": 0.03, "buffer_size": args.buffer, "alpha": 0.2, "beta": 0.5,
                                           "fused_forward": args.fused}, "cuda_graph": args.cuda_graph})
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    augment = DeviceAugment(stream.augment, stream.input_shape, memory_format=fmt).prepare(device)
    parts = build_run(cfg, stream, device, augment)
    method = parts.method
    if args.channels_last:
        method.model.to(memory_format=torch.channels_last)
    task = stream.tasks[0]
    method.begin_task(task)
    n = len(task.train)
    bs = args.batch_size
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    counter = parts.counter
    counter.active = True
    loss_sum = torch.zeros((), device=device)

    def run_step(idx: torch.Tensor) -> torch.Tensor:  # what the engine's Trainer._step does
        x_raw, y = task.train.x[idx], task.train.y[idx]
        with amp:
            return method.observe(Batch(augment.train(x_raw), y, x_raw, idx, 0))

    def indices(i: int) -> torch.Tensor:
        start = i * bs % (n - bs)
        return torch.arange(start, start + bs, device=device)

    # Fill the buffer first so every timed step replays (the steady state of the protocol).
    i = 0
    while len(method.buffer) < min(args.buffer, n) or i < args.warmup:
        loss_sum += run_step(indices(i))
        i += 1
    graph = None
    if args.cuda_graph:
        torch.cuda.synchronize()
        graph = CapturedStep(run_step, loss_sum, counter, method)
        graph.capture(indices(i))
        i += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(args.steps):
        if graph is not None:
            graph.replay(indices(i + k))
        else:
            loss_sum += run_step(indices(i + k))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    per_step = dt / args.steps
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print(f"options: fused={args.fused} amp={args.amp} channels_last={args.channels_last} "
          f"cuda_graph={args.cuda_graph} nf={args.nf}; mean loss {loss_sum.item() / (i + args.steps):.3f}")
    print(f"DER++ step (batch {bs} + 2 x {bs} replayed): {per_step * 1e3:.2f} ms/step, "
          f"{bs / per_step:.0f} stream samples/s, {3 * bs / per_step:.0f} trained samples/s")
    steps_protocol = 5 * 50 * -(-10000 // bs)
    print(f"projected seq-cifar10 protocol training time (5 tasks x 50 epochs x {-(-10000 // bs)} steps): "
          f"{steps_protocol * per_step / 60:.1f} min")


if __name__ == "__main__":
    main()
