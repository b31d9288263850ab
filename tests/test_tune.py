"""sparsecl tune: a search space from flags or YAML, an Optuna study shared by worker processes
through SQLite, pruning after each task, resuming after a kill, and a best preset that reproduces."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import extra
from sparsecl import SparseCLError
from sparsecl.cli import main
from sparsecl.engine import trainer as trainer_mod
from sparsecl.engine.loggers import RunObserver
from sparsecl.tune import parse_params, parse_spec

TINY = ["--method", "er", "--benchmark", "digits", "--device", "cpu", "--threads", "1"]
SPACE = ["--param", "lr=log:0.01:0.3"]


class CtrlCAtCall(RunObserver):
    """Records each task index started (in ``calls``) and presses Ctrl-C at the ``at``-th."""

    def __init__(self, calls, at):
        self.calls, self.at = calls, at

    def task_start(self, task):
        self.calls.append(task)
        if len(self.calls) == self.at:
            raise KeyboardInterrupt


def _summary(out: Path) -> dict:
    return json.loads((out / "tune.json").read_text())


def test_search_space_specs():
    lr, bs, policy = parse_params(["lr=log:1e-3:1e-1", "minibatch_size=int:8:64", "policy=choice:all,conv-linear"])
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-3, 1e-1, True)
    assert (bs.kind, bs.low, bs.high, bs.log) == ("int", 8, 64, False)
    assert policy.choices == ("all", "conv-linear")
    layer = {}
    for p, v in ((lr, 0.01), (parse_spec("epochs", "int:1:3"), 2), (parse_spec("backbone.nf", "int:8:32"), 16)):
        p.apply(layer, v)
    assert layer == {"method_options": {"lr": 0.01}, "epochs": 2, "backbone_options": {"nf": 16}}


def test_search_space_file_and_flags(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  lr: log:1e-3:1e-1\n  alpha: 0.1:1.0\n")
    params = parse_params(["alpha=0.2:0.5"], str(space))
    assert {p.name: (p.low, p.high) for p in params} == {"lr": (1e-3, 1e-1), "alpha": (0.2, 0.5)}  # flags win


@pytest.mark.parametrize("spec, message", [
    ("lr=0.3:0.1", "LOW < HIGH"), ("lr=log:0:1", "positive for log"), ("n=int:1.5:3", "integers"),
    ("lr=fast", "expected"), ("policy=choice:all", "at least two"), ("lr", "NAME=SPEC"),
    ("seed=int:0:9", "seed is set by the tune"),
])
def test_bad_search_space_is_one_clear_error(spec, message):
    with pytest.raises(SparseCLError, match=message):
        parse_params([spec])


def test_an_option_the_method_lacks_is_refused_before_any_trial(capsys):
    assert main(["tune", *TINY, "--param", "alpah=0.1:1.0", "--out", "t"]) == 2
    assert "method 'er' has no option alpah to search" in capsys.readouterr().err


def test_missing_optuna_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", *TINY, *SPACE, "--trials", "1", "--out", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "sparsecl: error: sparsecl tune needs the optional 'tune' extra: pip install 'sparsecl[tune]'"



def _trials(optuna, out: Path, state: str) -> list:
    if not (out / "tune.json").exists():  # written once the tune created the study's tables
        return []
    try:
        study = optuna.load_study(study_name="digits-er", storage=f"sqlite:///{out / 'study.db'}")
    except Exception:  # not created yet
        return []
    return [t for t in study.get_trials() if t.state.name == state]


def _wait_for_two_running_trials(optuna, out: Path, proc: subprocess.Popen) -> list:
    """Both workers in a trial, one of them past its first task."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        running = [t for t in _trials(optuna, out, "RUNNING") if "pid" in t.user_attrs]
        if len(running) == 2 and any((Path(t.user_attrs.get("run_dir", "-")) / "seed-0" / "checkpoint.pt").exists()
                                     for t in running):
            return running
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"two workers never ran trials at once: {proc.communicate()[0]}")


