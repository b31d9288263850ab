"""--sparse-kernels: networks and whole runs on the real sparse CPU kernels give the dense-mask path's
results (to float rounding), with identical FLOP and sample counts, resumable, and exported models too."""
import copy
from pathlib import Path

import pytest
import torch

from interrupt import run_interrupted
from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.engine.trainer import resume, run
from sparsecl.models import build_model
from sparsecl.sparse import execution as execution_mod
from sparsecl.sparse.execution import SparseExecution
from sparsecl.methods.continual_dst import ContinualDST
from sparsecl.sparse import kernel_choice
from sparsecl.sparse.export import load_export, use_task
from sparsecl.sparse.masks import MaskSet, random_mask

FIXTURES = Path(__file__).parent / "fixtures"
NETS = {  # backbone -> (input shape, options, expected mode)
    "resnet18": ((3, 16, 16), {"nf": 4}, "batch-last"),
    "mlp": ((1, 12, 12), {}, "batch-last"),
    "lenet": ((3, 16, 16), {}, "per-layer"),
    "vgg-like": ((3, 32, 32), {}, "per-layer"),
}


def masked_pair(backbone: str, density: float = 0.3, seed: int = 0):
    """The same masked model twice (``dense`` and, running on the kernels, ``sparse``) and their masks."""
    shape, opts, _ = NETS[backbone]
    torch.manual_seed(seed)
    dense = build_model(backbone, shape, 6, **opts)
    names = [n for n, p in dense.named_parameters() if p.dim() in (2, 4) and not n.startswith("head")]
    params = dict(dense.named_parameters())
    counts = {n: max(1, int(density * params[n].numel())) for n in names}
    dm = MaskSet.from_counts(dense, counts, generator=torch.Generator().manual_seed(seed))
    sparse = copy.deepcopy(dense)
    sm = MaskSet(sparse, dm.masks)
    dm.apply_(), sm.apply_()
    ex = SparseExecution(sparse, lambda: sm).install()
    return dense, sparse, dm, sm, ex


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= rtol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("backbone", list(NETS))
def test_network_on_kernels_equals_the_masked_dense_network(backbone):
    dense, sparse, dm, sm, ex = masked_pair(backbone)
    assert ex.mode == NETS[backbone][2]
    assert list(sparse.state_dict()) == list(dense.state_dict())
    x = torch.randn(5, *NETS[backbone][0])  # an odd batch
    assert close(sparse(x), dense(x))
    for (n, bd), (_, bs) in zip(dense.named_buffers(), sparse.named_buffers()):
        assert close(bs.float(), bd.float()), n  # BatchNorm running statistics moved alike
    # Gradients in eval mode: through batch statistics of 5 samples on a 1x1 map (VGG's last
    # stage) float32 rounding alone moves the first layer's gradient by ~1 %, dense or sparse.
    dense.eval(), sparse.eval()
    yd, ys = dense(x), sparse(x)
    assert close(ys, yd)
    yd.square().sum().backward()
    ys.square().sum().backward()
    for (n, pd), (_, ps) in zip(dense.named_parameters(), sparse.named_parameters()):
        m = dm.masks.get(n, torch.ones_like(pd, dtype=torch.bool))
        assert close(ps.grad * m, pd.grad * m, 1e-3), n
        assert not bool(ps.grad[~m].any()), n  # no weight gradient outside the mask
    with torch.no_grad():  # inference: a batch below the vector width (row kernels) and above it
        for xi in (x, torch.randn(17, *NETS[backbone][0])):
            assert close(sparse(xi), dense(xi))
    ex.remove()
    assert torch.equal(sparse(x), type(sparse).forward(sparse, x))


def test_a_changed_mask_is_used_at_the_next_forward():
    dense, sparse, dm, sm, ex = masked_pair("resnet18")
    x = torch.randn(4, *NETS["resnet18"][0])
    sparse(x)
    name = "backbone.layer2.0.conv1.weight"
    new = random_mask(dm.masks[name].shape, 20, generator=torch.Generator().manual_seed(1))
    for m in (dm, sm):
        m.set_mask(name, new)
        m.apply_()
    assert close(sparse(x), dense(x))


