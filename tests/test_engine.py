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


# ------------------------------------------------------------------ the run directory
def test_second_run_on_a_locked_directory_fails_at_once_and_the_first_is_intact(tmp_path, capsys):
    """Two runs given one --out: while the first trains (it holds the lock), the second exits 2
    with one line, and the first finishes with its own results."""
    import subprocess
    import sys
    import time

    from sparsecl.cli import main

    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "sparsecl", "run", "--method", "sgd", "--epochs", "150", "--seed", "5",
                              "--device", "cpu", "--quiet", "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").exists():  # written once the lock is held
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert main(["run", "--method", "er", "--epochs", "1", "--seed", "6", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 2
    assert first.poll() is None  # the refusal came while the first was still training
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run directory {out} is in use by another run (pid {first.pid})" in err[0]
    assert first.wait(timeout=600) == 0, first.stderr.read()
    result = json.loads((out / "result.json").read_text())
    assert result["complete"] and result["config"]["method"] == "sgd" and result["seed"] == 5


def test_default_run_names_are_unique_within_one_second(monkeypatch):
    """A shell loop starting runs in the same second: each gets its own directory."""
    from pathlib import Path

    from sparsecl.engine import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "default_run_dir", lambda c: Path("runs") / "same-second")
    a, dir_a = run(cfg(epochs=1))
    b, dir_b = run(cfg(epochs=1, seed=4))
    assert dir_a == Path("runs/same-second") and dir_b == Path("runs/same-second-2")
    assert json.loads((dir_a / "result.json").read_text())["seed"] == 3
    assert json.loads((dir_b / "result.json").read_text())["seed"] == 4


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    """A directory mixing two runs (another run's checkpoint next to this config.yaml)."""
    import shutil

    run_interrupted(cfg(), tmp_path / "a", at_task=2)
    run_interrupted(cfg(seed=4), tmp_path / "b", at_task=2)
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(SparseCLError, match=r"checkpoint.pt belongs to another run than .*config.yaml \(seed: 4 -> 3\)"):
        resume(tmp_path / "a")


def test_resume_refuses_a_foreign_checkpoint(tmp_path):
    """A valid torch file that is no checkpoint, or one of another architecture without the
    configuration (older format): one line each, no traceback."""
    run_interrupted(cfg(), tmp_path / "a", at_task=2)
    ckpt_path = tmp_path / "a" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save({"weights": torch.zeros(3)}, ckpt_path)
    with pytest.raises(SparseCLError, match="is not a sparsecl checkpoint"):
        resume(tmp_path / "a")
    del ckpt["config"]
    first = next(iter(ckpt["model"]))
    ckpt["model"] = {k: torch.zeros(2, 2) for k in ckpt["model"]}  # another shape for every tensor
    torch.save(ckpt, ckpt_path)
    with pytest.raises(SparseCLError, match=rf"does not fit the run in .*its {first} is \(2, 2\), this run builds"):
        resume(tmp_path / "a")


def test_resume_removes_stale_temporary_files(tmp_path):
    run_interrupted(cfg(), tmp_path / "a", at_task=2)
    stale = tmp_path / "a" / ".checkpoint.pt.abc123.tmp"  # a write killed half-way
    stale.write_bytes(b"partial")
    result, _ = resume(tmp_path / "a")
    assert result["complete"] and not stale.exists()
    assert not list((tmp_path / "a").glob(".*.tmp"))


def test_complete_flag_is_written_after_every_final_file(tmp_path, monkeypatch):
    """result.json says complete only once model.pt (and task_views.pt) exist; killed between
    them, the run is not complete."""
    from sparsecl.engine import trainer as trainer_mod

    writes = []
    save, write_json = trainer_mod.atomic_torch_save, trainer_mod.atomic_write_json

    def logged_save(path, obj):
        writes.append(path.name)
        save(path, obj)

    def logged_json(path, obj):
        writes.append(f"{path.name} complete={obj['complete']}")
        write_json(path, obj)

    monkeypatch.setattr(trainer_mod, "atomic_torch_save", logged_save)
    monkeypatch.setattr(trainer_mod, "atomic_write_json", logged_json)
    run(cfg(method="packnet", setting="task-il", epochs=1, method_options={"lr": 0.05}), tmp_path / "r")
    assert writes[-3:] == ["model.pt", "task_views.pt", "result.json complete=True"]
    assert writes.count("result.json complete=True") == 1

    def killed(path, obj):
        if path.name == "model.pt":
            raise KeyboardInterrupt
        save(path, obj)

    monkeypatch.setattr(trainer_mod, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(epochs=1), tmp_path / "k")
    assert not json.loads((tmp_path / "k" / "result.json").read_text())["complete"]


def test_disk_full_during_a_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    import errno

    from sparsecl.engine import io as io_mod

    def full(obj, f):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_mod.torch, "save", full)
    with pytest.raises(SparseCLError) as e:
        run(cfg(epochs=1), tmp_path / "r")
    assert str(e.value) == f"cannot write {tmp_path / 'r' / 'checkpoint.pt'}: no space left on device"
    assert not list((tmp_path / "r").glob(".*.tmp"))  # the partial write is gone


