"""Baselines online EWC, LwF, A-GEM, iCaRL (and DER): each method's defining behaviour, end-to-end runs
on the embedded digits benchmark, and checkpoint/resume."""
import json

import pytest
import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.engine.trainer import build_run, resume, run
from sparsecl.methods import METHODS
from sparsecl.methods.agem import project
from sparsecl.methods.base import Batch
from sparsecl.methods.icarl import herding
from sparsecl.methods.lwf import distillation
from sparsecl.engine.io import export_run
from sparsecl.sparse.export import load_export

from export_check import exported_task_il
from interrupt import run_interrupted

DIGITS = load_benchmark("digits")


def make(method, setting="class-il", **options):
    """A method on the digits stream, outside the engine (seeded, CPU)."""
    torch.manual_seed(0)
    cfg = merge_config(dict(method=method, benchmark="digits", setting=setting, device="cpu",
                            batch_size=16, epochs=1, method_options=options))
    augment = DeviceAugment(DIGITS.augment, DIGITS.input_shape)
    return build_run(cfg, DIGITS, torch.device("cpu"), augment).method


def batch_of(task, n=16, start=0):
    x_raw = task.train.x[start : start + n]
    return Batch(DeviceAugment(DIGITS.augment, DIGITS.input_shape).train(x_raw), task.train.y[start : start + n],
                 x_raw, torch.arange(start, start + n), task.index)


def train_steps(m, task, steps=20, n=16):
    m.begin_task(task)
    for s in range(steps):
        m.observe(batch_of(task, n, (s * n) % (len(task.train) - n)))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- online EWC
def test_ewc_penalty_is_zero_at_old_weights_and_grows_with_distance_and_fisher():
    m = make("ewc", e_lambda=10.0)
    t0 = DIGITS.tasks[0]
    train_steps(m, t0)
    assert float(m.penalty()) == 0.0  # no task finished yet
    m.end_task(t0)
    assert float(m.penalty().detach()) == 0.0  # at theta*
    direction = [torch.randn_like(p) for p in m._plist]

    def penalty_at(scale):
        with torch.no_grad():
            for p, a, d in zip(m._plist, m.anchor, direction):
                p.copy_(a + scale * d)
        return float(m.penalty().detach())

    p1, p2, p3 = penalty_at(0.01), penalty_at(0.02), penalty_at(0.04)
    assert 0 < p1 < p2 < p3
    assert p2 == pytest.approx(4 * p1, rel=1e-4) and p3 == pytest.approx(16 * p1, rel=1e-4)  # quadratic
    m.fisher = [2 * f for f in m.fisher]
    assert penalty_at(0.01) == pytest.approx(2 * p1, rel=1e-5)  # linear in the Fisher
    # The exact formula, with a hand-set Fisher.
    m.fisher = [torch.full_like(p, 3.0) for p in m._plist]
    m.anchor = [torch.zeros_like(p) for p in m._plist]
    expected = 0.5 * 10.0 * 3.0 * sum(float(p.detach().pow(2).sum()) for p in m._plist)
    assert float(m.penalty().detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["empirical", "weighted"])
def test_ewc_fisher_matches_a_per_example_autograd_loop(kind):
    m = make("ewc", fisher=kind, fisher_batch_size=7)
    t0 = DIGITS.tasks[0]
    train_steps(m, t0, steps=10)
    x_raw, y = t0.train.x[:20], t0.train.y[:20]
    got = m.task_fisher(x_raw, y, 0)
    m.model.eval()
    expected = [torch.zeros_like(p) for p in m._plist]
    for i in range(20):
        logp = F.log_softmax(m.model(m.ctx.augment.train(x_raw[i : i + 1])), dim=1)[0, y[i]]
        grads = torch.autograd.grad(logp, m._plist)
        w = logp.exp().detach() if kind == "weighted" else 1.0
        for e, g in zip(expected, grads):
            e += w * g.pow(2) / 20
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-9)