@pytest.mark.extras
def test_two_workers_share_a_study_resume_after_a_kill_and_the_best_preset_reproduces(tmp_path):
    optuna = extra("optuna")
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "sparsecl", "tune", *TINY, "--epochs", "10", *SPACE, "--trials", "4",
           "--workers", "2", "--pruner", "none", "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = _wait_for_two_running_trials(optuna, out, first)
    assert len({t.user_attrs["pid"] for t in running}) == 2  # two worker processes, one study
    first.send_signal(signal.SIGKILL)  # mid-trial: a task checkpointed, the run not complete
    first.communicate()
    # The workers get SIGTERM from Linux when the tune dies: they record their trials and exit.
    deadline = time.time() + 60
    while _trials(optuna, out, "RUNNING") and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "was interrupted; it runs again from its last completed task" in second.stderr
    summary = _summary(out)
    finished = [t for t in summary["trials"] if t["state"] == "complete"]
    assert len(finished) == 4 and summary["counts"]["running"] == 0
    resumed = [t for t in finished if "resume_of" in t]
    # The trial past its first task resumed in its own run directory (one that had not checkpointed
    # a task starts again in a new one).
    assert any(Path(t["run_dir"]).name == f"trial-{t['resume_of']:04d}" for t in resumed)
    assert len({t["threads"] for t in finished}) == 1
    # The best preset is a preset: `sparsecl run --preset-file` gives the best trial's accuracy.
    best = next(t for t in finished if t["number"] == summary["best"])
    preset = out / "best-preset.yaml"
    body = yaml.safe_load(preset.read_text())
    assert body["source"].startswith("sparsecl tune study 'digits-er'") and "validation" not in body
    assert body["method_options"]["lr"] == best["params"]["lr"]
    assert main(["run", "--preset-file", str(preset), "--validation", "0.1", "--threads", "1", "--device", "cpu",
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["accuracy"]["class_il"]["acc"] == best["values"][0]


@pytest.mark.extras
def test_an_interrupted_trial_resumes_to_the_uninterrupted_value(tmp_path, monkeypatch):
    extra("optuna")
    args = ["tune", *TINY, *SPACE, "--trials", "2", "--pruner", "none"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    calls = []  # task 3 of the second trial (5 tasks each) is the 8th task started
    loggers_for = trainer_mod.loggers_for
    monkeypatch.setattr(trainer_mod, "loggers_for", lambda *args: [CtrlCAtCall(calls, 8)])
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(trainer_mod, "loggers_for", loggers_for)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    plain, cut = _summary(tmp_path / "plain"), _summary(tmp_path / "cut")
    done = [t for t in cut["trials"] if t["state"] == "complete"]
    assert [t.get("resume_of") for t in done] == [None, 1]
    assert [t["values"] for t in done] == [t["values"] for t in plain["trials"]]


@pytest.mark.extras
def test_pruned_trials_stop_after_a_task_and_keep_their_checkpoint(tmp_path, capsys):
    extra("optuna")
    out = tmp_path / "t"
    assert main(["tune", *TINY, *SPACE, "--trials", "2", "--pruner", "below:101", "--out", str(out)]) == 0
    summary = _summary(out)
    assert [t["state"] for t in summary["trials"]] == ["pruned", "pruned"] and summary["best"] is None
    run = json.loads((Path(summary["trials"][0]["run_dir"]) / "seed-0" / "result.json").read_text())
    assert run["tasks_completed"] == 1 and not run["complete"]
    assert not (out / "best-preset.yaml").exists()
    assert "no trial completed" in capsys.readouterr().out


@pytest.mark.extras
def test_pareto_search_of_accuracy_and_flops(tmp_path):
    extra("optuna")
    out = tmp_path / "t"
    assert main(["tune", "--method", "snip-der++", "--benchmark", "digits", "--device", "cpu", "--threads", "1",
                 "--param", "sparsity=0.5:0.95", "--trials", "3", "--pareto", "--pruner", "none",
                 "--out", str(out)]) == 0
    summary = _summary(out)
    front = [t for t in summary["trials"] if t["number"] in summary["pareto_front"]]
    assert front and all(len(t["values"]) == 2 and t["values"][1] == t["flops_ratio"] for t in front)
    assert summary["best"] == max(front, key=lambda t: t["values"][0])["number"]
    assert (out / "best-preset.yaml").exists()


@pytest.mark.extras
def test_a_study_is_one_search(tmp_path, capsys):
    extra("optuna")
    out = tmp_path / "t"
    assert main(["tune", *TINY, *SPACE, "--trials", "1", "--out", str(out)]) == 0
    assert main(["tune", *TINY, "--param", "lr=0.01:0.3", "--trials", "2", "--out", str(out)]) == 2
    assert "is another search (space" in capsys.readouterr().err
    assert main(["tune", *TINY, *SPACE, "--study", "other", "--out", str(out)]) == 2
    assert f"{out} holds the trials of study 'digits-er'" in capsys.readouterr().err
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("description: my own\nmethod: er\n")
    assert main(["tune", *TINY, *SPACE, "--trials", "1", "--out", str(out), "--best-preset", str(foreign)]) == 2
    assert "is not this study's best preset" in capsys.readouterr().err
    assert foreign.read_text() == "description: my own\nmethod: er\n"


@pytest.mark.extras
def test_an_unusable_study_database_is_one_line(tmp_path, capsys):
    extra("optuna")
    sqlalchemy_exc = extra("sqlalchemy.exc")
    assert main(["tune", *TINY, *SPACE, "--storage", "bogus://x", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "sparsecl: error: cannot open study 'digits-er' in bogus://x:")
    from sparsecl.tune import TuneSettings, _storage_error

    try:  # how Optuna surfaces a database failure inside a trial: chained under its own error
        try:
            raise sqlalchemy_exc.OperationalError("UPDATE trials", {}, Exception("attempt to write a readonly database"))
        except Exception:
            raise AssertionError("Should not reach.")
    except AssertionError as e:
        err = _storage_error(e, TuneSettings(study="s", out=tmp_path))
    assert str(err) == f"the study database sqlite:///{tmp_path / 'study.db'} failed: attempt to write a readonly database"
    assert _storage_error(ValueError("mine"), TuneSettings(study="s", out=tmp_path)) is None


@pytest.mark.extras
def test_the_median_pruner_waits_for_the_second_task():
    """After one task every trial is near-perfect (nothing forgotten yet): pruning there would drop
    trials by noise. From the second task on, one below the median of the others stops."""
    optuna = extra("optuna")
    from sparsecl.tune import _pruner

    study = optuna.create_study(direction="maximize", pruner=_pruner(optuna, "median"))
    for _ in range(4):
        trial = study.ask()
        trial.report(99.8, 0)
        trial.report(95.0, 1)
        study.tell(trial, 90.0)
    late = study.ask()
    late.report(99.5, 0)
    assert not late.should_prune()
    late.report(80.0, 1)
    assert late.should_prune()


@pytest.mark.extras
def test_a_trial_over_several_seeds_is_their_mean_and_resumes_seed_by_seed(tmp_path, monkeypatch):
    extra("optuna")
    args = ["tune", *TINY, *SPACE, "--seeds", "0,1", "--trials", "1", "--pruner", "none"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    (trial,) = _summary(tmp_path / "plain")["trials"]
    runs = [json.loads((Path(trial["run_dir"]) / f"seed-{s}" / "result.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    accs = [r["accuracy"]["class_il"]["acc"] for r in runs]
    assert trial["class_il_acc_per_seed"] == accs and trial["values"] == [pytest.approx(sum(accs) / 2)]
    calls = []  # task 3 of seed 1 (5 tasks per run) is the 8th task started
    monkeypatch.setattr(trainer_mod, "loggers_for", lambda *args: [CtrlCAtCall(calls, 8)])
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    calls.clear()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert calls == [2, 3, 4]  # seed 0 is not trained again; seed 1 resumes after its task 2
    done = [t for t in _summary(tmp_path / "cut")["trials"] if t["state"] == "complete"]
    assert [t["values"] for t in done] == [trial["values"]]
    assert main(["tune", *TINY, *SPACE, "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "x")]) == 2