def test_weight_gradient_positions_follow_grad_masks_dense_steps_and_importance_passes():
    dense, sparse, dm, sm, ex = masked_pair("mlp")
    name = "backbone.net.1.weight"
    gm = dm.masks[name] & (torch.rand(dm.masks[name].shape, generator=torch.Generator().manual_seed(2)) < 0.5)
    sm.set_grad_mask(name, gm)
    x = torch.randn(3, *NETS["mlp"][0])
    w = sm.params[name]

    def grad() -> torch.Tensor:
        w.grad = None
        sparse(x).square().sum().backward()
        return w.grad

    dense(x).square().sum().backward()
    full = dm.params[name].grad
    assert close(grad(), full * sm.grad_masks[name], 1e-3)  # DGM: only where the gradient mask allows
    with sm.active_weight_grads():
        assert close(grad(), full * sm.masks[name], 1e-3)  # importance passes: every active weight
    sm.push_flops(dense_grad=True)
    assert close(grad(), full, 1e-3)  # RigL/DST growth steps: the dense weight gradient
    sm.push_flops()
    assert not bool(grad()[~sm.grad_masks[name]].any())


def sparcl_cfg(kernels: str, out: Path, **extra):
    opts = {"lr": 0.05, "buffer_size": 50, "sparsity": 0.9, "delta_k": 1, "p_intra": 0.02, "p_inter": 0.05,
            "ddr_rho": 0.3, "ddr_cutoff": 1, "dgm_interval": 5, "alpha": 0.3, "beta": 0.5}
    base = dict(method="sparcl-der++", benchmark="seq-mnist", data_dir=str(FIXTURES / "mnist-slice"), epochs=2,
                batch_size=8, seed=3, device="cpu", threads=1, method_options=opts, out=str(out),
                sparse_kernels=kernels)
    base.update(extra)
    return merge_config(base)


def matrices(result: dict) -> list:
    return [v for k in sorted(result["accuracy"]) for row in result["accuracy"][k]["matrix"] for v in row]


@pytest.mark.parametrize("extra", [{}, {"benchmark": "seq-cifar10-jpeg", "backbone": "resnet18", "epochs": 3}],
                         ids=["seq-mnist-mlp", "seq-cifar10-resnet18"])
def test_sparcl_run_on_kernels_gives_the_dense_runs_results_and_counts(tmp_path, extra):
    if "backbone" in extra:  # nf 8; 8 training images per task: one step per epoch, one stage per epoch
        data = tmp_path / "data"
        data.mkdir()
        (data / "cifar10-jpeg").symlink_to(FIXTURES.resolve() / "cifar10-jpeg-slice")
        extra = {**extra, "backbone_options": {"nf": 8}, "data_dir": str(data)}
    dense, _ = run(sparcl_cfg("off", tmp_path / "dense", **extra))
    sparse, _ = run(sparcl_cfg("on", tmp_path / "sparse", **extra))
    assert sparse["flops"] == dense["flops"] and sparse["samples"] == dense["samples"]
    for key in ("density", "grad_density", "masked_weights"):
        assert sparse["sparsity"]["overall"][key] == dense["sparsity"]["overall"][key]
    # Task 1 follows the dense run to float rounding; after that rounding grows (BatchNorm over a few
    # samples, replay of stored logits), and a borderline test image may flip: one image is 5 points
    # of a seq-mnist slice task (20 test images) and 25 of a CIFAR slice task (4).
    for a, b in zip(sparse["loss_per_epoch"][0], dense["loss_per_epoch"][0]):
        assert abs(a - b) <= 1e-3 * abs(b)
    diffs = [abs(a - b) for a, b in zip(matrices(sparse), matrices(dense))]
    assert sum(d > 0 for d in diffs) <= len(diffs) / 8
    if "backbone" not in extra:
        assert max(diffs) <= 5.0 + 1e-9
    assert sparse["config"]["sparse_kernels"] == "on"


