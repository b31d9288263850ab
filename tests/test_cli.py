"""The command line: bad input is one clear line and a non-zero exit; list and report work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecl.cli import main
from sparsecl.methods import METHODS, ContinualMethod

FAST = ["--epochs", "1", "--device", "cpu", "--quiet"]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # exactly one line, no traceback
    return err[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--method", "nope"], "unknown method 'nope'"),
        (["run", "--benchmark", "nope"], "unknown benchmark 'nope'"),
        (["run", "--method", "er", "--buffer", "-1"], "--buffer must be >= 0"),
        (["run", "--epochs", "0"], "epochs must be >= 1"),
        (["run", "--method", "sgd", "--buffer", "10"], "has no option buffer_size"),
        (["run", "--method", "der++", "-o", "alpha=abc"], "alpha expects float"),
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--benchmark", "seq-mnist", "--data-dir", "/nonexistent/dir", "--no-download"], "/nonexistent/dir"),
        (["run", "--resume", "/nonexistent/run"], "cannot resume"),
        (["report", "/nonexistent/run"], "no run directory"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(argv, expected, capsys):
    code = main(argv + (FAST if argv[0] == "run" and "--epochs" not in argv else []))
    assert code != 0
    assert expected in error_line(capsys)


def test_argparse_errors_are_one_line_too(capsys):
    assert main(["run", "--epochs", "two"]) == 2
    assert "invalid int value" in error_line(capsys)


def test_task_il_only_method_asked_for_class_il(capsys):
    class TaskOnly(ContinualMethod):
        name = "test-task-only-cli"
        settings = frozenset({"task-il"})

    METHODS.add(TaskOnly.name, TaskOnly)
    try:
        assert main(["run", "--method", TaskOnly.name, "--setting", "class-il", *FAST]) == 2
        assert "supports only task-il" in error_line(capsys)
    finally:
        METHODS.remove(TaskOnly.name)


def test_list_shows_methods_benchmarks_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("der++", "er", "sgd", "joint", "seq-cifar10", "seq-mnist", "digits", "seq-cifar10-der++-500"):
        assert name in out


def test_run_then_report_markdown_and_csv(tmp_path, capsys):
    for seed in (0, 1):
        assert main(["run", "--method", "er", "--buffer", "50", "--seed", str(seed), "--out", str(tmp_path / f"er{seed}"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "Class-IL" in out and "Task-IL" in out and "FLOPs" in out
    assert main(["report", str(tmp_path), "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("method,")
    header, first = csv_lines[0].split(","), csv_lines[1].split(",")
    footprint = json.loads((tmp_path / "er0" / "result.json").read_text())["memory"]["footprint_bytes"]["total"]
    assert first[header.index("footprint (MB)")] == f"{footprint / 1e6:.2f}"
    assert main(["report", str(tmp_path), "--aggregate"]) == 0
    md = capsys.readouterr().out
    assert "±" in md and "0,1" in md


def test_cli_flags_override_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: er\nbenchmark: digits\nepochs: 3\nmethod_options: {lr: 0.01, buffer_size: 20}\n")
    assert main(["run", "--config", str(cfg), "--epochs", "1", "--buffer", "30", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]) == 0
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert r["config"]["epochs"] == 1
    assert r["config"]["method_options"] == {"lr": 0.01, "buffer_size": 30}


def test_module_entry_point_default_run(tmp_path):
    # `sparsecl run` with no arguments: the embedded default, printing the metrics table.
    proc = subprocess.run([sys.executable, "-m", "sparsecl"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for word in ("Class-IL", "Task-IL", "ACC", "BWT", "FWT", "forgetting", "training FLOPs", "wall time"):
        assert word in proc.stdout


def test_validation_run_is_scored_on_held_out_train_data(tmp_path):
    """A run with --validation reports on the held-out split and says so in result.json."""
    import json

    out = tmp_path / "val"
    rc = main(["run", "--validation", "0.2", "--epochs", "1", "--method", "sgd", "--quiet", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "result.json").read_text())
    assert r["benchmark"]["evaluated_on"] == "validation"
    full = [288, 288, 291, 288, 283]  # digits' training examples per task
    assert [a + b for a, b in zip(r["benchmark"]["train_sizes"], r["benchmark"]["eval_sizes"])] == full


def test_report_tells_apart_configurations_that_differ_in_options():
    """Aggregated rows of a sweep over lr (and an option only SparCL has) get an options label,
    and seeds of the same configuration are averaged together; shared options are not shown."""
    from sparsecl.report import render_table

    def result(method, seed, acc, **opts):
        return {"_path": f"r/{method}-{opts}-{seed}", "complete": True,
                "config": {"method": method, "benchmark": "seq-mnist", "seed": seed, "out": f"o{seed}", "epochs": 1,
                           "method_options": {"buffer_size": 500, "alpha": 1.0, **opts}},
                "accuracy": {"class_il": {"acc": acc}, "task_il": {"acc": 99.0}},
                "flops": {"train": 1e9, "ratio": 1.0}, "timing": {"train_seconds": 1.0}}

    results = [result("der++", s, 90.0 + s, lr=0.1) for s in (0, 1)]
    results += [result("sparcl-der++", s, 80.0 + s, lr=lr, delta_k=0.25) for s in (0, 1) for lr in (0.2, 0.3)]
    results.append(result("der++", 1, 91.0, lr=0.1))  # the same run again (another sweep entry): counted once
    lines = render_table(results, aggregate=True).splitlines()[2:]
    assert len(lines) == 3
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[3] for c in cells] == ["lr=0.1", "lr=0.2", "lr=0.3"]  # alpha and delta_k are shared
    assert all(c[4] == "0,1" and c[5] == "2" and c[6].endswith("± 0.71") for c in cells)  # 2 seeds each


def test_report_shows_an_option_set_by_only_some_runs_of_a_method():
    """`-o tdm=false` in one group of a sweep: its rows say so, even though the other rows leave
    tdm at its default rather than setting it."""
    from sparsecl.report import varied_options

    def result(**opts):
        return {"config": {"method": "sparcl-der++", "benchmark": "seq-mnist", "seed": 0,
                           "method_options": {"lr": 0.2, **opts}}}

    assert varied_options([result(dgm=False), result(tdm=False)]) == ["dgm=False", "tdm=False"]
    # an option that only one of two methods has is not a difference between the runs
    other = {"config": {"method": "der++", "benchmark": "seq-mnist", "seed": 0, "method_options": {"lr": 0.2}}}
    assert varied_options([result(delta_k=0.1), other]) == ["", ""]


def test_report_baseline_compares_with_that_methods_runs_of_the_same_protocol():
    """`report --baseline der++`: each row's Class-IL difference to and FLOPs ratio over DER++'s
    mean under the same protocol (epochs here); no DER++ of that protocol -> '-'; an incomplete
    DER++ run is no reference; two DER++ configurations under one protocol are refused."""
    from sparsecl import SparseCLError
    from sparsecl.report import render_table

    def result(method, seed, acc, flops, epochs=1, complete=True, **opts):
        return {"_path": f"r/{method}-{epochs}-{opts}-{seed}", "complete": complete,
                "config": {"method": method, "benchmark": "seq-mnist", "seed": seed, "epochs": epochs,
                           "method_options": {"buffer_size": 500, **opts}},
                "accuracy": {"class_il": {"acc": acc}, "task_il": {"acc": 99.0}},
                "flops": {"train": flops, "ratio": 1.0}, "timing": {"train_seconds": 1.0}}

    results = [result("der++", 0, 90.0, 4e9), result("der++", 1, 92.0, 4e9),
               result("der++", 2, 10.0, 1e9, complete=False),  # interrupted: not part of the reference
               result("sparcl-der++", 0, 88.0, 1e9), result("sparcl-der++", 1, 89.0, 1e9),
               result("sparcl-der++", 0, 80.0, 2e9, epochs=2)]  # no DER++ at 2 epochs
    lines = render_table(results, aggregate=True, baseline="der++").splitlines()
    assert lines[0].endswith("| Class-IL vs der++ | FLOPs / der++ |")
    cells = {(c[0], c[4]): c[-2:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells[("der++", "0,1")] == ["+0.00", "1.000"]
    assert cells[("sparcl-der++", "0,1")] == ["-2.50", "0.250"]  # 88.5 - 91.0, 1e9 / 4e9
    assert cells[("sparcl-der++", "0")] == ["-", "-"]
    per_run = render_table(results, baseline="der++")
    assert "| -3.00 | 0.250 |" in per_run  # seed 0 of SparCL against DER++'s mean
    with pytest.raises(SparseCLError, match="2 configurations of der\\+\\+ under one protocol"):
        render_table([*results, result("der++", 0, 91.0, 4e9, lr=0.1)], baseline="der++")
    with pytest.raises(SparseCLError, match="no complete sgd run"):
        render_table(results, baseline="sgd")


# --------------------------------------------- bad input: one line, non-zero exit, no traceback
NO_DATA = ["--benchmark", "seq-mnist", "--data-dir", "missing-data", "--no-download"]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda t: (t / "f").write_text("") or ["--out", str(t / "f")], "it is a file"),
        (lambda t: (t / "f").write_text("") or ["--out", str(t / "f" / "below")], "not a directory"),
        (lambda t: ["--out", "/proc/sparsecl-run"], "cannot create run directory /proc/sparsecl-run"),
        (lambda t: ["--out", "/sys/sparsecl-run"], "cannot create run directory /sys/sparsecl-run"),
    ],
    ids=["file", "below-a-file", "proc", "sys"],
)
def test_unusable_out_is_refused_before_data_is_loaded(make, expected, tmp_path, capsys):
    # the data is missing too: the --out error coming first shows it is checked before loading
    assert main(["run", *make(tmp_path), *NO_DATA, *FAST]) == 2
    assert expected in error_line(capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--device", "mps"], "device 'mps' is not supported"),
        (["--device", "meta"], "device 'meta' is not supported"),
        (["--device", "xpu:0"], "device 'xpu:0' is not supported"),
        (["--seed", str(2**70)], "seed must be an integer in [0, 2**32)"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**32)"),
        (["--backbone", "resnet18", "--backbone-opt", "nf=0"], "option nf must be positive, got 0"),
        (["--backbone-opt", "hidden=[0, 8]"], "option hidden must be positive"),
    ],
)
def test_bad_device_seed_and_backbone_option(argv, expected, capsys):
    assert main(["run", *argv, "--epochs", "1", "--quiet"]) == 2
    assert expected in error_line(capsys)


def test_binary_or_directory_config_is_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"\x00\xff\xfe\x81")
    assert main(["run", "--config", str(tmp_path / "bin.yaml"), *FAST]) == 2
    assert "is not a text file" in error_line(capsys)
    assert main(["run", "--config", str(tmp_path), *FAST]) == 2
    assert "is a directory, not a YAML file" in error_line(capsys)


def test_failed_run_leaves_no_empty_directory(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "a" / "b"), *NO_DATA, *FAST]) == 2
    assert "missing-data" in error_line(capsys)
    assert not (tmp_path / "a").exists()


def _one_run(tmp_path, name="r", *extra):
    assert main(["run", "--method", "er", "--buffer", "20", "--out", str(tmp_path / name), *extra, *FAST]) == 0


def test_report_skips_a_malformed_result_with_a_warning(tmp_path, capsys):
    _one_run(tmp_path)
    for name, text in (("bad-json", "{not json"), ("not-a-run", '{"config": 3}'), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(text)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2  # header + the one good run
    warnings = err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("sparsecl: warning: skipping ") for w in warnings)


def test_unwritable_report_output_plots_and_export_out(tmp_path, capsys):
    _one_run(tmp_path)
    (tmp_path / "file").write_text("")
    below = str(tmp_path / "file" / "x")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r"), "--output", below]) == 2
    assert f"cannot write {below}: not a directory" in error_line(capsys)
    assert main(["report", str(tmp_path / "r"), "--output", str(tmp_path / "t.md"), "--plots", below]) == 2
    assert f"cannot write plots to {below}: not a directory" in error_line(capsys)
    assert main(["export", str(tmp_path / "r"), "--out", below]) == 2
    assert f"cannot write {below}: not a directory" in error_line(capsys)


def test_resume_and_export_of_a_foreign_checkpoint_are_one_line(tmp_path, capsys):
    """Another run's (valid) checkpoint copied into a run directory."""
    import shutil

    _one_run(tmp_path, "a")
    _one_run(tmp_path, "b", "--seed", "1")
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a")]) == 2
    assert "belongs to another run than" in error_line(capsys)
    assert main(["run", "--resume", str(tmp_path / "a")]) == 2
    assert "belongs to another run than" in error_line(capsys)
    import torch

    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "a" / "checkpoint.pt")
    (tmp_path / "a" / "model.pt").unlink()
    assert main(["export", str(tmp_path / "a")]) == 2
    assert "do not fit the model of its result.json" in error_line(capsys)
    assert main(["run", "--resume", str(tmp_path / "a")]) == 2
    assert "is not a sparsecl checkpoint" in error_line(capsys)