def test_ewc_fisher_is_a_running_sum_decayed_by_gamma():
    m = make("ewc", gamma=0.5)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0)
    m.end_task(t0)
    f0 = [f.clone() for f in m.fisher]
    train_steps(m, t1)
    f1_task = m.task_fisher(t1.train.x, t1.train.y, 1)
    m.end_task(t1)
    for f, a, b in zip(m.fisher, f0, f1_task):
        torch.testing.assert_close(f, 0.5 * a + b)
    assert all(torch.equal(a, p.detach()) for a, p in zip(m.anchor, m._plist))


# --------------------------------------------------------------------------- A-GEM
def test_agem_projection_removes_the_conflicting_component_only():
    g_ref = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([-2.0, 1.0, 3.0])  # conflicts: g . g_ref < 0
    out = project(g, g_ref)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 3.0]))
    same = torch.tensor([0.5, -1.0, 2.0])  # g . g_ref >= 0: unchanged
    assert torch.equal(project(same, g_ref), same)
    assert torch.equal(project(same, torch.zeros(3)), same)  # empty reference: no NaN
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
        p = project(a, b)
        assert torch.dot(p, b) >= -1e-4
        if torch.dot(a, b) >= 0:
            assert torch.equal(p, a)


def test_agem_applied_gradient_never_conflicts_with_the_memory_gradient():
    # A reference minibatch as large as the memory makes g_ref reproducible (digits: no augmentation).
    m = make("a-gem", lr=0.05, buffer_size=100, minibatch_size=100)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0, steps=30)
    m.end_task(t0)
    assert len(m.buffer) == 100 // DIGITS.n_tasks  # per-task episodic memory
    bx, by = m.buffer.all("x", "y")
    m.begin_task(t1)
    conflicts = 0
    for s in range(15):
        batch = batch_of(t1, 16, 16 * s)
        params = list(m.model.parameters())
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(m.model(batch.x), batch.y), params)])
        ref_loss = F.cross_entropy(m.model(m.ctx.augment.train(bx)), by)
        g_ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ref_loss, params)])
        m.observe(batch)
        applied = torch.cat([p.grad.reshape(-1) for p in params])
        assert torch.dot(applied, g_ref) >= -1e-5 * g_ref.norm() * applied.norm()
        if torch.dot(g, g_ref) >= 0:
            torch.testing.assert_close(applied, g)
        else:
            conflicts += 1
            torch.testing.assert_close(applied, g - torch.dot(g, g_ref) / torch.dot(g_ref, g_ref) * g_ref)
    assert conflicts > 0  # the new task's gradient does conflict with the old one's


def test_agem_reservoir_memory_takes_every_batch():
    m = make("a-gem", buffer_size=50, memory="reservoir")
    train_steps(m, DIGITS.tasks[0], steps=5)
    assert m.buffer.seen == 5 * 16


# --------------------------------------------------------------------------- iCaRL
def test_herding_picks_the_example_closest_to_the_class_mean_first():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.1, 0.9]])
    # mean (1.02, 0.98): (1.1, 0.9) is closest; then the point that best re-centres the pair.
    order = herding(feats, 5)
    assert order[0] == 4 and order[1] == 2
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]  # without replacement
    assert herding(feats, 2).tolist() == order[:2].tolist()
    assert herding(feats, 9).numel() == 5


def test_icarl_memory_is_split_evenly_and_nme_classifies_seen_classes_only():
    m = make("icarl", buffer_size=40)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0, steps=10)
    m.end_task(t0)
    assert torch.bincount(m.buffer.y, minlength=10).tolist() == [20, 20] + [0] * 8
    first = {c: m.buffer.x[m.buffer.y == c][:10].clone() for c in t0.classes}
    train_steps(m, t1, steps=10)
    m.end_task(t1)
    counts = torch.bincount(m.buffer.y, minlength=10).tolist()
    assert counts == [10, 10, 10, 10] + [0] * 6  # 40 // 4 classes
    for c in t0.classes:  # old classes keep their first exemplars in herding order
        assert torch.equal(m.buffer.x[m.buffer.y == c], first[c])
    x = m.ctx.augment.eval(t1.test.x[:32])
    logits = m.eval_logits(x, 1)
    assert logits.shape == (32, 10)
    assert torch.isinf(logits[:, 4:]).all() and torch.isfinite(logits[:, :4]).all()
    # Logits are minus the distance to the class means of normalised features.
    f = F.normalize(m.model.features(x), dim=1)
    torch.testing.assert_close(logits[:, :4], -torch.cdist(f, m.class_means[:4]))
    torch.testing.assert_close(m.class_means.norm(dim=1)[:4], torch.ones(4))


