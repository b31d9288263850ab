"""CUDA-only checks of the speed options (skipped on machines without a GPU; run on the GPU box)."""
import copy

import pytest
import torch

from sparsecl.config import merge_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import AugmentSpec, Split, Task, TaskStream
from sparsecl.engine.graph import CapturedStep
from sparsecl.engine.trainer import SampleCounter, build_run, run
from sparsecl.methods import Batch
from sparsecl.sparse.flops import FlopCounter, profile_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _stream(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    tasks = [Task(0, [0, 1], Split(x, y), Split(x[:32], y[:32])), Task(1, [2, 3], Split(x, y + 2), Split(x[:32], y[:32] + 2))]
    # No random augmentation: the step's only randomness is the buffer draw order.
    return TaskStream("t", tasks, (3, 32, 32), 4, AugmentSpec(mean=(0.5,), std=(0.25,)), "resnet18", list("abcd"), [0, 1, 2, 3])


@pytest.mark.parametrize("amp", [False, True])
def test_graph_replayed_step_equals_eager_step(amp):
    torch.manual_seed(0)
    stream = _stream().to("cuda")
    cfg = merge_config({"method": "der++", "benchmark": "digits", "batch_size": 16, "cuda_graph": True, "device": "cuda",
                        "backbone_options": {"nf": 8},
                        "method_options": {"lr": 0.1, "buffer_size": 16, "minibatch_size": 16, "alpha": 0.3, "beta": 0.5}})
    aug = DeviceAugment(stream.augment, stream.input_shape).prepare("cuda")
    method = build_run(cfg, stream, torch.device("cuda"), aug).method
    method.begin_task(stream.tasks[0])
    split = stream.tasks[0].train
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)

    def step(idx):
        with autocast:
            return method.observe(Batch(aug.train(split.x[idx]), split.y[idx], split.x[idx], idx, 0))

    for i in range(4):  # fill the buffer (capacity == minibatch: the draw order does not change the loss)
        step(torch.arange(16 * i, 16 * i + 16, device="cuda"))
    torch.cuda.synchronize()
    saved = copy.deepcopy(method.model.state_dict())
    saved_buffer = copy.deepcopy(method.buffer.state_dict())
    idx = torch.arange(100, 116, device="cuda")
    step(idx)
    eager = copy.deepcopy(method.model.state_dict())
    method.model.load_state_dict(saved)
    method.buffer.load_state_dict(saved_buffer)  # the eager step's reservoir insert changed it
    method.optimizer = method.make_optimizer()
    counter = SampleCounter(method.model, FlopCounter(profile_layers(method.model, stream.input_shape)))
    counter.active = True
    graph = CapturedStep(step, torch.zeros((), device="cuda"), counter, method)
    graph.capture(idx)
    torch.cuda.synchronize()
    # cuDNN convolutions run in TF32 by default and the replay may pick other kernels and sum the
    # permuted buffer rows in another order, so "equal" means equal to TF32 (or bf16) precision.
    tol = 2e-2 if amp else 2e-3
    for k, v in eager.items():
        if v.is_floating_point():
            assert torch.allclose(method.model.state_dict()[k], v, atol=tol, rtol=tol), k
    assert counter.train_samples == 48  # current batch + 2 buffer minibatches, counted on capture
    seen = method.buffer.seen
    graph.replay(torch.arange(120, 136, device="cuda"))
    assert counter.train_samples == 96 and method.buffer.seen == seen + 16


def test_cuda_graph_run_counts_like_eager_and_learns(tmp_path):
    base = {"method": "der++", "benchmark": "digits", "epochs": 3, "batch_size": 16, "device": "cuda", "seed": 0,
            "method_options": {"lr": 0.05, "buffer_size": 64, "minibatch_size": 16, "alpha": 0.3, "beta": 0.5}}
    eager, _ = run(merge_config(base), tmp_path / "eager")
    graphed, _ = run(merge_config({**base, "cuda_graph": True}), tmp_path / "graph")
    assert graphed["samples"] == eager["samples"]
    assert graphed["flops"]["train"] == eager["flops"]["train"]
    assert abs(graphed["accuracy"]["class_il"]["acc"] - eager["accuracy"]["class_il"]["acc"]) < 10
    assert graphed["accuracy"]["class_il"]["acc"] > 60