# ------------------------------------------------------------------ defaults and messages
def test_matching_preset_is_used_and_said_unless_no_preset(capsys):
    """`--method der++ --benchmark seq-mnist --buffer 500` gets the tuned preset (what the README's
    table reports), with one line saying so; --no-preset gives the bare defaults."""
    from sparsecl.cli import build_config, make_parser
    from sparsecl.config import load_preset, merge_config

    argv = ["run", "--method", "der++", "--benchmark", "seq-mnist", "--buffer", "500"]
    cfg = build_config(make_parser().parse_args(argv))
    assert cfg == merge_config(load_preset("seq-mnist-der++-500"))
    assert capsys.readouterr().err.strip() == ("sparsecl: using the hyper-parameters of preset seq-mnist-der++-500 "
                                               "(--no-preset for the bare defaults)")
    bare = build_config(make_parser().parse_args([*argv, "--no-preset"]))
    assert bare.method_options == {"buffer_size": 500} and bare.batch_size == 32
    assert capsys.readouterr().err == ""
    lr = build_config(make_parser().parse_args([*argv, "--lr", "0.1"]))  # flags still override the preset
    assert lr.method_options["lr"] == 0.1 and lr.method_options["alpha"] == 1.0
    build_config(make_parser().parse_args(["run", "--method", "sparcl-der++", "--benchmark", "seq-mnist", "--buffer", "500"]))
    assert "tuned presets for this: seq-mnist-sparcl-der++-500-sp75, seq-mnist-sparcl-der++-500-sp90" in capsys.readouterr().err


