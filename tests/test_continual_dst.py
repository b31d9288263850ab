"""Continual DST: per-task masks of density d over all weights, reusing frozen weights (Task-IL)."""
import math

import numpy as np
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.data import readers
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.engine.trainer import resume, run
from sparsecl.methods import continual_dst as cdst
from sparsecl.methods.continual_dst import ContinualDST, parse_growth_schedule
from sparsecl.sparse.allocation import allocate

from interrupt import run_interrupted
from test_data import MNIST_SLICE, write_cifar100_dir, write_folder

N_TASKS = 5


def cfg(**opts):
    method_options = {"sparsity": 0.5, "init": "uniform", "grow": "gradient", "delta_t": 4, "per_task_bn": True}
    method_options.update(opts)
    return merge_config(dict(method="continual-dst", benchmark="digits", setting="task-il", epochs=2, batch_size=32,
                             seed=0, device="cpu", keep_checkpoints="all", method_options=method_options))


class StepRecorder:
    """Wraps ContinualDST.observe/_topology_update to check every optimiser step of a run
    against an independent record of the masks, the frozen values and what each task has used."""

    def __init__(self, monkeypatch):
        self.method = None
        self.steps = 0
        self.grown = 0
        self.grown_reused = 0  # regrown weights that earlier tasks had trained
        self.unfired_fallback = False  # an unfired update found too few unused weights
        self.violations: list[str] = []
        self.in_task: dict[str, torch.Tensor] = {}  # weights in M_t at some point of the current task
        self.in_run: dict[str, torch.Tensor] = {}  # weights in some task's mask at some point
        self.task = -1
        rec = self
        orig_observe, orig_update = ContinualDST.observe, ContinualDST._topology_update

        def observe(method, batch):
            rec.method = method
            params = method.masks.params
            if batch.task_id != rec.task:
                rec.task = batch.task_id
                rec.in_task = {n: method.masks.masks[n].clone() for n in method.names}
            before = {n: params[n].detach().clone() for n in method.names}
            mask = {n: method.masks.masks[n].clone() for n in method.names}
            owned = {n: method.ownership.owned(n) for n in method.names}
            for n in method.names:
                rec.in_run[n] = rec.in_run.get(n, torch.zeros_like(mask[n])) | mask[n]
            loss = orig_observe(method, batch)
            for n in method.names:
                p = params[n].detach()
                if int(mask[n].sum()) != method.counts[n]:
                    rec.violations.append(f"{n}: |M_t| != its count")
                if (p[~method.masks.masks[n]] != 0).any():
                    rec.violations.append(f"{n}: a weight outside M_t is nonzero (used in the forward pass)")
                keep = mask[n] & owned[n] & method.masks.masks[n]  # frozen, in M_t before and after
                if not torch.equal(p[keep], method.backbone[n][keep]) or not torch.equal(p[keep], before[n][keep]):
                    rec.violations.append(f"{n}: a frozen weight in M_t changed")
                if keep.any() and not p[keep].any():
                    rec.violations.append(f"{n}: frozen weights in M_t are not in the forward pass")
            rec.steps += 1
            return loss

        def update(method, dense_grads):
            before = {n: method.masks.masks[n].clone() for n in method.names}
            orig_update(method, dense_grads)
            for n in method.names:
                after = method.masks.masks[n]
                grown = after & ~before[n]
                rec.grown += int(grown.sum())
                rec.grown_reused += int((grown & method.ownership.owned(n)).sum())
                if int(after.sum()) != int(before[n].sum()):
                    rec.violations.append(f"{n}: topology update changed |M_t|")
                p = method.masks.params[n].detach()
                fresh = grown & method.ownership.free(n)
                if (p[fresh] != 0).any():
                    rec.violations.append(f"{n}: a regrown free weight did not start at 0")
                reused = grown & method.ownership.owned(n)
                if not torch.equal(p[reused], method.backbone[n][reused]):
                    rec.violations.append(f"{n}: a regrown frozen weight lost its value")
                if method.growth_mode(method.current_task) == "unfired":
                    scope = rec.in_task if method.options.unfired == "task" else rec.in_run
                    unused = int((~before[n] & ~scope[n]).sum())  # only when these run out may it fall back
                    if (grown & scope[n]).any() and unused >= int(grown.sum()):
                        rec.violations.append(f"{n}: unfired growth revived a weight used ({method.options.unfired})")
                    rec.unfired_fallback |= unused < int(grown.sum())
                rec.in_task[n] |= after
                rec.in_run[n] |= after

        monkeypatch.setattr(ContinualDST, "observe", observe)
        monkeypatch.setattr(ContinualDST, "_topology_update", update)


