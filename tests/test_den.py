"""DEN: expansion only when the loss threshold is not met, split units recorded, per-task views (issue 23)."""
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import run

OPTS = {"lr": 0.01, "base_units": 40, "ex_k": 5, "loss_thr": 0.1}


def cfg(**kw):
    base = dict(method="den", benchmark="digits", setting="task-il", epochs=2, batch_size=32, seed=0,
                device="cpu", keep_checkpoints="all", backbone_options={"hidden": [60, 60]}, method_options=OPTS)
    base.update(kw)
    return merge_config(base)


@pytest.fixture(scope="module")
def den_run(tmp_path_factory):
    return run(cfg(), tmp_path_factory.mktemp("den") / "run")


def test_expands_exactly_when_the_loss_threshold_is_not_met(den_run):
    result, _ = den_run
    rep = result["method"]
    decided = rep["expanded"][1:]
    assert decided == [loss >= OPTS["loss_thr"] for loss in rep["select_loss"][1:]]
    assert True in decided and False in decided  # this stream has both cases
    for t in range(1, 5):  # the network grows on expansion tasks only
        assert (rep["size_total"][t] > rep["size_total"][t - 1]) == decided[t - 1]
        assert decided[t - 1] or (rep["added"][t] == [0, 0] and rep["split"][t] == [[], []])


def test_records_which_units_it_split(den_run):
    result, run_dir = den_run
    rep = result["method"]
    assert any(any(s) for s in rep["split"])
    for t in range(1, 5):
        before = torch.load(run_dir / f"checkpoint-task{t}.pt", weights_only=True)["method"]["stamp"]
        after = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)["method"]["stamp"]
        for level, units in enumerate(rep["split"][t]):
            assert all(0 <= int(before[level][u]) < t for u in units)  # only units of earlier tasks split
            opened = int(((after[level] == t) & (before[level] == -1)).sum())
            assert opened == rep["added"][t][level] + len(units)  # one copy per split unit


def test_earlier_tasks_never_see_later_units(den_run, tmp_path):
    from export_check import exported_task_il

    result, run_dir = den_run
    assert exported_task_il(run_dir, tmp_path / "m.pt") == result["accuracy"]["task_il"]["matrix"][-1]
    assert result["accuracy"]["task_il"]["acc"] > 80


def test_never_expands_under_a_loose_threshold(tmp_path):
    result, _ = run(cfg(keep_checkpoints="last", method_options={**OPTS, "loss_thr": 10.0}), tmp_path / "r")
    assert result["method"]["expanded"] == [False] * 5 and result["method"]["size_total"] == [1.0] * 5


def test_den_refuses_class_il():
    with pytest.raises(SparseCLError, match="supports only task-il"):
        run(cfg(setting="class-il"), "x")


def test_seq_mnist_preset_validates():
    from sparsecl.config import build_options, load_preset
    from sparsecl.methods import METHODS

    p = load_preset("seq-mnist-den")
    opts = build_options(METHODS.get(p["method"]).options_cls, p["method_options"], "seq-mnist-den")
    assert (opts.base_units, opts.ex_k, opts.loss_thr, opts.spl_thr) == (100, 10, 0.01, 0.05)