def test_amp_and_channels_last_run(tmp_path):
    base = {"method": "er", "benchmark": "digits", "epochs": 2, "batch_size": 16, "device": "cuda",
            "amp": True, "channels_last": True, "cuda_graph": True, "method_options": {"lr": 0.05, "buffer_size": 64}}
    r, _ = run(merge_config(base), tmp_path / "r")
    assert r["complete"] and r["accuracy"]["class_il"]["acc"] > 40


def test_inductor_compiled_fused_run_counts_like_eager(tmp_path):
    """The CUDA path of --compile (inductor code generation) with fused Adam and bf16 autocast."""
    base = {"method": "der++", "benchmark": "digits", "epochs": 2, "batch_size": 16, "device": "cuda", "seed": 0,
            "amp": True, "method_options": {"lr": 1e-3, "optimizer": "adam", "buffer_size": 64, "minibatch_size": 16}}
    eager, _ = run(merge_config(base), tmp_path / "eager")
    compiled, _ = run(merge_config({**base, "compile": "inductor", "fused_optimizer": True}), tmp_path / "compiled")
    assert compiled["samples"] == eager["samples"]
    assert compiled["flops"]["train"] == eager["flops"]["train"]
    assert abs(compiled["accuracy"]["class_il"]["acc"] - eager["accuracy"]["class_il"]["acc"]) < 5


def test_reduce_overhead_compile_of_sparcl_counts_like_eager(tmp_path):
    """SparCL cannot be captured by --cuda-graph; inductor's reduce-overhead mode is its way to the
    same launch savings. Same counts and mask density as eager, accuracy within noise."""
    base = {"method": "sparcl-der++", "benchmark": "digits", "epochs": 2, "batch_size": 16, "device": "cuda", "seed": 0,
            "method_options": {"lr": 0.05, "buffer_size": 64, "minibatch_size": 16, "sparsity": 0.75, "delta_k": 0.5,
                               "ddr_cutoff": 2}}
    eager, _ = run(merge_config(base), tmp_path / "eager")
    compiled, _ = run(merge_config({**base, "compile": "inductor:reduce-overhead"}), tmp_path / "compiled")
    assert compiled["samples"] == eager["samples"]
    assert compiled["flops"]["train"] == eager["flops"]["train"]
    assert compiled["sparsity"]["overall"]["density"] == eager["sparsity"]["overall"]["density"]
    assert abs(compiled["accuracy"]["class_il"]["acc"] - eager["accuracy"]["class_il"]["acc"]) < 5


def test_channels_last_steps_equal_contiguous_ones():
    """--channels-last changes the layout, not the training: 8 DER++ steps of a ResNet-18 (nf 8,
    BatchNorm, strided 1x1 shortcuts) give the contiguous run's weights to TF32 precision."""
    stream = _stream(64).to("cuda")
    x, y = stream.tasks[0].train.x, stream.tasks[0].train.y
    states = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        cfg = merge_config({"method": "der++", "benchmark": "digits", "device": "cuda", "backbone_options": {"nf": 8},
                            "channels_last": fmt is torch.channels_last,
                            "method_options": {"lr": 0.05, "buffer_size": 16, "minibatch_size": 8}})
        aug = DeviceAugment(stream.augment, stream.input_shape, memory_format=fmt)
        method = build_run(cfg, stream, torch.device("cuda"), aug).method
        method.model.to(memory_format=fmt)
        method.begin_task(stream.tasks[0])
        for b in range(8):
            idx = torch.arange(8 * b, 8 * b + 8, device="cuda")
            method.observe(Batch(aug.train(x[idx]), y[idx], x[idx], idx, 0))
        states[fmt] = copy.deepcopy(method.model.state_dict())
    for k, v in states[torch.contiguous_format].items():
        if v.is_floating_point():
            assert torch.allclose(states[torch.channels_last][k], v, atol=2e-3, rtol=2e-3), k
