"""The task loop end to end on the embedded digits benchmark: determinism, resume, results, errors."""
import json
import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import resume, run
from sparsecl.methods import METHODS, ContinualMethod
from interrupt import run_interrupted


def cfg(**kw):
    base = dict(method="der++", benchmark="digits", epochs=2, batch_size=16, seed=3, device="cpu",
                method_options={"lr": 0.05, "buffer_size": 50, "alpha": 0.3, "beta": 0.5})
    base.update(kw)
    return merge_config(base)


def test_result_has_measured_matrices_metrics_flops_and_timings(tmp_path):
    result, run_dir = run(cfg(), tmp_path / "r")
    assert result["complete"] and result["tasks_completed"] == 5
    cil = result["accuracy"]["class_il"]
    assert len(cil["matrix"]) == 5 and all(v is not None for row in cil["matrix"] for v in row)
    assert 0 <= cil["acc"] <= 100 and cil["bwt"] is not None and cil["fwt"] is not None
    til = result["accuracy"]["task_il"]
    assert til["acc"] >= cil["acc"]  # Task-IL only chooses among the task's own classes
    # Class-IL after task 1 cannot pick classes of later tasks: before training task j, Class-IL
    # accuracy on it is measured over classes up to j; after the last task everything is seen.
    assert result["flops"]["train"] > 0 and result["flops"]["ratio"] == pytest.approx(1.0)
    assert len(result["timing"]["train_seconds_per_task"]) == 5
    assert (run_dir / "result.json").exists() and (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "model.pt").exists()
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["accuracy"]["class_il"]["matrix"] == cil["matrix"]
    # DER++ trains on current + 2 buffer minibatches once the buffer is non-empty.
    assert result["samples"]["trained"] > 2 * 2 * sum(result["benchmark"]["train_sizes"])


def test_fine_tune_forgets_and_replay_helps():
    r_sgd, _ = run(cfg(method="sgd", epochs=3, method_options={"lr": 0.05}), "sgd")
    r_der, _ = run(cfg(epochs=3, method_options={"lr": 0.05, "buffer_size": 200, "alpha": 0.3, "beta": 0.5}), "der")
    sgd_cil = r_sgd["accuracy"]["class_il"]
    assert sgd_cil["acc"] < 40 and sgd_cil["forgetting"] > 50  # catastrophic forgetting
    assert r_der["accuracy"]["class_il"]["acc"] > sgd_cil["acc"] + 20


def test_same_seed_same_result_different_seed_different_result():
    a, _ = run(cfg(), "a")
    b, _ = run(cfg(), "b")
    c, _ = run(cfg(seed=4), "c")
    assert a["accuracy"] == b["accuracy"] and a["loss_per_epoch"] == b["loss_per_epoch"]
    assert a["loss_per_epoch"] != c["loss_per_epoch"]


def test_resume_after_interruption_gives_identical_result(tmp_path):
    full, full_dir = run(cfg(), tmp_path / "full")

    run_interrupted(cfg(), tmp_path / "cut", at_task=2)
    partial = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert partial["tasks_completed"] == 2 and not partial["complete"]
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["complete"]
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["loss_per_epoch"] == full["loss_per_epoch"]
    assert resumed["flops"]["train"] == full["flops"]["train"]
    w_full = torch.load(full_dir / "model.pt", weights_only=True)
    w_res = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run(cfg(epochs=1), tmp_path / "r")
    with pytest.raises(SparseCLError, match="already holds a run"):
        run(cfg(epochs=1), tmp_path / "r")


def test_nan_loss_is_a_clear_error():
    with pytest.raises(SparseCLError, match="loss became nan|loss became inf"):
        run(cfg(method="sgd", method_options={"lr": 1e30}), "nan")


def test_task_il_setting_trains_per_task_heads_and_reports_task_il_only():
    result, _ = run(cfg(method="er", setting="task-il", method_options={"lr": 0.05, "buffer_size": 50}), "til")
    assert set(result["accuracy"]) == {"task_il"}
    assert result["accuracy"]["task_il"]["acc"] > 80


def test_joint_trains_on_all_seen_data():
    result, _ = run(cfg(method="joint", epochs=3, method_options={"lr": 0.05}), "joint")
    sizes = result["benchmark"]["train_sizes"]
    # Task t trains on the union of tasks 0..t, 3 epochs each.
    assert result["samples"]["trained_per_task"] == [3 * sum(sizes[: t + 1]) for t in range(5)]
    assert result["accuracy"]["class_il"]["acc"] > 85


class _TaskOnly(ContinualMethod):
    name = "test-task-only"
    settings = frozenset({"task-il"})


def test_unsupported_setting_is_a_clear_error():
    METHODS.add(_TaskOnly.name, _TaskOnly)
    try:
        with pytest.raises(SparseCLError, match="supports only task-il"):
            run(cfg(method="test-task-only", method_options={}), "x")
    finally:
        METHODS.remove(_TaskOnly.name)


def test_method_can_leave_data_out_per_epoch_and_report_results(tmp_path):
    """epoch_indices(): the engine trains only on the positions a method keeps (DDR's removal),
    and counts only those samples; report() lands in result.json under "method"."""
    from sparsecl.methods.base import register_method

    class HalfData(ContinualMethod):
        name = "test-half-data"
        seen: list

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen = []

        def epoch_indices(self, task, epoch):
            n = len(task.train)
            return None if epoch == 0 else torch.arange(0, n, 2, device=self.device)  # even positions

        def observe(self, batch):
            self.seen.append((batch.task_id, batch.index.clone()))
            return super().observe(batch)

        def end_epoch(self, task, epoch):
            self.seen.append(("end", epoch))

        def report(self):
            # Positions seen in second epochs: all must be even.
            second, odd = False, 0
            for item in self.seen:
                if item[0] == "end":
                    second = item[1] == 0
                elif second:
                    odd += int((item[1] % 2 == 1).sum())
            return {"observed_batches": sum(1 for i in self.seen if i[0] != "end"), "odd_in_second_epoch": odd}

    register_method(HalfData)
    try:
        result, _ = run(cfg(method="test-half-data", method_options={"lr": 0.05}), tmp_path / "r")
    finally:
        METHODS.remove("test-half-data")
    sizes = result["benchmark"]["train_sizes"]
    # Epoch 0 sees every example once; epoch 1 only the even positions.
    assert result["samples"]["trained_per_task"] == [n + (n + 1) // 2 for n in sizes]
    assert result["method"]["odd_in_second_epoch"] == 0
    assert result["method"]["observed_batches"] == sum(-(-n // 16) + -(-((n + 1) // 2) // 16) for n in sizes)
