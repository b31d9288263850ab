"""NISPA: a fixed connection budget, stable units never rewired, earlier tasks kept exactly (issue 23)."""
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import run


def cfg(**kw):
    base = dict(method="nispa", benchmark="digits", setting="task-il", epochs=1, batch_size=32, seed=0,
                device="cpu", keep_checkpoints="all", method_options={"phase_epochs": 1, "max_phases": 6})
    base.update(kw)
    return merge_config(base)


@pytest.fixture(scope="module", params=["task-il", "class-il"])
def nispa_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("nispa") / request.param
    return run(cfg(setting=request.param), out)


def checkpoints(run_dir):
    return [torch.load(run_dir / f"checkpoint-task{t}.pt", weights_only=True) for t in range(1, 6)]


def layer_counts(masks):
    """Active connections per layer; the per-task heads together are the output layer."""
    counts = {n: int(m.sum()) for n, m in masks.items() if not n.startswith("head.")}
    counts["head"] = sum(int(m.sum()) for n, m in masks.items() if n.startswith("head."))
    return counts


def test_active_connections_stay_at_the_budget(nispa_run):
    result, run_dir = nispa_run
    cks = checkpoints(run_dir)
    shapes = {n: tuple(m.shape) for n, m in cks[0]["method"]["masks"]["masks"].items()}
    budget = layer_counts({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()})
    budget = {n: round(0.2 * k) if n != "head" else None for n, k in budget.items()}
    budget["head"] = sum(round(0.2 * torch.Size(s).numel()) for n, s in shapes.items() if n.startswith("head."))
    for ck in cks[:-1]:  # density 0.2 of every layer, the output layer included, after every task
        assert layer_counts(ck["method"]["masks"]["masks"]) == budget
    # In the last task every output is stable: what the output layer drops has nowhere to regrow
    # (as in the official code), and the run says how many connections that lost.
    last = layer_counts(cks[-1]["method"]["masks"]["masks"])
    assert {n: k for n, k in last.items() if n != "head"} == {n: k for n, k in budget.items() if n != "head"}
    unplaced = result["method"]["unplaced"]
    assert unplaced[:-1] == [0] * 4 and last["head"] + unplaced[-1] == budget["head"]
    first = cks[0]["method"]["masks"]["masks"]  # ... while connections did move: rewiring happened
    assert any(not torch.equal(cks[-1]["method"]["masks"]["masks"][n], m) for n, m in first.items())


def test_stable_units_incoming_connections_are_never_rewired_nor_changed(nispa_run):
    result, run_dir = nispa_run
    cks = checkpoints(run_dir)
    layers = ["backbone.net.1.weight", "backbone.net.3.weight"]
    assert sum(int(s.sum()) for s in cks[0]["method"]["stable"]) > 0
    for t in range(4):
        stable = cks[t]["method"]["stable"]
        for i, name in enumerate(layers):
            rows = stable[i]
            before_m, before_w = cks[t]["method"]["masks"]["masks"][name][rows], cks[t]["model"][name][rows]
            for later in cks[t + 1:]:
                assert torch.equal(later["method"]["masks"]["masks"][name][rows], before_m), name
                assert torch.equal(later["model"][name][rows], before_w), name
            # a stable unit reads from stable units (or inputs) only
            src = stable[i - 1] if i else torch.ones(before_m.shape[1], dtype=torch.bool)
            assert not before_m[:, ~src].any()


def test_earlier_tasks_task_il_accuracy_is_exactly_kept(nispa_run):
    result, _ = nispa_run
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(5):
        assert all(R[i][j] == R[j][j] for i in range(j, 5))
    assert result["accuracy"]["task_il"]["acc"] > 80
    rep = result["method"]
    assert len(rep["phases"]) == 5 and all(1 <= k <= 6 for k in rep["phases"])


def test_export_is_the_sparse_network_every_task_runs_on(nispa_run, tmp_path):
    from export_check import exported_task_il

    result, run_dir = nispa_run
    assert exported_task_il(run_dir, tmp_path / "m.pt", "csr") == result["accuracy"]["task_il"]["matrix"][-1]


def test_nispa_refuses_a_non_mlp_backbone():
    with pytest.raises(SparseCLError, match="needs the mlp backbone"):
        run(cfg(backbone="lenet"), "x")


@pytest.mark.parametrize("name, setting", [("seq-mnist-nispa", "task-il"), ("seq-mnist-nispa-cil", "class-il")])
def test_seq_mnist_presets_validate(name, setting):
    from sparsecl.config import build_options, load_preset
    from sparsecl.methods import METHODS

    p = load_preset(name)
    opts = build_options(METHODS.get(p["method"]).options_cls, p["method_options"], name)
    assert p["setting"] == setting and (opts.sparsity, opts.phase_epochs, opts.optimizer) == (0.8, 5, "adam")
