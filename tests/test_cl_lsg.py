"""CL-LSG and its baselines (scratch, grow): gates, isolation, growth decisions, model size, resume."""
import math

import pytest
import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import Trainer, resume, run
from sparsecl.models import build_model
from sparsecl.data.benchmarks import BENCHMARKS, BenchmarkInfo, load_benchmark
from sparsecl.data.stream import AugmentSpec, Split, Task, TaskStream, task_validation
from sparsecl.sparse.gates import ChannelGate, GateSet, KernelGate, layer_graph, reach_scale
from sparsecl.sparse.policy import MaskPolicy

from interrupt import run_interrupted


def cfg(method="cl-lsg", epochs=2, **opts):
    options = {"lr": 0.05}
    options.update(opts)
    return merge_config(dict(method=method, benchmark="digits", setting="task-il", epochs=epochs, batch_size=16,
                             seed=0, device="cpu", keep_checkpoints="all", method_options=options))


@pytest.fixture(scope="module")
def lsg(tmp_path_factory):
    """A full CL-LSG run (targets from scratch models) with the trained method object."""
    out = tmp_path_factory.mktemp("cl-lsg") / "run"
    trainer = Trainer(cfg(), out)
    result = trainer.run()
    return result, out, trainer.method


# ------------------------------------------------------------------- gates
def test_straight_through_gate_is_exactly_binary_with_nonzero_gradient():
    gen = torch.Generator().manual_seed(0)
    gate = KernelGate((6, 5, 1, 1), gen, temperature=1.0, init=0.0)
    gate.configure_(torch.ones(6, 5, 1, 1, dtype=torch.bool), torch.ones(6, 5, 1, 1))
    w = torch.randn(6, 5, 3, 3)
    g = gate()
    assert set(g.unique().tolist()) == {0.0, 1.0}  # noise around logit 0: both values occur
    (w * g).sum().backward()
    assert gate.score.grad is not None and gate.score.grad.abs().sum() > 0
    # fixed positions: their value, no gradient
    gate.score.grad = None
    gate.configure_(torch.zeros(6, 5, 1, 1, dtype=torch.bool), torch.zeros(6, 5, 1, 1))
    assert torch.equal(gate(), torch.zeros(6, 5, 1, 1))
    gate.eval()  # evaluation: deterministic threshold logit > 0
    gate.configure_(torch.ones(6, 5, 1, 1, dtype=torch.bool), torch.ones(6, 5, 1, 1))
    with torch.no_grad():
        gate.score.copy_(torch.linspace(-1, 1, 30).reshape(6, 5, 1, 1))
    assert torch.equal(gate() > 0.5, gate.logit() > 0)


def test_gate_noise_follows_the_seeded_generator():
    def sample(seed):
        gate = KernelGate((8, 8), torch.Generator().manual_seed(seed), init=0.0)
        gate.configure_(torch.ones(8, 8, dtype=torch.bool), torch.ones(8, 8))
        return gate()
    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))


def test_continuous_sparsification_binarises_at_the_end():
    gate = ChannelGate(6)
    gate.on[0] = True  # seed channel
    gate.start_growth_()
    with torch.no_grad():
        gate.s.copy_(torch.tensor([-5.0, 0.3, -0.2, 2.0, 0.01, -0.01]))
    gate.set_beta(1.0)
    soft = gate()
    assert soft[0] == 1 and 0 < soft[2] < 0.5 < soft[1] < 1  # continuous during training
    gate.set_beta(1e4)
    assert torch.allclose(gate(), torch.tensor([1.0, 1, 0, 1, 1, 0]), atol=1e-6)  # annealed: near binary
    grown = gate.binarise_()
    assert grown.tolist() == [False, True, False, True, True, False]
    assert gate.on.tolist() == [True, True, False, True, True, False] and not gate.learn.any()
    assert torch.equal(gate(), gate.on.float())  # exactly 0/1 afterwards
    assert gate.penalty() == 0


