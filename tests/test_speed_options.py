"""Speed options that also run on CPU (fused optimizers, torch.compile) give the plain loop's
result."""
import copy

import pytest
import torch

from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.engine.trainer import build_run, run
from sparsecl.methods import Batch
from sparsecl.report import collect_results

DIGITS = {"benchmark": "digits", "epochs": 1, "batch_size": 32, "device": "cpu", "seed": 0}


@pytest.mark.parametrize("optimizer, extra", [("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
                                              ("adam", {"lr": 1e-3, "weight_decay": 1e-4}),
                                              ("adamw", {"lr": 1e-3, "weight_decay": 1e-2})])
def test_fused_optimizer_steps_equal_the_default_ones(optimizer, extra):
    stream = load_benchmark("digits")
    aug = DeviceAugment(stream.augment, stream.input_shape)
    task = stream.tasks[0]
    params = {}
    for fused in (False, True):
        torch.manual_seed(0)
        cfg = merge_config({**DIGITS, "method": "sgd", "fused_optimizer": fused,
                            "method_options": {"optimizer": optimizer, **extra}})
        method = build_run(cfg, stream, torch.device("cpu"), aug).method
        method.begin_task(task)
        assert (method.optimizer.defaults.get("fused") is True) == fused
        for b in range(20):
            idx = torch.arange(b * 16, b * 16 + 16) % len(task.train)
            x = task.train.x[idx]
            method.observe(Batch(aug.eval(x), task.train.y[idx], x, idx, 0))
        params[fused] = copy.deepcopy(method.model.state_dict())
    for k, v in params[False].items():
        assert torch.allclose(params[True][k], v, atol=1e-5, rtol=1e-5), k


def test_channels_last_on_cpu_is_one_error_line(capsys, tmp_path):
    """torch's CPU channels_last convolution backward crashes the process for narrow strided 1x1
    convolutions (a ResNet-18 with nf 4's shortcut): refused before anything trains."""
    assert main(["run", "--channels-last", "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--channels-last is supported on CUDA devices only" in err[0]


def _close(a, b, tol):
    return all(abs(x - y) <= tol for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None)


@pytest.mark.parametrize("method, options", [
    ("der++", {"buffer_size": 100, "lr": 0.05}),
    ("rigl-der++", {"buffer_size": 100, "lr": 0.05, "sparsity": 0.8, "delta_t": 5}),
    # importance passes (autograd.grad through the compiled module), DDR's forward hook, DGM
    ("sparcl-der++", {"buffer_size": 100, "lr": 0.05, "sparsity": 0.8, "delta_k": 0.25, "ddr_cutoff": 2}),
    # SAM's ascent and descent passes, Frank-Wolfe, the end-of-task prune
    ("esacl-der++", {"buffer_size": 60, "lr": 0.1, "sparsity": 0.8, "k_frac": 0.1, "tau": 10.0}),
])
def test_compiled_run_equals_eager_run(method, options, tmp_path):
    """torch.compile through dynamo and AOT autograd (the aot_eager backend: inductor's code
    generation takes minutes on CPU and is covered in test_cuda.py) keeps the plain loop's
    training: the same samples and FLOPs, the same accuracies to float tolerance, masks respected."""
    base = {**DIGITS, "method": method, "method_options": options}
    eager, _ = run(merge_config(base), tmp_path / "eager")
    torch._dynamo.reset()  # fresh caches and counters: the compiled run must compile its own graphs
    torch._dynamo.utils.counters.clear()
    compiled, run_dir = run(merge_config({**base, "compile": "aot_eager", "fused_optimizer": True}), tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # training forwards went through it
    assert compiled["samples"] == eager["samples"]
    assert compiled["flops"]["train"] == eager["flops"]["train"]
    for key in ("class_il", "task_il"):
        assert _close(compiled["accuracy"][key]["matrix"], eager["accuracy"][key]["matrix"], 1.0), key
    if method != "der++":
        assert compiled["sparsity"]["overall"]["density"] == pytest.approx(0.2, abs=1e-3)
        assert compiled["sparsity"]["overall"]["density"] == eager["sparsity"]["overall"]["density"]
        weights = torch.load(run_dir / "model.pt", weights_only=True)
        for name, layer in compiled["sparsity"]["per_layer"].items():
            if layer["masked"]:
                assert int((weights[name] != 0).sum()) <= layer["active"], name


@pytest.mark.parametrize("argv, expected", [
    (["--compile", "no-such-backend"], "unknown --compile backend 'no-such-backend'"),
    (["--method", "lwf", "--compile"], "method 'lwf' does not support --compile"),
    (["--compile", "aot_eager:reduce-overhead"], "modes are for inductor only"),
    (["--compile", "inductor:fastest"], "modes are for inductor only"),
])
def test_bad_compile_requests_are_one_error_line(argv, expected, capsys, tmp_path):
    assert main(["run", *argv, "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def _speed_table_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_table.py"
    spec = importlib.util.spec_from_file_location("speed_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_table_pairs_each_configuration_with_its_plain_loop(tmp_path, capsys):
    base = {**DIGITS, "method": "er", "method_options": {"buffer_size": 50}}
    for seed in (0, 1):
        run(merge_config({**base, "seed": seed}), tmp_path / f"plain-s{seed}")
    run(merge_config({**base, "fused_optimizer": True}), tmp_path / "fused-s0")
    table = _speed_table_module()
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| er | - | digits | 1 | `plain eager` | 0,1 |" in out
    rows = table.speed_rows(collect_results([tmp_path]))
    plain, fused = rows
    assert plain["options"] == "plain eager" and plain["speedup"] == pytest.approx(1.0)
    assert fused["options"] == "--fused-optimizer" and fused["seeds"] == [0]
    assert fused["speedup"] == pytest.approx(plain["train_s"][0] / fused["train_s"][0])
    assert fused["cil_vs_plain"] == pytest.approx(fused["cil"][0] - plain["cil"][0])
