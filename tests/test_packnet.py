"""PackNet: earlier tasks' weights stay bit-identical and their accuracy unchanged (issue 3)."""
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import run


def cfg(**kw):
    base = dict(method="packnet", benchmark="digits", setting="task-il", epochs=2, batch_size=16, seed=0,
                device="cpu", keep_checkpoints="all", method_options={"lr": 0.1, "retrain_epochs": 1})
    base.update(kw)
    return merge_config(base)


@pytest.fixture(scope="module")
def packnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("packnet") / "run"
    result, run_dir = run(cfg(), out)
    return result, run_dir


def test_earlier_tasks_accuracy_is_exactly_unchanged(packnet_run):
    result, _ = packnet_run
    R = result["accuracy"]["task_il"]["matrix"]
    for j in range(5):
        for i in range(j, 5):
            assert R[i][j] == R[j][j]  # measured after every task, not assumed
    assert result["accuracy"]["task_il"]["bwt"] == 0 and result["accuracy"]["task_il"]["acc"] > 80


def test_earlier_tasks_weights_are_bit_identical(packnet_run):
    _, run_dir = packnet_run
    final = torch.load(run_dir / "model.pt", weights_only=True)
    for t in range(4):
        ck = torch.load(run_dir / f"checkpoint-task{t + 1}.pt", weights_only=True)
        owner = ck["method"]["ownership"]["owner"]
        assert owner, "no isolated parameters"
        for name, o in owner.items():
            mine = o == t
            assert mine.any()
            assert torch.equal(final[name][mine], ck["model"][name][mine]), name
        for key, value in ck["model"].items():  # task t's head is frozen whole after task t
            if key.startswith(f"head.heads.{t}."):
                assert torch.equal(final[key], value), key


def test_tasks_own_disjoint_shares_and_pruned_weights_are_zero(packnet_run):
    _, run_dir = packnet_run
    owner = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]["ownership"]["owner"]
    first = torch.load(run_dir / "checkpoint-task1.pt", weights_only=True)
    for name, o in owner.items():
        counts = [int((o == t).sum()) for t in range(5)]
        # 1/(tasks left) of the free weights each: every task about a fifth, the last the rest.
        assert all(abs(c / o.numel() - 0.2) < 0.01 for c in counts) and sum(counts) == o.numel()
        # After task 1 its pruned weights (free again) are exactly zero.
        free_after_1 = first["method"]["ownership"]["owner"][name] == -1
        assert free_after_1.any() and not first["model"][name][free_after_1].any()


def test_packnet_refuses_class_il():
    with pytest.raises(SparseCLError, match="supports only task-il"):
        run(cfg(setting="class-il"), "x")


@pytest.mark.parametrize("fmt", ["pt", "csr"])
def test_export_reproduces_every_tasks_accuracy(packnet_run, tmp_path, fmt):
    from export_check import exported_task_il

    result, run_dir = packnet_run
    final_row = result["accuracy"]["task_il"]["matrix"][-1]
    assert exported_task_il(run_dir, tmp_path / "m.pt", fmt) == final_row
    # Without the per-task views every task would see all later tasks' weights: accuracy changes.
    assert exported_task_il(run_dir, tmp_path / "m2.pt", fmt, per_task=False) != final_row


def test_forward_transfer_reference_is_the_random_init_network(packnet_run, tmp_path):
    """Before any task, PackNet evaluates the random-init network (all its weights), the same one
    fine-tuning starts from with the same seed, not a backbone with every weight masked out."""
    result, _ = packnet_run
    sgd, _ = run(cfg(method="sgd", epochs=1, method_options={"lr": 0.1}), tmp_path / "sgd")
    ref = result["accuracy"]["task_il"]["random_init"]
    assert ref == sgd["accuracy"]["task_il"]["random_init"]