def test_a_preset_file_is_a_preset(tmp_path, capsys):
    """A preset of one's own (e.g. `sparsecl tune`'s best): its description and source set nothing,
    its options are a preset layer under the flags; with --preset it is one error line."""
    from sparsecl.cli import build_config, make_parser
    from sparsecl.config import load_preset, merge_config

    own = tmp_path / "mine.yaml"
    own.write_text((Path(__file__).parents[1] / "src/sparsecl/presets/seq-mnist-der++-500.yaml").read_text())
    cfg = build_config(make_parser().parse_args(["run", "--preset-file", str(own), "--epochs", "2"]))
    assert cfg == merge_config(load_preset("seq-mnist-der++-500"), {"epochs": 2})
    assert main(["run", "--preset", "default", "--preset-file", str(own)]) == 2
    assert capsys.readouterr().err.strip() == "sparsecl: error: give --preset or --preset-file, not both"


def test_resume_says_which_flags_it_ignores(tmp_path, capsys):
    from interrupt import run_interrupted
    from sparsecl.config import merge_config

    run_interrupted(merge_config({"method": "sgd", "device": "cpu"}), tmp_path / "r", at_task=2)
    assert main(["run", "--resume", str(tmp_path / "r"), "--epochs", "3", "--lr", "0.5", "--device", "cpu", "--quiet"]) == 0
    assert "sparsecl: --resume continues the run's own configuration; ignoring --epochs, --lr" in capsys.readouterr().err