ISOLATION = {  # methods whose masks change by phase or per evaluated task (digits: the MLP)
    "continual-dst": dict(setting="task-il", batch_size=32, method_options={"sparsity": 0.7, "delta_t": 4}),
    "packnet": dict(setting="task-il", batch_size=16, method_options={"lr": 0.1, "retrain_epochs": 1}),
    "esacl-der++": dict(batch_size=16, method_options={"lr": 0.1, "sparsity": 0.8, "k_frac": 0.1, "buffer_size": 60}),
}


def isolation_cfg(method: str, kernels: str, out: Path, **extra):
    base = dict(method=method, benchmark="digits", epochs=2, seed=0, device="cpu", threads=1, out=str(out),
                sparse_kernels=kernels, **ISOLATION[method])
    return merge_config({**base, **extra})


@pytest.mark.parametrize("method, extra", [(m, {}) for m in ISOLATION] + [
    ("continual-dst", {"benchmark": "seq-cifar10-jpeg", "backbone": "resnet18", "backbone_options": {"nf": 8}})],
    ids=[*ISOLATION, "continual-dst-resnet18"])
def test_isolation_methods_on_kernels_give_the_dense_runs_results_and_counts(tmp_path, method, extra):
    if "backbone" in extra:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "cifar10-jpeg").symlink_to(FIXTURES.resolve() / "cifar10-jpeg-slice")
        extra = {**extra, "data_dir": str(tmp_path / "data")}
    dense, _ = run(isolation_cfg(method, "off", tmp_path / "dense", **extra))
    sparse, _ = run(isolation_cfg(method, "on", tmp_path / "sparse", **extra))
    assert sparse["flops"] == dense["flops"] and sparse["samples"] == dense["samples"]
    for a, b in zip(sum(sparse["loss_per_epoch"], []), sum(dense["loss_per_epoch"], [])):
        assert abs(a - b) <= 1e-3 * abs(b)
    diffs = [abs(a - b) for a, b in zip(matrices(sparse), matrices(dense))]
    assert sum(d > 0 for d in diffs) <= len(diffs) / 8


def test_a_task_view_runs_on_its_own_weights_only(tmp_path, monkeypatch):
    seen = {}
    end_task = ContinualDST.end_task

    def record(method, task):
        end_task(method, task)
        seen["method"], seen["x"] = method, method.ctx.augment.eval(task.test.x[:5])

    monkeypatch.setattr(ContinualDST, "end_task", record)
    run(isolation_cfg("continual-dst", "on", tmp_path / "r", epochs=1))
    m = seen["method"]
    assert m.execution_masks is m.masks  # outside evaluation: the training masks
    with m.evaluation():
        for j in (3, 0):
            m.eval_logits(seen["x"], j)
            view = m.execution_masks
            assert all(torch.equal(view.masks[n], m.task_masks[j][n] & (m.backbone[n] != 0)) for n in m.names)
    # The exported views too: each task's logits on its own weights.
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "m.pt")]) == 0
    dense, dinfo = load_export(tmp_path / "m.pt")
    sparse, sinfo = load_export(tmp_path / "m.pt", sparse_kernels=True)
    for j in (0, 4):
        use_task(dense, dinfo, j), use_task(sparse, sinfo, j)
        assert sinfo["kernel_masks"].active() == sum(int(v.sum()) for v in m.task_masks[j].values())
        with torch.no_grad():
            assert close(sparse(seen["x"]), dense(seen["x"]))