@pytest.mark.parametrize("backbone,shape,kw", [
    ("mlp", (1, 8, 8), {}),
    ("lenet", (3, 16, 16), {"channels": [8, 16, 32, 24]}),
    ("resnet18", (3, 8, 8), {"nf": 8}),
    ("vgg16bn", (3, 32, 32), {}),
])
def test_gates_on_paper_backbones_close_channels_exactly(backbone, shape, kw):
    """Closed channels contribute nothing: changing their weights leaves the output unchanged."""
    torch.manual_seed(0)
    model = build_model(backbone, shape, 4, task_classes=[[0, 1], [2, 3]], **kw)
    names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
    gates = GateSet(model, names, torch.Generator().manual_seed(0))
    for g in gates.groups:
        gates.channel_gate(g).on[: max(1, gates.channel_gate(g).on.numel() // 8)] = True
    model.eval()
    gates.train(False)
    x = torch.randn(3, *shape)
    before = model(x)
    on = gates.channels_on()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            dead = ~gates.alive(n, on).expand_as(params[n])
            params[n][dead] = torch.randn(int(dead.sum())) * 10
    assert torch.equal(model(x), before)
    assert model(x).abs().sum() > 0
    gates.detach()
    assert not torch.equal(model(x), before)  # plain layers again: the closed channels are back


@pytest.mark.parametrize("backbone,shape,kw", [
    ("mlp", (1, 8, 8), {}),
    ("lenet", (3, 16, 16), {"channels": [8, 16, 32, 24]}),
    ("resnet18", (3, 8, 8), {"nf": 8}),
    ("vgg16bn", (3, 32, 32), {}),
])
def test_baked_gates_give_the_gated_output_in_a_plain_model(backbone, shape, kw):
    """The export's per-task view: gates multiplied into weights and BatchNorm affine parameters."""
    torch.manual_seed(0)
    model = build_model(backbone, shape, 4, task_classes=[[0, 1], [2, 3]], **kw)
    for m in model.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
    gates = GateSet(model, names, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for g in gates.groups:
        on = gates.channel_gate(g).on
        on.copy_(torch.rand(on.shape, generator=gen) < 0.6)
        on[0] = True
    for n in names:
        k = gates.kernel_gate(n)
        k.configure_(torch.zeros_like(k.learn), (torch.rand(k.value.shape, generator=gen) < 0.7).float())
    model.eval()
    gates.train(False)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        gated = model(x)
        baked = gates.bake(model.state_dict())
    plain = build_model(backbone, shape, 4, task_classes=[[0, 1], [2, 3]], **kw).eval()
    plain.load_state_dict(baked)
    with torch.no_grad():
        assert torch.allclose(plain(x), gated, rtol=1e-5, atol=1e-6)
        plain.load_state_dict(model.state_dict())  # the raw weights: the closed gates matter
        assert not torch.allclose(plain(x), gated, rtol=1e-3, atol=1e-4)


def test_resnet_residual_streams_share_one_channel_gate():
    model = build_model("resnet18", (3, 8, 8), 4, task_classes=[[0, 1], [2, 3]], nf=8)
    names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
    group, source, unit = layer_graph(model, names)
    b = "backbone."
    assert group[b + "conv1"] == group[b + "layer1.0.conv2"] == group[b + "layer1.1.conv2"]
    assert group[b + "layer2.0.conv2"] == group[b + "layer2.0.shortcut.0"] == group[b + "layer2.1.conv2"]
    assert group[b + "layer2.0.conv2"] != group[b + "layer1.0.conv2"]
    assert group[b + "layer1.0.conv1"] == b + "layer1.0.conv1"  # inner convs: own gates
    assert source[b + "layer2.0.shortcut.0"] == group[b + "conv1"] and source[b + "conv1"] is None
    assert unit[b + "layer1.0.conv1"] == b + "layer1.0.bn1"


# ------------------------------------------- a two-task stream: reuse part of task 1
A, B, C = slice(0, 8), slice(8, 16), slice(16, 24)  # three groups of 8 input features


def _features(n, signal, gen, task):
    """n examples of 24 features (a 1x4x6 image): each group in ``signal`` is 128 + f * 20 * (+-1 by
    class) + noise; the other groups are uninformative (0 or 255)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = 255.0 * torch.randint(0, 2, (n, 24), generator=gen).float()
    sign = (2 * y - 1).float()[:, None]
    for group, f in signal:
        x[:, group] = 128 + f * 20 * sign + 25 * torch.randn(n, 8, generator=gen)
    return Split(x.clamp(0, 255).to(torch.uint8).reshape(n, 1, 4, 6), y + 2 * task)


def _two_tasks(req):
    """Task 1: labels in groups A and B, C noise. Task 2: labels in A and C; B carries task 2's
    labels reversed and weaker, so task 1's B kernels only hurt it: it needs part of task 1's
    kernels (A), not the rest (B)."""
    gen = torch.Generator().manual_seed(0)
    tasks = [Task(t, [2 * t, 2 * t + 1], _features(2000, sig, gen, t), _features(400, sig, gen, t))
             for t, sig in enumerate([((A, 1), (B, 1)), ((A, 1), (B, -0.5), (C, 1))])]
    return TaskStream("two-tasks", tasks, (1, 4, 6), 4, AugmentSpec(mean=(0.5,), std=(0.25,)), "mlp",
                      list("abcd"), [0, 1, 2, 3])


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """CL-LSG on the two-task stream (MLP 24-16, 4 epochs, paper's mask lr 5e-4, target 0: task 2
    only reuses); the trainer's method and the run directory."""
    BENCHMARKS.add("test-two-tasks", BenchmarkInfo("two tasks sharing part of their features", _two_tasks))
    try:
        out = tmp_path_factory.mktemp("two") / "run"
        c = merge_config(dict(method="cl-lsg", benchmark="test-two-tasks", setting="task-il", epochs=4,
                              batch_size=16, seed=0, device="cpu", keep_checkpoints="all",
                              backbone_options={"hidden": [16]}, method_options={"lr": 0.05, "target": 0.0}))
        trainer = Trainer(c, out)
        result = trainer.run()
    finally:
        BENCHMARKS.remove("test-two-tasks")
    return result, out, trainer.method


def test_selective_gates_close_on_the_kernels_the_second_task_does_not_need(two_tasks):
    result, _, method = two_tasks
    assert method.options.mask_lr == 5e-4
    n = "backbone.net.1.weight"
    used1, used2 = method.use[0][n], method.use[1][n]  # task 1's kernels, task 2's
    kept = {g: int((used2 & used1)[:, sl].sum()) / int(used1[:, sl].sum()) for g, sl in (("A", A), ("B", B))}
    assert kept["A"] > 0.8 and kept["B"] < 0.5, kept  # task 2 keeps A, drops most of B
    rep = result["method"]
    assert rep["growth_stage"] == [1, 0] and rep["selected"][0] is None and rep["selected"][1] < 0.9
    assert result["accuracy"]["task_il"]["matrix"][1][1] > 95


def test_released_weights_are_retrained_by_the_next_task(two_tasks):
    result, run_dir, method = two_tasks
    n = "backbone.net.1.weight"
    after1 = torch.load(run_dir / "checkpoint-task1.pt", weights_only=True)
    owner1 = after1["method"]["ownership"]["owner"][n]
    on1 = method.channels[0][method.gates.group[method.gates.layers[n]]]
    released = (owner1 < 0) & on1[:, None]  # weights of open channels task 1 does not use
    assert released.sum() > 0 and result["method"]["released"][1] > 0
    final = dict(method.model.named_parameters())[n].detach()
    trained = final != after1["model"][n]
    assert trained[released].all()  # retrained in task 2
    assert not trained[owner1 == 0].any()  # task 1's own weights are frozen
    kept = released & method.use[1][n]
    assert kept.sum() > 0 and (method.ownership.owner[n][kept] == 1).all()  # now task 2's


def test_the_grow_decision_and_target_never_see_the_test_split(tmp_path, monkeypatch):
    """Everything the decision and the scratch target are computed on is held-out training data
    that the engine does not train on; no test example is read by them."""
    import sparsecl.methods.cl_lsg as cl_lsg
    import sparsecl.methods.scratch as scratch_mod  # the scratch target is trained there (task_target)

    rows = lambda split: {bytes(r) for r in split.x.reshape(len(split), -1).numpy()}  # noqa: E731
    seen, trained_on = [], []
    accuracy, scratch, observe = cl_lsg.task_il_accuracy, scratch_mod.scratch_accuracy, cl_lsg.CLLSG.observe

    def spy_accuracy(model, split, *args, **kw):
        seen.append(split)
        return accuracy(model, split, *args, **kw)

    def spy_scratch(template, train, evaluate, *args, **kw):
        trained_on.append(train)
        seen.append(evaluate)
        return scratch(template, train, evaluate, *args, **kw)

    def spy_observe(self, batch):
        observed.append(batch.x_raw)
        return observe(self, batch)
    observed = []
    monkeypatch.setattr(cl_lsg, "task_il_accuracy", spy_accuracy)
    monkeypatch.setattr(scratch_mod, "scratch_accuracy", spy_scratch)
    monkeypatch.setattr(cl_lsg.CLLSG, "observe", spy_observe)
    BENCHMARKS.add("test-two-tasks", BenchmarkInfo("two tasks", _two_tasks))
    try:
        c = merge_config(dict(method="cl-lsg", benchmark="test-two-tasks", setting="task-il", epochs=2,
                              batch_size=64, seed=0, device="cpu", backbone_options={"hidden": [16]},
                              method_options={"lr": 0.05, "target": "scratch"}))
        run(c, tmp_path / "x")
    finally:
        BENCHMARKS.remove("test-two-tasks")
    stream = _two_tasks(None)
    test = set().union(*(rows(t.test) for t in stream.tasks))
    train = set().union(*(rows(t.train) for t in stream.tasks))
    assert len(seen) == 3  # two scratch targets and one stage-1 decision
    held = set().union(*(rows(s) for s in seen))
    assert held <= train and not held & test
    x_raw = torch.cat(observed)
    engine = {bytes(r) for r in x_raw.reshape(x_raw.shape[0], -1).numpy()}
    assert not held & engine and not held & set().union(*(rows(s) for s in trained_on))


def test_a_kernel_gate_can_close_within_the_stage_at_the_papers_mask_lr():
    """At Adam lr 5e-4 an unscaled logit starting at 3 moves at most 0.5 in a 1,000-step stage; with
    the scale that lets it cover 3 in a quarter of the stage at Adam's full step, a gate under a
    steady push (whose gradient the noise makes uneven) is closed by the end of the stage."""
    steps = 1000
    for scale, closes in ((1.0, False), (reach_scale(3.0, 5e-4, steps // 4), True)):
        gate = KernelGate((4, 4), torch.Generator().manual_seed(0), init=3.0)
        gate.configure_(torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4), scale)
        opt = torch.optim.Adam(gate.parameters(), lr=5e-4)
        for _ in range(steps):
            opt.zero_grad()
            gate().sum().backward()  # the loss grows with every open kernel: a steady push to close
            opt.step()
        assert bool((gate.logit() <= 0).all()) == closes, scale
        assert gate.hard().any() != closes
        if not closes:
            assert (gate.logit() > 2.4).all()


# --------------------------------------------------------------- the method
def test_earlier_tasks_weights_masks_and_accuracy_are_unchanged(lsg):
    result, run_dir, _ = lsg
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(5):
        for i in range(j, 5):
            assert R[i][j] == R[j][j]
    assert result["accuracy"]["task_il"]["acc"] > 80
    final = torch.load(run_dir / "model.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    for t in range(4):
        ck = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)
        for name, use in ck["method"]["use"][t].items():
            assert torch.equal(last["use"][t][name], use)  # task t's masks never change
            mine = use.expand_as(final[name])
            assert mine.any()
            assert torch.equal(final[name][mine], ck["model"][name][mine]), name
        for key, value in ck["model"].items():
            if key.startswith(f"head.heads.{t}."):
                assert torch.equal(final[key], value)


def test_tasks_use_only_weights_owned_by_themselves_or_earlier_tasks(lsg):
    _, run_dir, _ = lsg
    m = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    owner = m["ownership"]["owner"]
    for t, use in enumerate(m["use"]):
        for name, u in use.items():
            o = owner[name][u.expand_as(owner[name])]
            assert ((o >= 0) & (o <= t)).all(), name


def test_reported_model_size_is_the_count_of_weights_in_use(lsg):
    result, run_dir, method = lsg
    rep = result["method"]
    model = method.model
    params = dict(model.named_parameters())
    # the unit is the designed network (the run's tensors are 1.5x wider: max_width's reserve)
    designed = build_model(model.backbone_name, model.input_shape, model.n_classes, task_classes=model.task_classes)
    total = sum(dict(designed.named_parameters())[n].numel() for n in method.ownership.names)
    assert total < sum(params[n].numel() for n in method.ownership.names)
    m = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    for t, use in enumerate(m["use"]):
        count = sum(int(u.expand_as(params[n]).sum()) for n, u in use.items())
        assert rep["size_task"][t] == pytest.approx(count / total, abs=1e-6)
    union = sum(int((o >= 0).sum()) for o in m["ownership"]["owner"].values())
    assert rep["model_size"] == pytest.approx(union / total, abs=1e-6)
    assert 0 < rep["size_total"][0] <= rep["size_total"][-1] < 1  # grows from the seed, below full size
    # "in use" is exact: task 2's outputs do not change when every weight it does not use changes.
    task = method.ctx.stream.tasks[2]
    x = method.ctx.augment.eval(task.test.x[:32])
    model.eval()
    with method.evaluation():
        before = method.eval_logits(x, 2)
    with torch.no_grad():
        for n in method.ownership.names:
            unused = ~method.use[2][n].expand_as(params[n])
            params[n][unused] += 1.0
    with method.evaluation():
        after = method.eval_logits(x, 2)
    assert torch.equal(before, after)


def test_growth_is_skipped_when_stage_one_meets_the_target(tmp_path):
    met, _ = run(cfg(target=0.0), tmp_path / "met")
    rep = met["method"]
    assert rep["growth_stage"] == [1, 0, 0, 0, 0]  # task 1 always grows from the seed
    assert rep["grew"][1:] == [0, 0, 0, 0] and rep["grown_kept"][1:] == [None] * 4
    assert len(set(rep["open_channels"])) == 1  # no channel opened after task 1
    missed, _ = run(cfg(target=100.0), tmp_path / "missed")
    m = missed["method"]
    stage = m["growth_stage"]
    assert stage[0] == 1 and stage[1:] == [int(a < 100) for a in m["stage1_accuracy"][1:]]
    assert sum(stage[1:]) >= 2
    # grew = a channel was kept, not that the growth stage ran
    assert all(g == int(k > 0) and g <= s for g, k, s in zip(m["grew"], m["channels_kept"], stage))
    assert m["open_channels"][-1] == m["open_channels"][0] + sum(m["channels_kept"][1:])
    # A skipped stage 2 (the second engine epoch here) has no loss, a trained one a positive loss.
    assert all(loss is None for per_task in met["loss_per_epoch"][1:] for loss in per_task[1:])
    assert all(loss > 0 for per_task in met["loss_per_epoch"][1:] for loss in per_task[:1])


def test_each_stage_trains_for_the_tasks_epochs(tmp_path):
    """Stage 1 and stage 2 each make E passes over the task's training part (stage1_epochs
    shortens stage 1 only); task 1 is one growth stage of E passes."""
    targets = [0, 100, 0, 100, 100]  # given targets: no scratch models trained inside the run
    for s1, E in ((None, 3), (1, 3)):
        res, _ = run(cfg(epochs=E, target=targets, stage1_epochs=s1), tmp_path / f"s{s1}")
        stage = res["method"]["growth_stage"]
        trained = res["samples"]["trained_per_task"]
        stream = load_benchmark("digits")
        n = [len(task_validation(t, 0.2, stream.class_names)[0]) for t in stream.tasks]
        assert trained[0] == E * n[0]
        for t in range(1, 5):
            assert trained[t] == ((s1 or E) + E * stage[t]) * n[t], t
        assert stage[1] == 1 and stage[2] == 0


def test_kernel_gates_keep_their_adam_state_when_growth_starts(tmp_path, monkeypatch):
    from sparsecl.methods.cl_lsg import CLLSG

    seen = []
    start = CLLSG._start_growth

    def spy(self):
        opt = self.mask_optimizer
        steps = [int(st["step"]) for st in opt.state.values()] if opt is not None else []
        start(self)
        seen.append((self.task, opt is self.mask_optimizer, steps))
    monkeypatch.setattr(CLLSG, "_start_growth", spy)
    run(cfg(target=100.0), tmp_path / "x")
    later = [s for s in seen if s[0] > 0]
    assert later and all(same and steps and min(steps) > 0 for _, same, steps in later)


def test_scratch_target_is_computed_and_cached(lsg):
    result, _, _ = lsg
    rep = result["method"]
    assert len(rep["target"]) == 5 and all(50 < a <= 100 for a in rep["target"])
    assert rep["stage1_accuracy"][0] is None and all(a is not None for a in rep["stage1_accuracy"][1:])
    for t in range(1, 5):  # a growth stage exactly where stage 1 missed the target
        assert rep["growth_stage"][t] == int(rep["stage1_accuracy"][t] < rep["target"][t])
    assert rep["decided_on"].startswith("validation")


def test_resume_gives_the_same_result(tmp_path):
    full, _ = run(cfg(target=[0, 100, 0, 100, 100]), tmp_path / "full")
    run_interrupted(cfg(target=[0, 100, 0, 100, 100]), tmp_path / "cut", at_task=2)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["method"] == full["method"]


def test_scratch_and_grow_baselines(tmp_path):
    sc, _ = run(cfg("scratch", lr=0.05), tmp_path / "scratch")
    R = sc["accuracy"]["task_il"]["matrix"]
    assert all(R[4][j] == R[j][j] for j in range(5))  # separate models: nothing forgotten
    assert sc["method"]["size_total"] == [1.0, 2.0, 3.0, 4.0, 5.0] and sc["method"]["model_size"] == 5.0
    # trained on the same 80% as cl-lsg and grow, scored on the held-out 20% (cl-lsg's target)
    stream = load_benchmark("digits")
    n = [len(task_validation(t, 0.2, stream.class_names)[0]) for t in stream.tasks]
    assert sc["samples"]["trained_per_task"] == [2 * k for k in n]
    assert len(sc["method"]["val_accuracy"]) == 5 and all(50 < a <= 100 for a in sc["method"]["val_accuracy"])
    gr, _ = run(cfg("grow", lr=0.05), tmp_path / "grow")
    R = gr["accuracy"]["task_il"]["matrix"]
    assert all(R[4][j] == R[j][j] for j in range(5))
    assert gr["method"]["growth_stage"] == [1] * 5 and gr["method"]["grew"][0] == 1
    s = gr["method"]["size_total"]
    assert all(a <= b for a, b in zip(s, s[1:])) and s[-1] < 1
    # no attentive mask: each task uses whole kernels of every open channel
    assert gr["method"]["size_task"] == pytest.approx(s)
    # the export carries each task's model (scratch) or subnetwork (grow): same accuracy per task
    from export_check import exported_task_il
    assert exported_task_il(tmp_path / "scratch", tmp_path / "sc.pt") == sc["accuracy"]["task_il"]["matrix"][-1]
    assert exported_task_il(tmp_path / "grow", tmp_path / "gr.pt", "csr") == R[-1]


def test_a_digits_run_that_never_needs_the_reserve_is_the_run_without_it(lsg, tmp_path):
    result, _, method = lsg  # max_width 1.5 (the default)
    for g in method.gates.groups:  # its growth never reached past the designed channels
        assert not method.gates.channel_gate(g).on[method.gates.designed[g]:].any()
    plain, _ = run(cfg(max_width=1.0), tmp_path / "plain")
    assert plain["accuracy"] == result["accuracy"]
    mine = {k: v for k, v in result["method"].items() if k != "total_channels"}
    assert {k: v for k, v in plain["method"].items() if k != "total_channels"} == mine
    assert plain["flops"]["train"] == result["flops"]["train"]
    assert {n: v["flops"] for n, v in plain["flops"]["per_layer"].items()} == \
        {n: v["flops"] for n, v in result["flops"]["per_layer"].items()}
    assert result["model"]["width"] == 1.5 and plain["model"]["width"] == 1.0


def test_growth_past_the_designed_network_adds_channels(tmp_path):
    """The seed is the whole designed network, so every channel grown is a reserve channel."""
    c = cfg(seed_fraction=1.0, lam=0.0, target=[0, 100, 0, 100, 100])
    result, _ = run(c, tmp_path / "full")
    rep = result["method"]
    assert rep["channels_kept"][0] > 0 and rep["open_channels"][-1] > rep["designed_channels"]
    assert rep["model_size"] > 1 and rep["size_total"][0] > 1
    R = result["accuracy"]["task_il"]["matrix"]
    assert all(R[4][j] == R[j][j] for j in range(5))  # the reserve leaves earlier tasks as they were
    plain, _ = run(cfg(seed_fraction=1.0, lam=0.0, target=[0, 100, 0, 100, 100], max_width=1.0), tmp_path / "plain")
    assert result["flops"]["per_task"][0] > plain["flops"]["per_task"][0]  # the grown reserve is computed
    run_interrupted(c, tmp_path / "cut", at_task=2)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == result["accuracy"] and resumed["method"] == rep
    from export_check import exported_task_il
    assert exported_task_il(tmp_path / "full", tmp_path / "m.pt") == R[-1]


def test_export_reproduces_every_tasks_accuracy(lsg, tmp_path):
    from export_check import exported_task_il

    result, out, _ = lsg
    assert exported_task_il(out, tmp_path / "m.pt") == result["accuracy"]["task_il"]["matrix"][-1]


@pytest.mark.parametrize("method,opts,setting,epochs,match", [
    ("cl-lsg", {"target": "abc"}, "task-il", 2, "target must be"),
    ("cl-lsg", {"target": 120}, "task-il", 2, r"\[0, 100\]"),
    ("cl-lsg", {"target": [90, 90]}, "task-il", 2, "for 5 tasks"),
    ("cl-lsg", {"stage1_epochs": 0}, "task-il", 2, "stage1_epochs"),
    ("cl-lsg", {"stage1_epochs": 3}, "task-il", 2, "can only shorten"),
    ("cl-lsg", {"val_fraction": 1.0}, "task-il", 2, "val_fraction"),
    ("cl-lsg", {"gate_reach": 0}, "task-il", 2, "gate_reach"),
    ("cl-lsg", {"growth": "sometimes"}, "task-il", 2, "unknown growth"),
    ("cl-lsg", {"max_width": 0.5}, "task-il", 2, "max_width must be >= 1"),
    ("cl-lsg", {"optimizer": "adam"}, "task-il", 2, "sgd"),
    ("cl-lsg", {}, "task-il", 1, ">= 2 epochs"),
    ("cl-lsg", {}, "class-il", 2, "supports only task-il"),
    ("grow", {"selective": True}, "task-il", 2, "grow has no"),
    ("scratch", {}, "class-il", 2, "supports only task-il"),
])
def test_bad_options_are_one_line_errors(method, opts, setting, epochs, match, tmp_path):
    c = merge_config(dict(method=method, benchmark="digits", setting=setting, epochs=epochs, seed=0,
                          device="cpu", method_options=opts))
    with pytest.raises(SparseCLError, match=match) as e:
        run(c, tmp_path / "x")
    assert "\n" not in str(e.value)


def test_cl_lsg_presets_load_and_validate():
    from sparsecl.config import build_options, load_preset, load_yaml, merge_config, preset_dir
    from sparsecl.methods import METHODS

    names = ["cifar100-10-cl-lsg", "cifar100-superclass-cl-lsg", "miniimagenet-cl-lsg"]
    names += [f"{b}-{m}" for b in ("seq-mnist", "seq-cifar10-jpeg") for m in ("cl-lsg", "grow", "scratch")]
    for name in names:
        raw = load_yaml(preset_dir() / f"{name}.yaml")
        assert raw["description"] and "NeurIPS 2022" in raw["source"]
        p = load_preset(name)
        assert p["setting"] == "task-il"
        merge_config(p).validate()
        build_options(METHODS.get(p["method"]).options_cls, p["method_options"], name)
