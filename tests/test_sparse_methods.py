"""SNIP-DER++ and RigL-DER++ end to end: exact sparsity, resume, result.json, export, CLI, FLOPs on
seq-cifar10 shapes (ResNet-18, synthetic data)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import BENCHMARKS, BenchmarkInfo, load_benchmark
from sparsecl.data.stream import AugmentSpec, Split, Task, TaskStream
from sparsecl.engine import trainer as trainer_mod
from sparsecl.engine.loggers import RunObserver
from sparsecl.engine.trainer import resume, run
from sparsecl.models import build_model
from sparsecl.sparse.allocation import allocate
from sparsecl.sparse.export import load_export

from interrupt import run_interrupted

METHODS = ["snip-der++", "rigl-der++"]


def cfg(method, out=None, **opts):
    options = {"lr": 0.05, "buffer_size": 50, "alpha": 0.3, "beta": 0.5, "sparsity": 0.9, **opts}
    if method == "rigl-der++":
        options.setdefault("delta_t", 5)  # ~26 topology updates over the 5 digits tasks
    return merge_config(dict(method=method, benchmark="digits", epochs=2, batch_size=16, seed=3, device="cpu",
                             method_options=options, out=out))


class CountChecks(RunObserver):
    """After every step: each mask holds exactly its allocation's count and the weights outside are 0."""

    def __init__(self, expected):
        self.expected, self.trainer = expected, None
        self.violations, self.steps, self.initial = [], 0, {}

    def after_step(self, task):
        masks = self.trainer.method.masks
        params = dict(self.trainer.model.named_parameters())
        if not self.initial:
            self.initial.update({n: m.clone() for n, m in masks.items()})
        for n, m in masks.items():
            if int(m.sum()) != self.expected[n] or masks.active(n) != self.expected[n]:
                self.violations.append(("count", n, self.steps))
            if bool((params[n][~m] != 0).any()):
                self.violations.append(("nonzero", n, self.steps))
        self.steps += 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per method: a full run checked after every step, and one interrupted after task 2 then resumed."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-100-100-10 MLP: one thread is several times faster than two
    names = ["backbone.net.1.weight", "backbone.net.3.weight"]
    params = dict(build_model("mlp", (1, 8, 8), 10).named_parameters())
    expected = allocate("uniform", {n: tuple(params[n].shape) for n in names}, 0.1)
    for method in METHODS:
        root = tmp_path_factory.mktemp(method.replace("+", "p"))
        checks = CountChecks(expected)
        trainer = trainer_mod.Trainer(cfg(method), root / "full", observers=[checks])
        checks.trainer = trainer
        full_dir = root / "full"
        full = trainer.run()
        final_masks = torch.load(full_dir / "checkpoint.pt", weights_only=True)["method"]["masks"]["masks"]
        run_interrupted(cfg(method), root / "cut", at_task=2)
        resumed, cut_dir = resume(root / "cut")
        out[method] = SimpleNamespace(full=full, full_dir=full_dir, resumed=resumed, cut_dir=cut_dir,
                                      violations=checks.violations, steps=checks.steps, initial=checks.initial,
                                      final_masks=final_masks, expected=expected)
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_exact_sparsity_through_training(runs, method):
    r = runs[method]
    assert r.steps > 150 and r.violations == []  # checked after every optimiser step
    sp = r.full["sparsity"]
    assert sp["overall"]["density"] == pytest.approx(0.1, abs=1e-4)
    for name, k in r.expected.items():
        layer = sp["per_layer"][name]
        assert layer["masked"] and layer["active"] == k and layer["nonzero"] <= k
    assert not sp["per_layer"]["head.weight"]["masked"]
    changed = any(not torch.equal(r.initial[n], r.final_masks[n]) for n in r.expected)
    assert changed == (method == "rigl-der++")  # SNIP's mask is static, RigL's moves