def test_icarl_loss_uses_old_model_sigmoids_for_old_classes():
    m = make("icarl", buffer_size=40)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0, steps=10)
    m.end_task(t0)
    m.begin_task(t1)
    batch = batch_of(t1)
    with torch.no_grad():
        out = m.model(batch.x)[:, :4]
        targets = torch.cat([torch.sigmoid(out[:, :2]), F.one_hot(batch.y - 2, 2).float()], 1)
        expected = F.binary_cross_entropy_with_logits(out, targets)
    assert float(m.observe(batch)) == pytest.approx(float(expected), rel=1e-5)


def test_icarl_is_class_il_only_and_needs_one_exemplar_per_class():
    assert METHODS.get("icarl").settings == frozenset({"class-il"})
    with pytest.raises(SparseCLError, match="at least one exemplar per class"):
        make("icarl", buffer_size=5)


# --------------------------------------------------------------------------- LwF
def test_lwf_distillation_is_zero_when_the_model_equals_its_old_copy():
    m = make("lwf", warmup_epochs=0)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0)
    m.end_task(t0)
    m.begin_task(t1)
    x = batch_of(t1).x
    out = m.model(x)
    assert float(m.distill(out, m.teacher(x)).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert float(m.distill(m.model(x), m.teacher(x)).detach()) > 1e-4
    # distillation() itself: KL with temperature, 0 on equal logits, >0 otherwise.
    z = torch.randn(8, 4)
    assert float(distillation(z, z, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation(z, z.flip(1), 2.0)) > 0


def test_lwf_warm_up_trains_only_the_new_classes_head():
    m = make("lwf", warmup_epochs=1, lr=0.05)
    t0, t1 = DIGITS.tasks[:2]
    train_steps(m, t0)
    m.end_task(t0)
    before = m.model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    m.begin_task(t1)  # warm-up: one epoch on task 1, features frozen
    after = m.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    new = torch.tensor(t1.classes)
    others = torch.ones(10, dtype=torch.bool)
    others[new] = False
    assert torch.equal(before["head.weight"][others], after["head.weight"][others])
    assert not torch.equal(before["head.weight"][new], after["head.weight"][new])


# --------------------------------------------------------------------------- end to end
def cfg(method, **options):
    return merge_config(dict(method=method, benchmark="digits", epochs=2, batch_size=16, seed=1,
                             device="cpu", method_options=options))


E2E = {
    "ewc": dict(lr=0.05, e_lambda=10.0),
    "lwf": dict(lr=0.05, alpha=1.0),
    "a-gem": dict(lr=0.05, buffer_size=100, minibatch_size=32),
    "icarl": dict(lr=0.1, buffer_size=100, weight_decay=0.0),
}


@pytest.mark.parametrize("method", sorted(E2E))
def test_runs_end_to_end_and_resumes_identically(method, tmp_path):
    full, full_dir = run(cfg(method, **E2E[method]), tmp_path / "full")
    assert full["complete"]
    cil, til = full["accuracy"]["class_il"], full["accuracy"]["task_il"]
    assert all(v is not None for row in cil["matrix"] for v in row)
    assert til["acc"] > 85  # every method keeps the per-task problem solved
    if method == "a-gem":
        assert cil["acc"] > 25  # fine-tuning: ~18 % on digits
    elif method == "icarl":
        assert cil["acc"] > 60
    else:
        assert cil["acc"] < 40  # regularisation alone forgets in Class-IL (the known result)
    sizes = full["benchmark"]["train_sizes"]
    # Passes outside observe() are counted: EWC's Fisher is one forward+backward per example;
    # LwF's teacher (2 epochs) and warm-up (2 epochs) each run one forward per example of tasks >= 1.
    if method == "ewc":
        assert full["samples"]["trained"] == 3 * sum(sizes)
    if method == "lwf":
        assert full["samples"]["forward_only"] == 4 * sum(sizes[1:])
    if method == "icarl":
        assert full["samples"]["forward_only"] > 2 * sum(sizes[1:])
        # The export classifies by nearest mean of exemplars, as the run evaluated: same accuracies.
        path, rep = export_run(full_dir, "pt", tmp_path / "icarl.pt")
        model, info = load_export(path)
        assert rep["classifier"] == info["classifier"] == "nearest-mean"
        stream = load_benchmark("digits")
        augment = DeviceAugment(stream.augment, stream.input_shape)
        with torch.no_grad():
            exported_cil = [100.0 * (model(augment.eval(t.test.x)).argmax(1) == t.test.y).sum().item() / len(t.test)
                            for t in stream.tasks]
        assert exported_cil == cil["matrix"][-1]
        assert exported_task_il(full_dir, tmp_path / "icarl2.pt", per_task=False) == til["matrix"][-1]

    run_interrupted(cfg(method, **E2E[method]), tmp_path / "cut", at_task=2)
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["tasks_completed"] == 2
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["loss_per_epoch"] == full["loss_per_epoch"]
    assert resumed["flops"]["train"] == full["flops"]["train"]
    w_full = torch.load(full_dir / "model.pt", weights_only=True)
    w_res = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_der_replays_logits_only_and_beats_fine_tuning():
    der, _ = run(cfg("der", lr=0.05, buffer_size=200, alpha=0.3), "der")
    derpp, _ = run(cfg("der++", lr=0.05, buffer_size=200, alpha=0.3, beta=0.5), "derpp")
    sgd, _ = run(cfg("sgd", lr=0.05), "sgd")
    sizes = der["benchmark"]["train_sizes"]
    steps = sum(2 * -(-n // 16) for n in sizes)  # 2 epochs of batches of 16
    # After the first step every step replays one minibatch of 16 (DER: logits only); DER++ two.
    assert der["samples"]["trained"] == 2 * sum(sizes) + 16 * (steps - 1)
    assert derpp["samples"]["trained"] == 2 * sum(sizes) + 2 * 16 * (steps - 1)
    assert der["accuracy"]["class_il"]["acc"] > sgd["accuracy"]["class_il"]["acc"] + 10


def test_task_il_setting_works_for_ewc_lwf_and_agem():
    for method in ("ewc", "lwf", "a-gem"):
        r, _ = run(merge_config(dict(method=method, benchmark="digits", setting="task-il", epochs=1, batch_size=16,
                                     device="cpu", method_options=E2E[method])), f"til-{method}")
        assert set(r["accuracy"]) == {"task_il"} and r["accuracy"]["task_il"]["acc"] > 80


def test_presets_load_and_validate():
    from sparsecl.config import build_options, load_preset, load_yaml, preset_dir

    for name in ["seq-mnist-ewc", "seq-mnist-lwf", "seq-mnist-agem-200", "seq-mnist-agem-500",
                 "seq-mnist-icarl-200", "seq-mnist-icarl-500", "seq-cifar10-ewc", "seq-cifar10-lwf",
                 "seq-cifar10-agem-200", "seq-cifar10-agem-500", "seq-cifar10-icarl-200", "seq-cifar10-icarl-500"]:
        raw = load_yaml(preset_dir() / f"{name}.yaml")
        assert raw["description"] and raw["source"]
        p = load_preset(name)
        build_options(METHODS.get(p["method"]).options_cls, p["method_options"], name)
