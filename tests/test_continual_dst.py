"""Continual DST: per-task sparse subnetworks by drop-and-grow among free weights (Task-IL)."""
import numpy as np
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.data import readers
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.engine.trainer import resume, run
from sparsecl.methods import continual_dst as cdst
from sparsecl.methods.continual_dst import ContinualDST, parse_growth_schedule
from sparsecl.sparse.allocation import allocate

from interrupt import run_interrupted
from test_data import MNIST_SLICE, write_cifar100_dir, write_folder

N_TASKS = 5


def cfg(**opts):
    method_options = {"sparsity": 0.8, "init": "uniform", "grow": "gradient", "delta_t": 4}
    method_options.update(opts)
    return merge_config(dict(method="continual-dst", benchmark="digits", setting="task-il", epochs=2, batch_size=32,
                             seed=0, device="cpu", keep_checkpoints="all", method_options=method_options))


class StepRecorder:
    """Wraps ContinualDST.observe/_topology_update to check every optimiser step of a run."""

    def __init__(self, monkeypatch):
        self.steps = 0
        self.grown = 0
        self.violations: list[str] = []
        self.used: dict[str, torch.Tensor] = {}  # every weight seen in any task's mask (independent record)
        rec = self
        orig_observe, orig_update = ContinualDST.observe, ContinualDST._topology_update

        def observe(method, batch):
            params = method.masks.params
            before = {n: params[n].detach().clone() for n in method.names}
            cur = {n: method.current[n].clone() for n in method.names}
            for n in method.names:
                rec.used[n] = rec.used.get(n, torch.zeros_like(cur[n])) | cur[n] | method.ownership.owned(n)
            loss = orig_observe(method, batch)
            for n in method.names:
                changed = params[n].detach() != before[n]
                # Only the current mask's weights move (grown ones start at 0: they do not change).
                if (changed & ~cur[n]).any():
                    rec.violations.append(f"{n}: weights outside M_t changed")
                if int(cur[n].sum()) > method.counts[n]:
                    rec.violations.append(f"{n}: M_t larger than its count")
            rec.steps += 1
            return loss

        def update(method, dense_grads):
            before = {n: method.current[n].clone() for n in method.names}
            orig_update(method, dense_grads)
            for n in method.names:
                grown = method.current[n] & ~before[n]
                rec.grown += int(grown.sum())
                if method.growth_mode(method.current_task) == "unfired" and (grown & rec.used[n]).any():
                    rec.violations.append(f"{n}: unfired growth revived a used weight")
                if int(method.current[n].sum()) != int(before[n].sum()):
                    rec.violations.append(f"{n}: topology update changed the count of M_t")
                rec.used[n] |= method.current[n]

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


def test_earlier_tasks_accuracy_exactly_unchanged(dst_run):
    result, _, _ = dst_run
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(N_TASKS):
        for i in range(j, N_TASKS):
            assert R[i][j] == R[j][j]  # measured after every task, not assumed
    bwt = np.mean([R[-1][j] - R[j][j] for j in range(N_TASKS - 1)])
    assert bwt == 0 and result["accuracy"]["task_il"]["bwt"] == 0
    assert result["accuracy"]["task_il"]["acc"] > 85


def test_earlier_tasks_weights_bit_identical_through_adam(dst_run):
    _, run_dir, _ = dst_run
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for t in range(N_TASKS - 1):
        ck = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)
        owner = ck["method"]["ownership"]["owner"]
        assert len(owner) == 2  # the MLP's two hidden linear layers are isolated
        for name, o in owner.items():
            mine = o == t
            assert mine.any()
            assert torch.equal(final[name][mine], ck["model"][name][mine]), name
            assert not ck["model"][name][o == -1].any()  # weights no task owns are exactly zero
        for key, value in ck["model"].items():
            if key.startswith(f"head.heads.{t}."):
                assert torch.equal(final[key], value), key


def test_each_task_trains_exactly_its_count(dst_run):
    """Only M_t changes at any step; per task each layer gains exactly count_l = d * n_l weights."""
    result, run_dir, rec = dst_run
    assert rec.steps > 0 and rec.grown > 0 and not rec.violations, rec.violations[:3]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    owner = final["method"]["ownership"]["owner"]
    shapes = {n: tuple(o.shape) for n, o in owner.items()}
    counts = allocate("uniform", shapes, 0.2)
    prev = None
    for t in range(N_TASKS):
        ck = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)
        for n, o in owner.items():
            assert int((o == t).sum()) == counts[n] == round(0.2 * o.numel())
            if prev is not None:  # everything that differs from the previous task's end is task t's
                diff = ck["model"][n] != prev["model"][n]
                assert not (diff & (o != t)).any()
        prev = ck
    usage = [h["used_fraction"] for h in result["method"]["tasks"]]
    assert usage == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert result["method"]["layer_full_after_task"] == 5 and result["method"]["saturated_at_task"] is None


def test_unfired_growth_never_revives_used_weights_and_erk_counts(tmp_path, monkeypatch):
    rec = StepRecorder(monkeypatch)
    c = merge_config(cfg(sparsity=0.7, init="erk", grow="unfired", delta_t=2).to_dict(), {"epochs": 1})
    result, run_dir = run(c, tmp_path / "run")
    assert rec.grown > 0 and not rec.violations, rec.violations[:3]
    owner = torch.load(run_dir / "checkpoint-task1.pt", weights_only=True)["method"]["ownership"]["owner"]
    counts = allocate("erk", {n: tuple(o.shape) for n, o in owner.items()}, 0.3)
    assert {n: int((o == 0).sum()) for n, o in owner.items()} == counts
    assert sum(counts.values()) == round(0.3 * sum(o.numel() for o in owner.values()))
    assert len(set(c / owner[n].numel() for n, c in counts.items())) > 1  # ERK: not uniform
    # 0.3 per task: the first task that finds some layer short of free weights takes what is left.
    first_short = min(o.numel() // counts[n] + (1 if o.numel() % counts[n] else 0) for n, o in owner.items())
    assert result["method"]["saturated_at_task"] == first_short < 5
    last = result["method"]["tasks"][-1]
    assert all(last["trained_weights"][n] <= counts[n] for n in counts)
    assert result["accuracy"]["task_il"]["bwt"] == 0


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
                method_options={"sparsity": 0.9, "delta_t": 2, "grow": "random"})
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
                                                          "grow": "momentum"}, **extra))
    result, _ = run(c, tmp_path / "run")
    til = result["accuracy"]["task_il"]
    n = len(til["matrix"])
    R = til["matrix"]
    assert all(R[i][j] == R[j][j] for j in range(n) for i in range(j, n))  # per-task BN keeps them exact
    usage = result["method"]["tasks"][-1]["used_fraction"]
    assert 0 < usage <= 0.05 * n + 1e-4  # ERK may give small layers more than 5%, never more in total (rounding)


def test_export_reproduces_every_tasks_accuracy(dst_run, tmp_path):
    from export_check import exported_task_il

    result, run_dir, _ = dst_run
    final_row = result["accuracy"]["task_il"]["matrix"][-1]
    assert exported_task_il(run_dir, tmp_path / "m.pt", "csr") == final_row
    assert exported_task_il(run_dir, tmp_path / "m2.pt", "csr", per_task=False) != final_row