@pytest.fixture(scope="module")
def dst_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    rec = StepRecorder(mp)
    try:
        result, run_dir = run(cfg(), tmp_path_factory.mktemp("dst") / "run")
    finally:
        mp.undo()
    return result, run_dir, rec


def test_every_step_trains_only_the_free_weights_of_an_exact_density_mask(dst_run):
    result, _, rec = dst_run
    assert rec.steps > 0 and rec.grown > 0 and not rec.violations, rec.violations[:3]
    assert rec.grown_reused > 0  # growth also picks up connections earlier tasks had trained
    counts = rec.method.counts
    assert all(c == round(0.5 * rec.method.masks.numel(n)) for n, c in counts.items())
    for h in result["method"]["tasks"]:
        assert h["mask_weights"] == counts  # M_t has exactly density d in every layer


def test_later_masks_reuse_frozen_weights_bit_identical(dst_run):
    result, run_dir, _ = dst_run
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    first = torch.load(run_dir / "checkpoint-task1.pt", weights_only=True)["method"]
    owner = final["ownership"]["owner"]
    for n, o in owner.items():
        mine = o == 0
        assert torch.equal(final["backbone"][n][mine], first["backbone"][n][mine])  # task 1's weights, bit-exact
        for j in range(1, N_TASKS):
            assert (final["task_masks"][j][n] & mine).any()  # every later mask reuses some of them
    tasks = result["method"]["tasks"]
    assert tasks[0]["reused_fraction"] == 0 and tasks[0]["new_fraction"] == 1
    assert all(0 < h["reused_fraction"] < 1 and h["reused_fraction"] + h["new_fraction"] == pytest.approx(1)
               for h in tasks[1:])


def test_backbone_usage_is_the_union_of_the_masks(dst_run):
    result, run_dir, _ = dst_run
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    total = sum(o.numel() for o in final["ownership"]["owner"].values())
    union = {n: torch.zeros_like(o, dtype=torch.bool) for n, o in final["ownership"]["owner"].items()}
    usage = []
    for masks in final["task_masks"]:
        for n in union:
            union[n] |= masks[n]
        usage.append(sum(int(u.sum()) for u in union.values()) / total)
    reported = [h["used_fraction"] for h in result["method"]["tasks"]]
    assert reported == pytest.approx(usage)
    assert usage[0] == 0.5 and all(b - a < 0.5 for a, b in zip(usage, usage[1:]))  # masks overlap: < d per task
    assert usage[-1] < 1 and result["method"]["full_after_task"] is None


def _task_logits(method, j, x):
    with method.evaluation():
        return method.eval_logits(x, j)


def test_evaluation_of_task_j_uses_only_its_mask(dst_run):
    _, _, rec = dst_run
    method = rec.method
    stream = load_benchmark("digits")
    x = DeviceAugment(stream.augment, stream.input_shape).eval(stream.tasks[0].test.x[:64])
    gen = torch.Generator().manual_seed(0)
    for j in range(N_TASKS):
        ref = _task_logits(method, j, x)
        saved = {n: v.clone() for n, v in method.backbone.items()}
        live = {n: p.detach().clone() for n, p in method.masks.params.items()}
        with torch.no_grad():
            for n in method.names:  # every weight outside M_j, stored or live, set to noise
                outside = ~method.task_masks[j][n]
                method.backbone[n][outside] = torch.randn(int(outside.sum()), generator=gen)
                method.masks.params[n].copy_(torch.randn(live[n].shape, generator=gen))
        assert torch.equal(_task_logits(method, j, x), ref)
        with torch.no_grad():  # a weight inside M_j does change them (the check can fail)
            n = method.names[0]
            method.backbone[n][method.task_masks[j][n]] += 1.0
        assert not torch.equal(_task_logits(method, j, x), ref)
        with torch.no_grad():
            for n in method.names:
                method.backbone[n].copy_(saved[n])
                method.masks.params[n].copy_(live[n])


def test_per_task_bn_keeps_earlier_tasks_accuracy_exact(dst_run):
    result, _, _ = dst_run
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(N_TASKS):
        for i in range(j, N_TASKS):
            assert R[i][j] == R[j][j]  # measured after every task, not assumed
    til = result["accuracy"]["task_il"]
    assert til["bwt"] == 0
    assert til["acc"] > np.mean(til["random_init"]) + 20  # the subnetworks learn (18 steps per task)