def test_resume_on_kernels_is_bit_identical(tmp_path):
    full, full_dir = run(sparcl_cfg("on", tmp_path / "full"))
    run_interrupted(sparcl_cfg("on", tmp_path / "cut"), tmp_path / "cut", at_task=2)
    resumed, cut_dir = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"] and resumed["flops"] == full["flops"]
    a = torch.load(full_dir / "model.pt", weights_only=True)
    b = torch.load(cut_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_model_on_kernels_gives_the_same_logits(tmp_path):
    _, run_dir = run(sparcl_cfg("off", tmp_path / "r"))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.pt")]) == 0
    dense, _ = load_export(tmp_path / "m.pt")
    sparse, info = load_export(tmp_path / "m.pt", sparse_kernels=True)
    assert info["execution"].mode == "batch-last"
    for n in (1, 32):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            assert close(sparse(x), dense(x))


def fixed_timing(monkeypatch, dense: float, sparse: float) -> list:
    """Make every ``auto`` measurement report these seconds; returns the list of measured situations."""
    calls = []

    def timed(*args, **kwargs):
        calls.append(args[2].shape)
        return dense, sparse

    monkeypatch.setattr(kernel_choice, "time_paths", timed)
    monkeypatch.setattr(execution_mod, "time_paths", timed)
    return calls


@pytest.mark.parametrize("kernels_win", [True, False])
def test_auto_follows_the_measured_choice_and_measures_each_situation_once(tmp_path, monkeypatch, kernels_win):
    pinned, _ = run(sparcl_cfg("on" if kernels_win else "off", tmp_path / "pinned"))
    calls = fixed_timing(monkeypatch, *((2.0, 1.0) if kernels_win else (1.0, 2.0)))
    auto, _ = run(sparcl_cfg("auto", tmp_path / "auto"))
    assert auto["accuracy"] == pinned["accuracy"] and auto["loss_per_epoch"] == pinned["loss_per_epoch"]
    assert auto["flops"] == pinned["flops"]
    choices = auto["kernel_choices"]
    # Training (forward and backward, batch 8) and evaluation situations, each measured once.
    assert len(calls) == len(choices) >= 2 and set(choices.values()) == {kernels_win}
    assert any(" fwd+bwd train density=0.10" in k for k in choices) and any(" fwd eval " in k for k in choices)
    calls.clear()  # a rerun on this machine reads the choices instead of measuring them again
    again, _ = run(sparcl_cfg("auto", tmp_path / "again"))
    assert not calls and again["kernel_choices"] == choices and again["accuracy"] == auto["accuracy"]


def test_auto_choices_are_resumed_from_the_checkpoint(tmp_path, monkeypatch):
    fixed_timing(monkeypatch, 2.0, 1.0)
    full, _ = run(sparcl_cfg("auto", tmp_path / "full"))
    run_interrupted(sparcl_cfg("auto", tmp_path / "cut"), tmp_path / "cut", at_task=2)
    for f in kernel_choice.cache_root().glob("*-choices.json"):
        f.unlink()  # the machine's record is gone; a fresh measurement would now say "dense"
    fixed_timing(monkeypatch, 1.0, 2.0)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss_per_epoch"] == full["loss_per_epoch"]


@pytest.mark.parametrize("backbone", ["resnet18", "lenet"])
def test_a_measurement_leaves_the_model_and_the_random_state_alone(backbone):
    dense, sparse, dm, sm, ex = masked_pair(backbone)
    ex.choices = kernel_choice.KernelChoices()
    x = torch.randn(4, *NETS[backbone][0])
    rng = torch.get_rng_state()
    out = sparse(x)  # measures (real timings), then runs the chosen path
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in sparse.parameters())
    assert len(ex.choices.decisions) >= 1
    # Only the real forward moved the BatchNorm statistics, as one forward of the dense network does.
    assert close(out, dense(x))
    for (n, bd), (_, bs) in zip(dense.named_buffers(), sparse.named_buffers()):
        assert close(bs.float(), bd.float()), n


@pytest.mark.parametrize("argv, message", [
    (["--method", "der++"], "method 'der++' does not support --sparse-kernels"),
    (["--method", "sparcl-der++", "--sparse-kernels", "maybe"], "unknown sparse_kernels 'maybe'"),
])
def test_impossible_sparse_kernel_requests_are_one_line_errors(capsys, argv, message):
    argv = ["run", "--benchmark", "digits", "--device", "cpu", "--sparse-kernels", *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