def test_ctrl_c_names_the_real_run_directory(capsys, monkeypatch):
    """A default-named run interrupted after two tasks: the message gives its directory."""
    from sparsecl.engine import trainer as trainer_mod

    from interrupt import CtrlCAtTask

    # The CLI takes no observer: the Ctrl-C comes in as the run's only logger.
    monkeypatch.setattr(trainer_mod, "loggers_for", lambda *args: [CtrlCAtTask(2)])
    assert main(["run", "--method", "sgd", *FAST]) == 130
    line = error_line(capsys)
    run_dir = next(iter(__import__("pathlib").Path("runs").iterdir()))
    assert line == (f"sparsecl: interrupted; 2 task(s) checkpointed in {run_dir} "
                    f"(continue with: sparsecl run --resume {run_dir})")


def test_piped_output_keeps_tags_and_does_not_wrap():
    """`sparsecl list | less`: one line per entry, however long, and the [class-il/task-il] tags."""
    proc = subprocess.run([sys.executable, "-m", "sparsecl", "list"], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    der = [line for line in lines if line.strip().startswith("der++ ")]
    assert len(der) == 1 and der[0].endswith("[class-il/task-il]")
    sections = ["methods", "benchmarks", "backbones", "presets"]
    assert [line for line in lines if not line.startswith("  ")] == sections  # no wrapped tails
    methods = lines[1:lines.index("benchmarks")]
    assert len(methods) == len(list(METHODS.items()))


def test_piped_run_prints_a_line_per_epoch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsecl", "run", "--method", "sgd", "--epochs", "2", "--device", "cpu",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("task ")]
    assert len(lines) == 10  # 5 tasks x 2 epochs
    assert lines[0].startswith("task 1/5 epoch 1/2: loss ") and "samples/s, ETA " in lines[0]
    assert lines[-1].startswith("task 5/5 epoch 2/2: loss ") and "ETA" not in lines[-1]
    table = [line for line in proc.stdout.splitlines() if "Class-IL" in line]
    assert len(table) == 1  # the result table, on stdout, one row per setting
    summary = [line for line in proc.stdout.splitlines() if line.startswith("training FLOPs")]
    assert len(summary) == 1 and len(summary[0]) > 80 and summary[0].endswith("samples/s")  # not wrapped


def test_aggregate_shows_seed_count_and_no_spread_for_one_seed():
    from sparsecl.report import render_table

    def result(seed, acc, lr):
        return {"_path": f"r/{lr}-{seed}", "complete": True,
                "config": {"method": "er", "benchmark": "digits", "seed": seed, "method_options": {"lr": lr}},
                "accuracy": {"class_il": {"acc": acc}, "task_il": {"acc": 99.0}},
                "flops": {"train": 1e9, "ratio": 1.0}, "timing": {"train_seconds": 1.0}}

    lines = render_table([result(0, 90.0, 0.1), result(1, 92.0, 0.1), result(0, 80.0, 0.2)], aggregate=True).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    seeds, acc = header.index("seeds"), header.index("Class-IL ACC")
    assert [(r[seeds], r[acc]) for r in rows] == [("2", "91.00 ± 1.41"), ("1", "80.00")]