def test_shared_bn_is_the_default_and_per_task_bn_changes_only_the_evaluation(dst_run, tmp_path):
    """Both settings train the same shared tensors; per-task copies only change what later
    evaluations of task j use, so the per-task matrix is the shared run's diagonal held constant."""
    assert cdst.ContinualDSTOptions().per_task_bn is False
    shared, _ = run(cfg(per_task_bn=False), tmp_path / "run")
    S = shared["accuracy"]["task_il"]["matrix"]
    P = dst_run[0]["accuracy"]["task_il"]["matrix"]
    assert any(S[i][j] != S[j][j] for j in range(N_TASKS) for i in range(j + 1, N_TASKS))  # shared: measured
    for i in range(N_TASKS):
        for j in range(N_TASKS):
            assert P[i][j] == (S[j][j] if i >= j else S[i][j])


def test_gradient_growth_is_charged_a_dense_weight_gradient_on_update_steps(tmp_path):
    """Gradient and random growth run the same samples; each gradient update step costs, per
    isolated layer, the weight-gradient FLOPs of the weights outside M_t's free ones."""
    c = {"epochs": 1, "keep_checkpoints": "last"}
    res = {g: run(merge_config(cfg(grow=g, delta_t=3).to_dict(), c), tmp_path / g)[0] for g in ("random", "gradient")}
    stream = load_benchmark("digits")
    steps = math.ceil(len(stream.tasks[0].train) / 32)
    updates = len([t for t in range(1, steps) if t % 3 == 0])
    per_layer = res["random"]["flops"]["per_layer"]
    isolated = torch.load(tmp_path / "random" / "checkpoint.pt", weights_only=True)["method"]["backbone"]
    # Task 1: nothing is frozen yet, so the free weights of M_1 are exactly d = 0.5 of each layer.
    extra = updates * 32 * sum(2 * per_layer[n]["macs"] * 0.5 for n in isolated)
    first = {g: r["flops"]["per_task"][0] for g, r in res.items()}
    assert updates > 0 and first["gradient"] - first["random"] == pytest.approx(extra, rel=1e-9)
    assert res["gradient"]["samples"]["trained"] == res["random"]["samples"]["trained"]


def test_momentum_growth_ranks_by_the_normalised_first_moment(tmp_path, monkeypatch):
    seen = []
    orig = cdst.drop_and_grow_

    def spy(masks, name, k, mode, *, momentum=None, optimizer=None, **kw):
        state = optimizer.state[masks.params[name]]
        seen.append(torch.equal(momentum, state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)))
        return orig(masks, name, k, mode, momentum=momentum, optimizer=optimizer, **kw)

    monkeypatch.setattr(cdst, "drop_and_grow_", spy)
    run(merge_config(cfg(grow="momentum").to_dict(), {"epochs": 1}), tmp_path / "run")
    assert seen and all(seen)


@pytest.mark.parametrize("scope", ["task", "run"])
def test_unfired_growth_grows_only_unused_weights(tmp_path, monkeypatch, scope):
    """task: never in M_t during this task (weights of earlier tasks' masks qualify); run: in no mask ever."""
    rec = StepRecorder(monkeypatch)
    c = merge_config(cfg(sparsity=0.8, grow="unfired", unfired=scope, delta_t=2).to_dict(), {"epochs": 1})
    result, _ = run(c, tmp_path / "run")
    assert rec.grown > 0 and not rec.violations, rec.violations[:3]
    if scope == "task":
        assert rec.grown_reused > 0 and not rec.unfired_fallback
    else:  # five masks of 20% plus their regrowth use up the MLP: then the rest is random (exact counts)
        assert rec.unfired_fallback
    assert [h["grow"] for h in result["method"]["tasks"]] == ["unfired"] * N_TASKS


def test_erk_masks_have_exact_counts(tmp_path, monkeypatch):
    rec = StepRecorder(monkeypatch)
    result, _ = run(merge_config(cfg(sparsity=0.7, init="erk").to_dict(), {"epochs": 1}), tmp_path / "run")
    assert not rec.violations, rec.violations[:3]
    shapes = {n: tuple(p.shape) for n, p in rec.method.masks.params.items()}
    counts = allocate("erk", shapes, 0.3)
    assert rec.method.counts == counts and sum(counts.values()) == round(0.3 * sum(math.prod(s) for s in shapes.values()))
    assert len({c / math.prod(shapes[n]) for n, c in counts.items()}) > 1  # ERK: not uniform
    assert all(h["mask_weights"] == counts for h in result["method"]["tasks"])


