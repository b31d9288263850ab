"""CPG: earlier tasks' weights bit-identical, their accuracy unchanged, picking selects a subset of
the old weights, and the network grows only below its target (issue 23)."""
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import run

OPTS = {"lr": 0.1, "base_units": 40, "grow_units": 20}


def cfg(**kw):
    base = dict(method="cpg", benchmark="digits", setting="task-il", epochs=2, batch_size=32, seed=0,
                device="cpu", keep_checkpoints="all", backbone_options={"hidden": [60, 60]}, method_options=OPTS)
    base.update(kw)
    return merge_config(base)


@pytest.fixture(scope="module")
def cpg_run(tmp_path_factory):
    return run(cfg(), tmp_path_factory.mktemp("cpg") / "run")


def test_earlier_tasks_weights_are_bit_identical(cpg_run):
    _, run_dir = cpg_run
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for t in range(4):
        ck = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)
        for name, o in ck["method"]["ownership"]["owner"].items():
            mine = o == t
            assert mine.any()
            assert torch.equal(final[name][mine], ck["model"][name][mine]), name
        for key, value in ck["model"].items():
            if key.startswith(f"head.heads.{t}."):
                assert torch.equal(final[key], value), key


def test_earlier_tasks_accuracy_is_exactly_unchanged(cpg_run):
    result, _ = cpg_run
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(5):
        assert all(R[i][j] == R[j][j] for i in range(j, 5))
    assert result["accuracy"]["task_il"]["bwt"] == 0 and result["accuracy"]["task_il"]["acc"] > 85


def test_picking_mask_selects_a_subset_of_old_weights(cpg_run):
    result, run_dir = cpg_run
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    owner = ck["ownership"]["owner"]
    fractions = []
    for t in range(1, 5):
        for name, picked in ck["picked"][t].items():
            old = (owner[name] >= 0) & (owner[name] < t)
            assert not (picked & ~old).any(), name  # only weights of earlier tasks are picked
            fractions.append(int(picked.sum()) / int(old.sum()))
    assert not ck["picked"][0] or not any(m.any() for m in ck["picked"][0].values())
    assert min(fractions) < 1.0 and max(fractions) > 0.0  # a real choice: neither none nor all
    assert result["method"]["picked"][0] is None and all(0 < p < 1 for p in result["method"]["picked"][1:])


def test_grows_only_below_the_target_and_reports_model_size(tmp_path):
    easy, _ = run(cfg(keep_checkpoints="last", method_options={**OPTS, "target": 0}), tmp_path / "easy")
    assert easy["method"]["grew"] == [0] * 5 and easy["method"]["size_total"] == [1.0] * 5
    assert easy["method"]["prune_ratio"] == [0.95] * 5  # every ratio meets a zero target
    hard, _ = run(cfg(keep_checkpoints="last", method_options={**OPTS, "lr": 0.01, "target": 99}), tmp_path / "hard")
    assert hard["method"]["grew"][0] == 1 and hard["method"]["grew"][1:] == [0] * 4  # no room left
    assert hard["method"]["size_total"][0] > 1.5 and hard["method"]["prune_ratio"] == [0.0] * 5


@pytest.mark.parametrize("fmt", ["pt", "csr"])
def test_export_reproduces_every_tasks_accuracy(cpg_run, tmp_path, fmt):
    from export_check import exported_task_il

    result, run_dir = cpg_run
    assert exported_task_il(run_dir, tmp_path / "m.pt", fmt) == result["accuracy"]["task_il"]["matrix"][-1]


def test_cpg_refuses_class_il():
    with pytest.raises(SparseCLError, match="supports only task-il"):
        run(cfg(setting="class-il"), "x")


def test_seq_mnist_preset_validates():
    from sparsecl.config import build_options, load_preset
    from sparsecl.methods import METHODS

    p = load_preset("seq-mnist-cpg")
    opts = build_options(METHODS.get(p["method"]).options_cls, p["method_options"], "seq-mnist-cpg")
    assert (opts.base_units, opts.grow_units, p["backbone_options"]["hidden"]) == (100, 50, [150, 150])
