"""EsaCL: the K-sparse LMO, Frank-Wolfe feasibility and frozen entries, SAM's perturbation, the
end-of-task one-shot prune (exact densities, accuracy before/after, FLOP densities), sample
accounting of the selection and both SAM passes, isolate, resume, option errors."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.config import build_options, merge_config
from sparsecl.engine.trainer import Trainer, resume, run
from sparsecl.methods.base import Batch
from sparsecl.methods.esacl import EsaCLDERppOptions, EsaCLOptions
from sparsecl.models.batchnorm import frozen_bn_stats
from sparsecl.optim import SAM, StochasticFrankWolfe, in_ksparse_polytope, ksparse_lmo

from interrupt import run_interrupted

LAYERS = ["backbone.net.1.weight", "backbone.net.3.weight"]  # the digits MLP's prunable layers (64-100-100)


# ---------------------------------------------------------------------- optimisers
def _vertices(n, k, r, support):
    for pos in itertools.combinations(support, k):
        for signs in itertools.product((-r, r), repeat=k):
            v = torch.zeros(n, dtype=torch.float64)
            v[list(pos)] = torch.tensor(signs, dtype=torch.float64)
            yield v


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lmo_is_the_best_vertex(k):
    gen = torch.Generator().manual_seed(k)
    r = 0.7
    for trial in range(20):
        m = torch.randn(6, generator=gen, dtype=torch.float64)
        free = None if trial % 2 == 0 else torch.tensor([True, False, True, True, False, True])
        support = range(6) if free is None else [i for i in range(6) if free[i]]
        v = ksparse_lmo(m, k, r, free)
        assert int((v != 0).sum()) == k and torch.all(v[v != 0].abs() == r)  # a vertex
        if free is not None:
            assert torch.all(v[~free] == 0)
        best = min(float(m @ u) for u in _vertices(6, k, r, support))
        assert float(m @ v) == pytest.approx(best, abs=1e-12)


def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(12, 5)
    with torch.no_grad():
        layer.weight.mul_(20)  # far outside the polytope: make_feasible_ must bring it in
    x, y = torch.randn(64, 12, generator=gen), torch.randn(64, 5, generator=gen)
    return layer, x, y


@pytest.mark.parametrize("rescale", ["gradient", "none"])
def test_frank_wolfe_iterates_stay_in_the_polytope(rescale):
    torch.manual_seed(0)
    layer, x, y = _regression()
    k, r = 6, 0.3
    opt = StochasticFrankWolfe([{"params": [layer.weight], "k": k, "radius": r}, {"params": [layer.bias]}],
                               lr=0.1, rescale=rescale)
    opt.make_feasible_()
    assert in_ksparse_polytope(layer.weight, k, r)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = (layer(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        w = layer.weight.detach()
        assert w.abs().max() <= r * (1 + 1e-6) and w.abs().sum() <= k * r * (1 + 1e-6)
    assert losses[-1] < 0.9 * losses[0]  # it optimises, not just stays feasible


def test_frozen_entries_are_bit_identical_and_never_in_the_lmo():
    torch.manual_seed(1)
    layer, x, y = _regression(1)
    frozen = torch.rand(layer.weight.shape) < 0.5
    before = layer.weight.detach().clone()
    base = StochasticFrankWolfe([{"params": [layer.weight], "k": 8, "radius": 50.0}, {"params": [layer.bias]}], lr=0.2)
    base.set_frozen(layer.weight, frozen)
    opt = SAM(base, rho=0.05)  # also through SAM's perturb/restore
    for _ in range(120):
        opt.zero_grad()
        (layer(x) - y).pow(2).mean().backward()
        opt.first_step()
        (layer(x) - y).pow(2).mean().backward()
        opt.second_step()
        assert torch.equal(base.state[layer.weight]["momentum_buffer"][frozen], torch.zeros(int(frozen.sum())))
    after = layer.weight.detach()
    assert torch.equal(after[frozen], before[frozen])
    assert not torch.equal(after[~frozen], before[~frozen])


def test_sam_perturbation_has_norm_rho_and_descends_with_the_perturbed_gradient():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    loss_fn = lambda: nn.functional.cross_entropy(net(x), y)  # noqa: E731
    theta = [p.detach().clone() for p in net.parameters()]
    sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
    sam.zero_grad()
    loss_fn().backward()
    sam.first_step()
    eps = torch.cat([(p.detach() - t).reshape(-1) for p, t in zip(net.parameters(), theta)])
    assert float(eps.norm()) == pytest.approx(0.05, rel=1e-4)
    loss_fn().backward()
    g_perturbed = [p.grad.clone() for p in net.parameters()]
    sam.second_step()
    for p, t, g in zip(net.parameters(), theta, g_perturbed):
        # restored, then one SGD step with the gradient at theta + eps (not at theta)
        torch.testing.assert_close(p.detach(), t - 0.1 * g, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------- method, end to end on digits
def cfg(method="esacl", out=None, **opts):
    options = {"lr": 0.1, "sparsity": 0.8, "k_frac": 0.1, "tau": 10.0, **opts}
    if method != "esacl" and method != "esacl-ewc":
        options.setdefault("buffer_size", 60)
    return merge_config(dict(method=method, benchmark="digits", epochs=1, batch_size=16, seed=5, device="cpu",
                             method_options=options, out=out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("esacl")
    try:
        plain, _ = run(cfg(), root / "plain")
        derpp, derpp_dir = run(cfg("esacl-der++", alpha=0.3, beta=0.5), root / "derpp")
        run_interrupted(cfg("esacl-der++", alpha=0.3, beta=0.5), root / "cut", at_task=2)
        resumed, cut_dir = resume(root / "cut")
        isolate_cfg = cfg(isolate=True, sparsity=0.5)
        isolate_cfg.keep_checkpoints = "all"
        isolate, isolate_dir = run(isolate_cfg, root / "isolate")
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(plain=plain, derpp=derpp, derpp_dir=derpp_dir, resumed=resumed, cut_dir=cut_dir,
                           isolate=isolate, isolate_dir=isolate_dir)


def _keep(n):
    return round(0.2 * n)


def test_prune_gives_exact_density_and_records_accuracy_around_it(runs):
    for r in (runs.plain, runs.derpp):
        records = r["method"]["esacl"]["prune"]
        assert [rec["task"] for rec in records] == [0, 1, 2, 3, 4]
        sizes = {n: v["n"] for n, v in r["sparsity"]["per_layer"].items()}
        for rec in records:
            for n in LAYERS:
                assert rec["density"][n] == _keep(sizes[n]) / sizes[n]
                assert rec["nonzero"][n] <= _keep(sizes[n])
            for key in ("class_il", "task_il"):
                before, after = rec["accuracy_before_prune"][key], rec["accuracy_after_prune"][key]
                assert 0 <= after <= 100 and rec["drop"][key] == pytest.approx(before - after)
        # the returned model is the last prune's: exact counts, head dense; the FLOP counter sees it
        for n in LAYERS:
            layer = r["sparsity"]["per_layer"][n]
            assert layer["masked"] and layer["active"] == _keep(layer["n"]) and layer["nonzero"] <= layer["active"]
            assert r["flops"]["per_layer"][n]["weight_density"] == _keep(layer["n"]) / layer["n"]
        assert not r["sparsity"]["per_layer"]["head.weight"]["masked"]
    # pruning happened after training: every training step ran dense
    assert runs.plain["flops"]["ratio"] == 1.0


def test_selection_and_both_sam_passes_are_counted_once(runs):
    r = runs.plain
    sizes = r["benchmark"]["train_sizes"]
    trained = forward = 0
    for n in sizes:
        for start in range(0, n, 16):
            b = min(16, n - start)
            forward += b  # selection pass, no autograd
            trained += 2 * math.ceil(0.4 * b)  # SAM ascent + descent on the J = 40% kept
    assert r["samples"]["trained"] == trained
    assert r["samples"]["forward_only"] == forward
    assert r["flops"]["train"] == pytest.approx(r["flops"]["dense_equivalent"])
    macs = sum(v["macs"] for v in r["flops"]["per_layer"].values())
    assert r["flops"]["train"] == pytest.approx(6 * macs * trained + 2 * macs * forward)


def test_training_footprint_is_dense_and_capacity_is_one_value(runs):
    """EsaCL trains dense: weights and gradients of the footprint are all parameters' (the prune
    enters capacity and the export only); result.json has one capacity, counting stored masks."""
    for r, stored in ((runs.plain, 0), (runs.isolate, 1)):
        fp = r["memory"]["footprint_bytes"]
        n_params = 64 * 100 + 100 * 100 + 100 * 10 + 210  # the digits MLP 64-100-100-10, biases included
        assert fp["weights"] == fp["gradients"] == 4 * n_params
        cap = r["capacity"]
        assert cap["stored_masks"] == stored and "capacity" not in r["method"]["esacl"]
        assert cap["value"] == pytest.approx(cap["nonzero_fraction"] + (1 - cap["gamma"]) * stored / 32)
    assert runs.plain["capacity"]["nonzero_fraction"] < 0.3  # measured after the last prune at 0.8


def test_resume_gives_identical_run(runs):
    a, b = runs.derpp, runs.resumed
    assert b["complete"]
    assert a["accuracy"] == b["accuracy"]
    assert a["method"] == b["method"]
    assert a["flops"]["train"] == b["flops"]["train"] and a["samples"] == b["samples"]
    ma = torch.load(runs.derpp_dir / "model.pt", weights_only=True)
    mb = torch.load(runs.cut_dir / "model.pt", weights_only=True)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_isolate_keeps_earlier_tasks_weights_bit_identical(runs):
    first = torch.load(runs.isolate_dir / "checkpoint-task1.pt", weights_only=True)
    final = torch.load(runs.isolate_dir / "model.pt", weights_only=True)
    owner = first["method"]["esacl"]["owner"]["owner"]
    for n in LAYERS:
        kept = owner[n] == 0
        assert int(kept.sum()) == round(0.5 * kept.numel())
        assert torch.equal(final[n][kept], first["model"][n][kept])
    # each later prune keeps half of the free weights: density 1 - 0.5^5 after 5 tasks
    dens = runs.isolate["method"]["esacl"]["prune"][-1]["density"]
    sizes = {n: v["n"] for n, v in runs.isolate["sparsity"]["per_layer"].items()}
    for n in LAYERS:
        assert dens[n] == pytest.approx(1 - 0.5 ** 5, abs=5 / sizes[n])


@pytest.mark.parametrize("opts, match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"rho": 0.0}, "rho"),
    ({"k_frac": 0.0}, "k_frac"),
    ({"keep_frac": 1.5}, "keep_frac"),
    ({"radius_mode": "ball"}, "radius_mode"),
    ({"rescale": "adam"}, "rescale"),
    ({"optimizer": "adam"}, "polytope"),
    ({"rescale": "none", "lr": 2.0}, "step size"),
    ({"isolate": True, "sparsity": 0.0}, "isolate"),
    ({"policy": "residual"}, "mask policy"),
    ({"sam": "maybe"}, "true/false"),
    ({"selection": "random"}, "unknown selection 'random'"),
    ({"bn_recalibrate": -1}, "bn_recalibrate must be >= 0"),
])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(SparseCLError, match=match) as e:
        build_options(EsaCLOptions, opts, "method 'esacl'")
    assert "\n" not in str(e.value)


def test_combined_options_keep_the_parents_fields():
    o = build_options(EsaCLDERppOptions, {"alpha": 0.2, "buffer_size": 200, "sam": "false"}, "m")
    assert (o.alpha, o.beta, o.buffer_size, o.sam, o.lr) == (0.2, 0.5, 200, False, 0.01)


def test_esacl_presets_load_and_validate():
    from sparsecl.config import load_preset, load_yaml, preset_dir, preset_names
    from sparsecl.methods import METHODS

    names = [n for n in preset_names() if "-esacl" in n]
    assert {"seq-cifar10-esacl-der++-500-sp80", "seq-cifar10-esacl-er-500-sp80", "seq-mnist-esacl-sp80"} <= set(names)
    for name in names:
        raw = load_yaml(preset_dir() / f"{name}.yaml")
        assert raw["description"] and "appendix 6.1" in raw["source"]
        p = load_preset(name)
        build_options(METHODS.get(p["method"]).options_cls, p["method_options"], name)


@pytest.mark.parametrize("method", ["esacl-er", "esacl-ewc"])
def test_er_and_ewc_variants_run_and_prune(tmp_path, method):
    torch.set_num_threads(1)
    r, _ = run(cfg(method, sse=False), tmp_path / method)
    assert r["complete"] and len(r["method"]["esacl"]["prune"]) == 5
    for n in LAYERS:
        layer = r["sparsity"]["per_layer"][n]
        assert layer["active"] == _keep(layer["n"]) and layer["nonzero"] <= layer["active"]
    if method == "esacl-ewc":
        # per step: ascent on the whole batch (sse off) + descent on 40%; plus the Fisher pass over each
        # task's training set after its prune, charged as training samples at the pruned density
        sizes = r["benchmark"]["train_sizes"]
        steps = sum(b + math.ceil(0.4 * b) for n in sizes for b in [min(16, n - s) for s in range(0, n, 16)])
        assert r["samples"]["trained"] == steps + sum(sizes)
        assert r["flops"]["ratio"] < 1.0


def test_per_class_selection_keeps_the_top_losses_of_each_class_in_proportion():
    """`selection=per-class`: exactly J examples, each class's share its count x J / batch (largest
    remainders), and within a class the highest losses; checked against a direct count."""
    from sparsecl.methods.esacl import top_j_per_class

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        b = int(torch.randint(2, 40, (), generator=g))
        n_classes = int(torch.randint(1, 6, (), generator=g))
        y = torch.randint(n_classes, (b,), generator=g)
        losses = torch.rand(b, generator=g)
        j = int(torch.randint(1, b + 1, (), generator=g))
        idx = top_j_per_class(losses, y, j, n_classes)
        assert idx.numel() == j and len(set(idx.tolist())) == j
        counts = [int((y == c).sum()) for c in range(n_classes)]
        quota = [n * j // b for n in counts]
        leftover = sorted(range(n_classes), key=lambda c: (-(counts[c] * j % b), c))[: j - sum(quota)]
        for c in range(n_classes):
            chosen = [i for i in idx.tolist() if y[i] == c]
            assert len(chosen) == quota[c] + (c in leftover), (trial, c)
            others = [float(losses[i]) for i in range(b) if y[i] == c and i not in chosen]
            if chosen and others:
                assert min(float(losses[i]) for i in chosen) >= max(others)


def test_bn_recalibration_reestimates_running_statistics_without_touching_weights(tmp_path):
    """`bn_recalibrate=N`: after the prune the BatchNorm running mean is the average of the batch
    means of N fresh batches of the task's training data (the old statistics are gone), every
    weight is unchanged, and the prune record holds the accuracy after the re-estimation."""
    from sparsecl.engine.trainer import Trainer

    c = cfg(bn_recalibrate=3, sse=False, ere=False)
    c.backbone, c.backbone_options = "resnet18", {"nf": 4}
    t = Trainer(c, tmp_path / "unit")
    task = t.stream.tasks[0]
    t.method.begin_task(task)
    bn = next(m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.fill_(1000.0)
    seen = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().mean(dim=(0, 2, 3))))
    weights = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert t.method.recalibrate_bn(task)
    hook.remove()
    assert len(seen) == 3
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0))
    assert all(torch.equal(p, weights[n]) for n, p in t.model.named_parameters())
    assert bn.momentum == 0.1 and t.model.training

    result, _ = run(c, tmp_path / "run")
    for record in result["method"]["esacl"]["prune"]:
        after = record["accuracy_after_bn_recalibration"]
        assert set(after) == {"class_il", "task_il"}
        assert record["drop_after_bn_recalibration"]["task_il"] == pytest.approx(
            record["accuracy_before_prune"]["task_il"] - after["task_il"])


def test_the_buffer_gets_each_whole_batch_once_with_its_logits_at_theta(tmp_path):
    """SAM trains twice on 40 % of the batch; the buffer is offered the whole batch once per step,
    with DER++'s logits from the selection pass at the weights before the step."""
    t = Trainer(cfg("esacl-der++", alpha=0.3, beta=0.5), tmp_path / "r")
    m, task = t.method, t.stream.tasks[0]
    m.begin_task(task)
    split = task.train
    for step, start in enumerate((0, 16)):
        idx = torch.arange(start, start + 16)
        x = t.augment.train(split.x[idx])
        with torch.no_grad(), frozen_bn_stats(t.model):
            at_theta = t.model(x).float()
        m.observe(Batch(x, split.y[idx], split.x[idx], idx, 0))
        assert len(m.buffer) == 16 * (step + 1)  # the buffer is not full (60): every example is kept
        stored_x, logits = m.buffer.get(torch.arange(start, start + 16), "x", "logits")
        assert torch.equal(stored_x, split.x[idx]) and torch.equal(logits, at_theta)