def test_adaptive_schedule_switches_mode_at_the_right_task(tmp_path, monkeypatch):
    calls = []
    orig = cdst.drop_and_grow_

    def spy(masks, name, k, mode, **kw):
        calls.append((method_task[0], mode))
        return orig(masks, name, k, mode, **kw)

    method_task = [None]
    orig_obs = ContinualDST.observe

    def observe(self, batch):
        method_task[0] = batch.task_id
        return orig_obs(self, batch)

    monkeypatch.setattr(cdst, "drop_and_grow_", spy)
    monkeypatch.setattr(ContinualDST, "observe", observe)
    result, _ = run(cfg(grow="random:2,momentum"), tmp_path / "run")
    modes = {t: {m for tt, m in calls if tt == t} for t in range(N_TASKS)}
    assert modes == {0: {"random"}, 1: {"random"}, 2: {"momentum"}, 3: {"momentum"}, 4: {"momentum"}}
    assert [h["grow"] for h in result["method"]["tasks"]] == ["random"] * 2 + ["momentum"] * 3


def test_growth_schedule_validation():
    assert parse_growth_schedule("random:2,gradient:3", 5) == ["random"] * 2 + ["gradient"] * 3
    assert parse_growth_schedule("unfired:1,gradient", 4) == ["unfired"] + ["gradient"] * 3
    assert parse_growth_schedule("momentum", 3) == ["momentum"] * 3
    for spec, msg in (("sideways", "unknown growth mode 'sideways'"), ("random:2,gradient:2", "add up to 4"),
                      ("random:4,gradient:2", "add up to 6"), ("random,gradient:2", "only the last entry"),
                      ("random:x", "not an integer"), ("random:0,gradient", ">= 1"), ("random:5,gradient", "add up to 5")):
        with pytest.raises(SparseCLError, match=msg) as e:
            parse_growth_schedule(spec, 5)
        assert "\n" not in str(e.value)
    with pytest.raises(SparseCLError, match="add up to 2"):  # checked against the benchmark's task count
        run(cfg(grow="random:1,gradient:1"), "never-created")
    with pytest.raises(SparseCLError, match="unknown growth mode"):
        run(cfg(grow="random:1,sgd:4"), "never-created")
    with pytest.raises(SparseCLError, match="supports only task-il"):
        run(merge_config(cfg().to_dict(), {"setting": "class-il"}), "never-created")


def test_resume_gives_the_same_result(dst_run, tmp_path):
    result, _, _ = dst_run
    run_interrupted(cfg(), tmp_path / "run", at_task=2)
    resumed, run_dir = resume(tmp_path / "run")
    assert resumed["accuracy"]["task_il"]["matrix"] == result["accuracy"]["task_il"]["matrix"]
    assert resumed["method"]["tasks"] == result["method"]["tasks"]


def test_lr_steps_down_at_half_and_three_quarters(tmp_path, monkeypatch):
    seen = []
    orig = ContinualDST.observe

    def observe(self, batch):
        seen.append((batch.task_id, self.optimizer.param_groups[0]["lr"]))
        return orig(self, batch)

    monkeypatch.setattr(ContinualDST, "observe", observe)
    run(merge_config(cfg().to_dict(), {"epochs": 4}), tmp_path / "run")
    lrs = sorted({lr for t, lr in seen if t == 1}, reverse=True)
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-5])  # epochs 1-2, 3, 4 of every task
    assert seen[0][1] == pytest.approx(1e-3) and [lr for t, lr in seen if t == 1][0] == pytest.approx(1e-3)


# ------------------------------------------------------------------------------ perm-mnist


def test_perm_mnist_stream_shape_and_permutation_determinism():
    s = load_benchmark("perm-mnist", MNIST_SLICE, n_tasks=3, download=False)
    raw = readers.read_mnist(MNIST_SLICE / "MNIST" / "raw")
    assert s.n_tasks == 3 and s.n_classes == 30 and s.input_shape == (1, 28, 28) and s.settings == {"task-il"}
    rng = np.random.default_rng(0)
    perms = [rng.permutation(784) for _ in range(3)]
    for t, task in enumerate(s.tasks):
        assert task.classes == list(range(10 * t, 10 * t + 10))
        assert len(task.train) == len(raw.y_train) and len(task.test) == len(raw.y_test)
        assert torch.equal(task.train.y, torch.from_numpy(raw.y_train.astype(np.int64) + 10 * t))
        expect = raw.x_test.reshape(len(raw.x_test), -1)[:, perms[t]].reshape(raw.x_test.shape)
        assert torch.equal(task.test.x, torch.from_numpy(expect))
    assert not torch.equal(s.tasks[0].train.x, torch.from_numpy(raw.x_train))  # task 1 is permuted too
    again = load_benchmark("perm-mnist", MNIST_SLICE, n_tasks=3, download=False)
    assert all(torch.equal(a.train.x, b.train.x) for a, b in zip(s.tasks, again.tasks))
    other = load_benchmark("perm-mnist", MNIST_SLICE, n_tasks=3, class_order="seed:1", download=False)
    assert not torch.equal(other.tasks[0].train.x, s.tasks[0].train.x)
    assert load_benchmark("perm-mnist", MNIST_SLICE, download=False).n_tasks == 20
    with pytest.raises(SparseCLError, match="only seed:N"):
        load_benchmark("perm-mnist", MNIST_SLICE, class_order="1,2,3", download=False)


