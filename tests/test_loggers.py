"""--tensorboard and --wandb log through their own libraries what result.json records (the loss per
epoch; per task accuracies, FLOPs, time, speed, density, footprint, capacity; the accuracy-matrix
heatmap), a resumed run shows every step once, and a missing library is one error line naming the
pip command, before anything trains."""
import json
import subprocess
import sys

import pytest

from conftest import extra
from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.engine.loggers import RunObserver
from sparsecl.engine.trainer import RunInterrupted, resume, run
from sparsecl.report import config_key

EPOCHS = 2
SPARSE = {"benchmark": "digits", "epochs": EPOCHS, "batch_size": 32, "device": "cpu", "seed": 0,
          "method": "snip-der++", "method_options": {"buffer_size": 50, "lr": 0.05, "sparsity": 0.8}}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb without a network or the user's home: offline mode, settings and caches in tmp_path."""
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def expected_scalars(result):
    """From result.json alone: {("epoch" | "task", step): {tag: value}}. Density, footprint and
    capacity are recorded for the last task only, so they are expected there only."""
    out = {}
    losses = [loss for per_task in result["loss_per_epoch"] for loss in per_task]
    for step, loss in enumerate(losses, 1):
        out[("epoch", step)] = {"train/loss": loss, "train/task": (step - 1) // EPOCHS + 1}
    T = result["n_tasks"]
    for t in range(T):
        values = {"flops/train_cumulative": sum(result["flops"]["per_task"][:t + 1]),
                  "time/train_seconds": result["timing"]["train_seconds_per_task"][t],
                  "speed/samples_per_second": result["timing"]["samples_per_second"][t]}
        for key, acc in result["accuracy"].items():
            row = acc["matrix"][t][:t + 1]
            values[f"accuracy/{key}"] = sum(row) / len(row)
            values.update({f"accuracy_per_task/{key}/task_{j + 1}": a for j, a in enumerate(row)})
        out[("task", t + 1)] = values
    last = out[("task", T)]
    last["accuracy/class_il"] = result["accuracy"]["class_il"]["acc"]
    last["flops/train_cumulative"] = result["flops"]["train"]
    last["flops/ratio_to_dense"] = result["flops"]["ratio"]
    last["memory/footprint_bytes"] = result["memory"]["footprint_bytes"]["total"]
    last["density/overall"] = result["sparsity"]["overall"]["density"]
    last.update({f"density_per_layer/{name}": layer["weight_density"]
                 for name, layer in result["sparsity"]["per_layer"].items() if layer["masked"]})
    if result["capacity"] and result["capacity"].get("value") is not None:
        last["capacity"] = result["capacity"]["value"]
    return out


def tensorboard_scalars(run_dir):
    """What TensorBoard shows: {tag: [(step, value), ...]} read by its EventAccumulator."""
    accumulator = extra("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return acc, scalars


def wandb_records(wandb_file):
    """The records of an offline run's .wandb file, read with wandb's own reader of that file
    (``wandb leet inspect --json``: one JSON record per line)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def of_type(records, kind):
    return [r[kind] for r in records if r["type"] == kind]


def wandb_files(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def check_against(expected, observed, rel=1e-6):
    """Every expected (axis, step) tag value was logged once with that value (float32 in TensorBoard)."""
    for (axis, step), values in expected.items():
        for tag, value in values.items():
            got = observed.get(tag, {}).get(step)
            assert got is not None, (axis, step, tag)
            assert got == pytest.approx(value, rel=rel), (axis, step, tag)


@pytest.mark.extras
def test_tensorboard_event_files_match_result_json(tmp_path):
    extra("tensorboard")
    result, run_dir = run(merge_config({**SPARSE, "tensorboard": True}), tmp_path / "run")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc, scalars = tensorboard_scalars(run_dir)
    for tag, events in scalars.items():
        steps = [s for s, _ in events]
        assert len(steps) == len(set(steps)), tag
    check_against(expected_scalars(result), {tag: dict(events) for tag, events in scalars.items()})
    assert any(tag.startswith("density_per_layer/") for tag in scalars)
    T = result["n_tasks"]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, T * EPOCHS + 1))
    for key in ("class_il", "task_il"):  # the heatmap after every task, a PNG
        images = acc.Images(f"accuracy_matrix/{key}")
        assert [i.step for i in images] == list(range(1, T + 1))
        assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.extras
def test_wandb_offline_run_files_hold_the_same_scalars(tmp_path, offline_wandb):
    extra("wandb")
    result, run_dir = run(merge_config({**SPARSE, "wandb": "sparsecl-test"}), tmp_path / "run")
    (wandb_file,) = wandb_files(run_dir)
    records = wandb_records(wandb_file)
    (wandb_run,) = of_type(records, "run")
    assert wandb_run["run_id"] == (run_dir / "wandb-run-id").read_text()
    assert wandb_run["config"]["update"]["method_options"]["sparsity"] == 0.8  # the run's configuration
    rows = [h["item"] for h in of_type(records, "history")]
    observed = {}
    for row in rows:
        axis = "epoch" if "epoch" in row and "train/loss" in row else "task"
        for tag, value in row.items():
            if not tag.startswith("_") and tag not in ("epoch", "task"):
                assert row[axis] not in observed.setdefault(tag, {}), (tag, row[axis])  # logged once
                observed[tag][row[axis]] = value
    check_against(expected_scalars(result), observed, rel=1e-9)
    T = result["n_tasks"]
    assert sorted(observed["train/loss"]) == list(range(1, T * EPOCHS + 1))
    assert sorted(observed["accuracy/task_il"]) == list(range(1, T + 1))
    last = [row for row in rows if row.get("task") == T and "accuracy_matrix/class_il.path" in row]
    assert len(last) == 1 and last[0]["accuracy_matrix/class_il._type"] == "image-file"
    assert (wandb_file.parent / "files" / last[0]["accuracy_matrix/class_il.path"]).is_file()


class StopAt(RunObserver):
    """An observer that stops the run (as Ctrl-C would) after epoch ``step`` was logged."""

    def __init__(self, step):
        self.step = step

    def epoch(self, step, task, loss):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.extras
def test_a_resumed_run_logs_every_step_once(tmp_path, offline_wandb):
    """Stopped in the first epoch of task 2, after the loggers saw it, then resumed from the task 1
    checkpoint: TensorBoard (purge_step) and W&B (losses sent per completed task) show every epoch
    and task once, with the values of the finished run, in one W&B run."""
    extra("tensorboard")
    extra("wandb")
    cfg = merge_config({**SPARSE, "tensorboard": True, "wandb": "sparsecl-test"})
    with pytest.raises(RunInterrupted):
        run(cfg, tmp_path / "run", observers=[StopAt(EPOCHS + 1)])
    run_dir = tmp_path / "run"
    (first,) = run_dir.glob("tensorboard/events.out.tfevents.*")
    _, before = tensorboard_scalars(run_dir)
    assert [s for s, _ in before["train/loss"]] == list(range(1, EPOCHS + 2))  # the stopped epoch is in the file
    result, _ = resume(run_dir)
    T = result["n_tasks"]
    expected = expected_scalars(result)

    _, scalars = tensorboard_scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, T * EPOCHS + 1))
    assert [s for s, _ in scalars["accuracy/class_il"]] == list(range(1, T + 1))
    check_against(expected, {tag: dict(events) for tag, events in scalars.items()})

    files = wandb_files(run_dir)
    assert len(files) == 2  # one per part, both of the same W&B run
    parts = [wandb_records(f) for f in files]
    assert {r["run_id"] for part in parts for r in of_type(part, "run")} == {(run_dir / "wandb-run-id").read_text()}
    rows = [h["item"] for part in parts for h in of_type(part, "history")]
    epochs = sorted(row["epoch"] for row in rows if "train/loss" in row)
    tasks = sorted(row["task"] for row in rows if "accuracy/class_il" in row)
    assert epochs == list(range(1, T * EPOCHS + 1)) and tasks == list(range(1, T + 1))
    losses = {row["epoch"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == pytest.approx({step: v["train/loss"] for (axis, step), v in expected.items() if axis == "epoch"})


@pytest.mark.parametrize("flag, modules, extra_name", [
    (["--tensorboard"], ("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    (["--wandb", "proj"], ("wandb",), "wandb"),
])
def test_a_missing_logger_library_is_one_error_line(flag, modules, extra_name, monkeypatch, capsys, tmp_path):
    for module in modules:  # importing it now fails, as where the extra is not installed
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "r"
    assert main(["run", *flag, "--benchmark", "digits", "--method", "sgd", "--epochs", "1", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'sparsecl[{extra_name}]'" in err[0], err
    assert not out.exists()  # refused before the run directory was written


def test_loggers_do_not_make_another_configuration():
    plain = merge_config({"method": "er"}).to_dict()
    logged = merge_config({"method": "er", "tensorboard": True, "wandb": "proj"}).to_dict()
    assert config_key(plain) == config_key(logged)


@pytest.mark.extras
def test_a_refused_wandb_login_is_one_error_line(monkeypatch, capsys, tmp_path):
    wandb = extra("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\nSee the docs.")

    monkeypatch.setattr(wandb, "init", refuse)
    assert main(["run", "--wandb", "proj", "--benchmark", "digits", "--method", "sgd", "--epochs", "1",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsecl: error: --wandb proj: No API key configured. Use `wandb login` to log in."], err