@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_identical_run(runs, method):
    r = runs[method]
    assert r.resumed["complete"]
    assert r.resumed["accuracy"] == r.full["accuracy"]
    assert r.resumed["flops"]["train"] == r.full["flops"]["train"]
    assert r.resumed["sparsity"] == r.full["sparsity"]
    a = torch.load(r.full_dir / "model.pt", weights_only=True)
    b = torch.load(r.cut_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_result_json_reports_flops_memory_capacity(runs, method):
    r = runs[method].full
    # masked layers at density 0.1, the 100x10 head dense
    masked = sum(v["flops"] for v in r["flops"]["per_layer"].values() if v["weight_density"] < 1)
    masked_dense = sum(v["dense_flops"] for v in r["flops"]["per_layer"].values() if v["weight_density"] < 1)
    if method == "rigl-der++":
        # Every 5th step (before T_end) needs the dense weight gradient: 1/3 of its cost at density 1,
        # so the masked layers cost between 0.1 and 0.1 + 0.9 / 3 / 5 of dense.
        assert 0.1 + 0.9 / 3 / 5 * 0.5 < masked / masked_dense <= 0.1 + 0.9 / 3 / 5
    else:  # SNIP's dense scoring passes (10 batches of 16) are charged too
        trained, scored = r["samples"]["trained"], 10 * 16
        assert masked / masked_dense == pytest.approx((0.1 * trained + scored) / (trained + scored), rel=1e-9)
    assert r["flops"]["ratio"] < 0.25
    mask_bytes = sum(math.ceil(v["n"] / 8) for v in r["sparsity"]["per_layer"].values() if v["masked"])
    assert r["sparsity"]["mask_bytes"] == mask_bytes == r["memory"]["footprint_bytes"]["masks"]
    cap = r["capacity"]
    assert cap["stored_masks"] == 1 and cap["stored_mask_bytes"] == mask_bytes
    assert cap["value"] == pytest.approx(cap["nonzero_fraction"] + 0.25 / 32)
    assert r["model"]["backbone"] == "mlp" and r["model"]["input_shape"] == [1, 8, 8]


def test_rigl_reports_its_topology_updates_per_task(runs):
    r = runs["rigl-der++"]
    rep = r.full["method"]
    total = r.steps  # optimiser steps of the whole run
    assert rep["t_end_steps"] == int(0.75 * total)
    expected = len([t for t in range(1, total + 1) if t % 5 == 0 and t < rep["t_end_steps"]])
    assert rep["updates"] == expected == sum(h["updates"] for h in rep["tasks"])
    assert [h["task"] for h in rep["tasks"]] == [1, 2, 3, 4, 5]
    # The cosine schedule regrows fewer weights per update as it goes, none once the mask is fixed.
    per_update = [h["regrown"] / h["updates"] for h in rep["tasks"] if h["updates"]]
    assert per_update == sorted(per_update, reverse=True) and per_update[0] > 0
    assert rep["tasks"][-1]["updates"] == 0
    assert r.resumed["method"] == rep  # the history survives an interruption


@pytest.mark.parametrize("fmt", ["pt", "csr"])
def test_export_round_trip_gives_identical_predictions(runs, fmt, tmp_path):
    from sparsecl.engine.io import export_run

    r = runs["rigl-der++"]
    path, rep = export_run(r.full_dir, fmt, tmp_path / f"m-{fmt}.pt")
    assert rep["csr_bytes"] < rep["dense_bytes"] and rep["bitmask_bytes"] < rep["csr_bytes"]
    loaded, info = load_export(path)
    assert all(torch.equal(info["masks"][n], r.final_masks[n]) for n in r.expected)
    trained = build_model("mlp", (1, 8, 8), 10)
    trained.load_state_dict(torch.load(r.full_dir / "model.pt", weights_only=True))
    trained.eval()
    stream = load_benchmark("digits")
    augment = DeviceAugment(stream.augment, stream.input_shape)
    x = augment.eval(torch.cat([t.test.x for t in stream.tasks]))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    # Same accuracy as the run measured after its last task (every class seen: Class-IL = plain argmax).
    cil, til = [], []
    with torch.no_grad():
        for t in stream.tasks:
            logits = loaded(augment.eval(t.test.x))
            own = torch.full_like(logits, float("-inf"))
            own[:, t.classes] = 0
            cil.append(100.0 * (logits.argmax(1) == t.test.y).sum().item() / len(t.test))
            til.append(100.0 * ((logits + own).argmax(1) == t.test.y).sum().item() / len(t.test))
    assert cil == r.full["accuracy"]["class_il"]["matrix"][-1] and til == r.full["accuracy"]["task_il"]["matrix"][-1]


def test_cli_export_report_and_sparsity_errors(runs, capsys, tmp_path):
    d = runs["snip-der++"].full_dir
    assert main(["export", str(d), "--format", "csr", "--out", str(tmp_path / "x.pt")]) == 0
    out = capsys.readouterr().out
    assert "dense fp32" in out and "CSR" in out and "bitmask" in out and "x.pt" in out
    assert main(["report", str(d)]) == 0
    table = capsys.readouterr().out
    assert "weight density" in table and "0.100" in table
    for bad in ("1.0", "-0.1", "1.5"):
        assert main(["run", "--method", "rigl-der++", "-o", f"sparsity={bad}", "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sparsity must lie in [0, 1)" in err[0]
    # A dense run exports too (structure from its nonzero weights) and reports density 1.
    assert main(["run", "--method", "sgd", "--epochs", "1", "--device", "cpu", "--quiet", "--out", "dense"]) == 0
    assert json.loads(open("dense/result.json").read())["sparsity"]["overall"]["density"] == 1.0
    assert main(["export", "dense"]) == 0
    assert "nonzero weights" in capsys.readouterr().out
    model, _ = load_export("dense/model-sparse.pt")
    assert model.n_classes == 10


def _cifar_shaped(req):
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(2):
        x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 2, (8,), generator=g) + 2 * t
        tasks.append(Task(t, [2 * t, 2 * t + 1], Split(x, y), Split(x[:4], y[:4])))
    aug = AugmentSpec(crop_padding=4, hflip=True, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    return TaskStream("cifar-shapes", tasks, (3, 32, 32), 4, aug, "resnet18", list("abcd"), [0, 1, 2, 3])


def test_derpp_at_sparsity_09_on_seq_cifar10_shapes_costs_a_tenth_of_the_masked_flops():
    BENCHMARKS.add("test-cifar-shapes", BenchmarkInfo("synthetic 32x32x3, 2 x 2", _cifar_shaped))
    try:
        # RigL-DER++ with no topology update in this short run: plain DER++ on a fixed 0.9-sparse mask.
        c = merge_config(dict(method="rigl-der++", benchmark="test-cifar-shapes", epochs=1, batch_size=4, seed=0,
                              device="cpu", method_options={"lr": 0.03, "buffer_size": 8, "alpha": 0.2, "beta": 0.5,
                                                            "sparsity": 0.9, "policy": "conv-linear",
                                                            "delta_t": 10**6}))
        result, _ = run(c, "cifar")
    finally:
        BENCHMARKS.remove("test-cifar-shapes")
    per_layer = result["flops"]["per_layer"]
    masked = {n: v for n, v in per_layer.items() if result["sparsity"]["per_layer"][n]["masked"]}
    assert len(masked) == 16  # the 3x3 convs of the residual blocks; stem, shortcuts, head dense
    m_flops = sum(v["flops"] for v in masked.values())
    m_dense = sum(v["dense_flops"] for v in masked.values())
    assert m_flops / m_dense == pytest.approx(0.1, abs=1e-4)
    # The reported ratio is the layer-weighted mix: masked layers at 0.1, the rest dense.
    macs = {n: v["macs"] for n, v in per_layer.items()}
    share = sum(macs[n] for n in masked) / sum(macs.values())
    expected = 0.1 * share + (1 - share)
    assert result["flops"]["ratio"] == pytest.approx(expected, rel=1e-3)
    assert 0.1 < result["flops"]["ratio"] < 0.12  # stem, 1x1 shortcuts and head are ~1.5% of ResNet-18's MACs
    assert result["flops"]["dense_equivalent"] == 6 * sum(macs.values()) * result["samples"]["trained"]


@pytest.mark.parametrize("method", ["snip-der++", "rigl-der++", "sparcl-der++"])
def test_fan_in_init_scale_multiplies_surviving_weights_by_inverse_sqrt_density(method, tmp_path):
    """`init_scale=fan-in`: when the mask is created, each masked layer's surviving weights are its
    dense initial weights times sqrt(numel / active); other layers are untouched."""
    extra = {"delta_k": 0.5, "ddr": False} if method == "sparcl-der++" else {}
    trainers = {}
    for s in ("dense", "fan-in"):  # one after the other: each starts from the seeded RNG state
        t = trainers[s] = trainer_mod.Trainer(cfg(method, init_scale=s, sparsity=0.8, **extra), tmp_path / s)
        t.method.begin_task(t.stream.tasks[0])  # SNIP draws its mask here
    dense, scaled = (dict(trainers[s].model.named_parameters()) for s in ("dense", "fan-in"))
    masks = trainers["fan-in"].method.masks
    assert torch.equal(masks.masks[masks.names[0]], trainers["dense"].method.masks.masks[masks.names[0]])
    for name in dense:
        if name in masks.names:
            m = masks.masks[name]
            factor = math.sqrt(m.numel() / int(m.sum()))
            assert factor == pytest.approx(math.sqrt(5), rel=1e-3)
            torch.testing.assert_close(scaled[name][m], dense[name][m] * factor)
            assert bool((scaled[name][~m] == 0).all())
        else:
            assert torch.equal(scaled[name], dense[name])
    with pytest.raises(SparseCLError, match="unknown init_scale 'he'"):
        trainer_mod.Trainer(cfg(method, init_scale="he", **extra), tmp_path / "bad")