def test_perm_mnist_runs_task_il_only(tmp_path):
    base = dict(method="continual-dst", benchmark="perm-mnist", data_dir=str(MNIST_SLICE), n_tasks=3,
                setting="task-il", epochs=1, batch_size=32, seed=0, device="cpu",
                method_options={"sparsity": 0.9, "delta_t": 2, "grow": "random", "per_task_bn": True})
    result, _ = run(merge_config(base), tmp_path / "run")
    assert len(result["accuracy"]["task_il"]["matrix"]) == 3 and result["accuracy"]["task_il"]["bwt"] == 0
    with pytest.raises(SparseCLError, match="supports only task-il"):
        run(merge_config({**base, "method": "sgd", "setting": "class-il"}), tmp_path / "x")


# --------------------------------------------------- the study's benchmarks and backbones (stand-ins)


@pytest.fixture
def flush_denormal():
    """The 2-channel stand-ins at 95% sparsity produce denormal activations/gradients, which make CPU
    convolutions' backward ~100x slower; real widths do not. Flush them to zero for these tests only."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("benchmark,backbone,opts", [
    ("cifar100-5", "resnet18", {"nf": 4}),
    ("cifar100-10", "resnet18", {"nf": 2}),
    ("cifar100-20", "resnet18", {"nf": 2}),
    ("miniimagenet", "resnet18", {"nf": 4}),
    ("image-folder", "vgg-like", {}),
    ("image-folder", "mobilenetv2", {"width_mult": 0.25}),
])
def test_study_benchmarks_and_backbones_run(tmp_path, monkeypatch, benchmark, backbone, opts, flush_denormal):
    if benchmark == "miniimagenet":
        write_folder(tmp_path / "miniimagenet", classes=tuple(f"n{i:02d}" for i in range(20)), n_train=2, n_test=1,
                     size=12)
        extra = {"n_tasks": 10, "image_size": 8}
    elif benchmark == "image-folder":  # vgg-like needs 32x32 inputs: a tiny folder keeps it fast
        size = 32 if backbone == "vgg-like" else 8  # mobilenetv2's depthwise backward is slow on CPU
        write_folder(tmp_path / "f", classes=("a", "b", "c", "d"), n_train=2, n_test=1, size=size)
        extra = {"n_tasks": 2, "data_root": str(tmp_path / "f")}
    else:
        for name, m in write_cifar100_dir(tmp_path / "cifar-100-python").items():
            monkeypatch.setitem(readers.CIFAR100_MD5, name, m)
        extra = {}
    c = merge_config(dict(method="continual-dst", benchmark=benchmark, data_dir=str(tmp_path), setting="task-il",
                          backbone=backbone, backbone_options=opts, epochs=1, batch_size=64, seed=0, device="cpu",
                          download=False, method_options={"sparsity": 0.95, "init": "erk", "delta_t": 1,
                                                          "grow": "momentum", "per_task_bn": True}, **extra))
    result, _ = run(c, tmp_path / "run")
    til = result["accuracy"]["task_il"]
    n = len(til["matrix"])
    R = til["matrix"]
    assert all(R[i][j] == R[j][j] for j in range(n) for i in range(j, n))  # per-task BN keeps them exact
    usage = result["method"]["tasks"][-1]["used_fraction"]
    assert 0 < usage <= 0.05 * n + 1e-4  # the union of n masks of 5% each (ERK: 5% in total, rounding)


def test_export_reproduces_every_tasks_accuracy(dst_run, tmp_path):
    from export_check import exported_task_il

    result, run_dir, _ = dst_run
    final_row = result["accuracy"]["task_il"]["matrix"][-1]
    assert exported_task_il(run_dir, tmp_path / "m.pt", "csr") == final_row
    assert exported_task_il(run_dir, tmp_path / "m2.pt", "csr", per_task=False) != final_row