def test_thread_count_is_recorded_in_config_and_result(tmp_path):
    from sparsecl.config import config_from_text

    result, run_dir = run(cfg(epochs=1), tmp_path / "r")
    assert result["threads"] == torch.get_num_threads()
    path = run_dir / "config.yaml"
    assert config_from_text(path.read_text(), path).threads == torch.get_num_threads()  # a resume re-applies it


def test_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    """Piped: a line per epoch with loss, samples/s and ETA, and one per tenth of a long epoch."""
    from rich.console import Console

    from sparsecl.engine import progress as progress_mod

    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)  # every epoch counts as long here
    bar = progress_mod.RunProgress(2, True, console=Console(stderr=True, force_terminal=False))
    assert bar.mode == "lines"
    with bar:
        for t in range(2):
            bar.start_task(t, 1)
            bar.start_epoch(20, samples=t * 640)
            for _ in range(20):
                bar.batch_done()
            bar.epoch_done(0.5, samples=(t + 1) * 640)
            bar.task_done()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 * (9 + 1)  # 10 %, ..., 90 %, then the epoch's own line
    assert lines[0].startswith("task 1/2 epoch 1/1: 10% of the epoch, ETA ")
    assert lines[9].startswith("task 1/2 epoch 1/1: loss 0.5000, ") and "samples/s, ETA " in lines[9]
    assert lines[-1].startswith("task 2/2 epoch 1/1: loss 0.5000, ") and "ETA" not in lines[-1]
    assert progress_mod.RunProgress(2, False).mode == "off"


def test_capabilities_are_class_keywords_and_distributed_ones_are_not_inherited():
    class Capable(ContinualMethod, graph_capturable=True, distributed=True):
        pass

    class ChangedStep(Capable):
        pass

    assert Capable.supports_distributed and Capable.supports_compile
    assert ChangedStep.graph_capturable and not ChangedStep.supports_distributed and not ChangedStep.supports_compile
    with pytest.raises(TypeError, match="declare supports_distributed as class keywords"):
        class Probed(ContinualMethod):
            supports_distributed = True


def test_the_method_context_is_complete_when_the_method_is_built(tmp_path):
    """A method may bind its masks in __init__: the FLOP and sample counters exist by then, and a
    Trainer reads no checkpoint until restore() (a corrupt one fails there, in one line)."""
    from sparsecl.engine.trainer import Trainer

    seen = {}

    class Probe(ContinualMethod):
        name = "probe-ctx"

        def __init__(self, model, options, ctx):
            super().__init__(model, options, ctx)
            seen["flops"], seen["count"] = ctx.flops, ctx.count_samples

    METHODS.add(Probe.name, Probe)
    try:
        (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
        trainer = Trainer(cfg(method="probe-ctx", method_options={}), tmp_path)
        assert seen["flops"] is trainer.flops and seen["count"] == trainer.counter.add
        with pytest.raises(SparseCLError, match="cannot resume: .*unreadable"):
            trainer.restore()
    finally:
        METHODS.remove(Probe.name)
