"""sparsecl sweep: grid expansion, parallel runs, restart after a kill; report plots."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsecl import SparseCLError
from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.sweep import load_grid

from interrupt import alive, run_interrupted

GRID = """
out: {out}
seeds: [0, 1]
base: {{benchmark: digits, epochs: 1, batch_size: 16, device: cpu}}
runs:
  - {{method: er, method_options: {{buffer_size: [20, 50], lr: 0.05}}}}
  - {{preset: default, epochs: 1}}
"""


def test_grid_expands_lists_and_seeds(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.format(out=tmp_path / "runs"))
    jobs, out = load_grid(grid)
    assert out == tmp_path / "runs"
    assert len(jobs) == 6 and len({j.name for j in jobs}) == 6
    buffers = sorted(j.config["method_options"]["buffer_size"] for j in jobs if j.config["method"] == "er")
    assert buffers == [20, 20, 50, 50]
    default = [j for j in jobs if j.name.startswith("default")]
    assert default[0].config["method"] == "der++" and default[0].config["epochs"] == 1  # entry overrides preset


def test_speed_options_name_their_runs(tmp_path):
    """The same preset with and without speed options (benchmarks/speed_table.py) gets distinct run
    directories named after the options."""
    grid = tmp_path / "g.yaml"
    grid.write_text("seeds: [0]\nruns:\n  - {preset: default}\n  - {preset: default, fused_optimizer: true, "
                    "compile: 'inductor:reduce-overhead'}\n")
    jobs, _ = load_grid(grid)
    assert [j.name for j in jobs] == ["default-s0", "default-fused_optimizer-compileinductor_reduce-overhead-s0"]
    assert jobs[1].config["compile"] == "inductor:reduce-overhead" and jobs[1].config["fused_optimizer"] is True


def test_bad_grid_is_one_clear_error(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("runs: [{method: er, method_options: {bogus: 1}}]\n")
    with pytest.raises(SparseCLError, match="has no option bogus"):
        load_grid(grid)
    grid.write_text("run: []\n")
    with pytest.raises(SparseCLError, match="unknown keys run"):
        load_grid(grid)


def test_sweep_runs_skips_finished_and_resumes_killed_runs(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.format(out=tmp_path / "runs"))
    jobs, out = load_grid(grid)
    killed = jobs[0]
    run_interrupted(merge_config(killed.config), out / killed.name, at_task=2)  # a run killed mid-way
    assert main(["sweep", str(grid), "--jobs", "2"]) == 0
    for job in jobs:
        result = json.loads((out / job.name / "result.json").read_text())
        assert result["complete"] and result["seed"] == job.config["seed"]
    log = capsys.readouterr().out
    assert "6 to run" in log and "6 of 6 runs complete" in log
    assert main(["sweep", str(grid)]) == 0  # restarted: nothing left to do
    assert "6 already complete, 0 to run" in capsys.readouterr().out
    # an edited base (or preset: neither is in the run names) no longer matches the finished runs:
    # refused, not silently skipped
    edited = tmp_path / "edited.yaml"
    edited.write_text(GRID.format(out=tmp_path / "runs").replace("batch_size: 16", "batch_size: 8"))
    assert main(["sweep", str(edited)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was run with another configuration (batch_size: 16 -> 8)" in err

    plots = tmp_path / "plots"
    assert main(["report", str(out), "--aggregate", "--plots", str(plots)]) == 0
    table, err = capsys.readouterr()
    assert table.count("0,1") == 3  # three configurations, two seeds each
    assert "wrote" not in table and err.count("wrote") == 3  # `> table.md` holds the table only
    for name in ("accuracy_matrices.png", "accuracy_vs_flops.png", "accuracy_per_task.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_an_entry_can_run_its_own_seeds(tmp_path):
    """`seeds:` inside an entry replaces the grid's seeds for that entry only; bad seeds are one error."""
    grid = tmp_path / "g.yaml"
    grid.write_text("seeds: [0, 1]\nruns:\n  - {preset: default}\n  - {preset: default, epochs: 2, seeds: [2, 3, 4]}\n")
    jobs, _ = load_grid(grid)
    assert [(j.config["seed"], j.config["epochs"]) for j in jobs] == [(0, 10), (1, 10), (2, 2), (3, 2), (4, 2)]
    assert all("seeds" not in j.config for j in jobs)
    grid.write_text("runs:\n  - {preset: default, seeds: 3}\n")
    with pytest.raises(SparseCLError, match="'seeds' must be a non-empty list of integers"):
        load_grid(grid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_no_run_outlives_a_killed_sweep(sig, tmp_path):
    """The sweep's runs die with it however it is killed; their directories stay resumable."""
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0, 1]\n"
                    "base: {epochs: 400, device: cpu}\nruns: [{method: sgd, benchmark: digits}]\n")
    sweep = subprocess.Popen([sys.executable, "-m", "sparsecl", "sweep", str(grid), "--jobs", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = [tmp_path / "runs" / f"sgd-digits-s{s}" / ".lock" for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(lock.exists() and lock.read_text().strip() for lock in locks):  # each run writes its pid
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    children = [int(lock.read_text()) for lock in locks]
    assert all(alive(pid) for pid in children)
    sweep.send_signal(sig)
    sweep.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, f"runs {children} outlived the sweep"
        time.sleep(0.05)


def test_sweep_data_dir_and_stop_after_identical_failures(tmp_path, capsys):
    """--data-dir reaches every run; three runs failing alike stop the sweep with one line; no
    directory is left for runs never started."""
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0, 1, 2, 3, 4]\n"
                    "base: {device: cpu, download: false}\nruns: [{method: sgd, benchmark: seq-mnist}]\n")
    assert main(["sweep", str(grid), "--data-dir", str(tmp_path / "nowhere")]) == 1
    out = capsys.readouterr().out
    stops = [line for line in out.splitlines() if "stopping" in line]
    assert len(stops) == 1 and "3 runs failed with:" in stops[0] and "nowhere" in stops[0]
    assert "0 of 5 runs complete, 3 failed (see sweep.log in their run directories), 2 not started" in out
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert dirs == ["sgd-seq-mnist-s0", "sgd-seq-mnist-s1", "sgd-seq-mnist-s2"]
    assert all(any(p.iterdir()) for p in (tmp_path / "runs").rglob("*") if p.is_dir())  # none empty


@pytest.mark.parametrize("how", ["flag", "env"])
def test_sweep_finds_data_with_data_dir_or_sparsecl_data(how, tmp_path, capsys, monkeypatch):
    """A grid without data_dir (as every grid in benchmarks/grids): the data comes from
    --data-dir or $SPARSECL_DATA, as for `sparsecl run`."""
    data = Path(__file__).parent / "fixtures" / "mnist-slice"
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0]\n"
                    "base: {device: cpu, download: false}\nruns: [{method: sgd, benchmark: seq-mnist}]\n")
    if how == "env":
        monkeypatch.setenv("SPARSECL_DATA", str(data))
    assert main(["sweep", str(grid), *(["--data-dir", str(data)] if how == "flag" else [])]) == 0
    assert "1 of 1 runs complete" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "sgd-seq-mnist-s0" / "result.json").read_text())["complete"]


def test_no_grid_names_a_data_directory():
    grids = sorted((Path(__file__).parents[1] / "benchmarks" / "grids").glob("*.yaml"))
    assert grids and not [g.name for g in grids if "data_dir" in g.read_text()]


def test_plot_axes_are_readable():
    """FLOPs within one decade get a linear axis with labelled ticks (a log axis would show none);
    over several decades a log axis; groups carry the spread over seeds for the error bars."""
    import matplotlib.pyplot as plt

    from sparsecl.plots import _flops_axis, _groups

    fig, (a, b) = plt.subplots(1, 2)
    a.plot([1.2e9, 3.5e9], [1, 2])
    _flops_axis(a, [1.2e9, 3.5e9])
    b.plot([1e8, 5e10], [1, 2])
    _flops_axis(b, [1e8, 5e10])
    fig.canvas.draw()
    assert a.get_xscale() == "linear" and len([t for t in a.get_xticklabels() if t.get_text()]) >= 3
    assert b.get_xscale() == "log"
    plt.close(fig)

    def result(seed, acc):
        return {"config": {"method": "er", "benchmark": "digits", "seed": seed, "method_options": {}},
                "tasks_completed": 2, "flops": {"train": 1e9 + seed},
                "accuracy": {"class_il": {"acc": acc, "matrix": [[100.0, None], [50.0, acc]]}}}

    (g,) = _groups([result(0, 60.0), result(1, 80.0)])
    assert g["n"] == 2 and g["acc"] == 70.0 and round(g["acc_sd"], 2) == 14.14
    assert list(g["curve"]) == [100.0, 60.0] and round(float(g["curve_sd"][1]), 2) == 7.07


def test_a_restarted_sweep_never_trains_a_locked_directory_twice(tmp_path, capsys):
    """A run of an earlier sweep still holds its directory: the restarted sweep's run of it stops
    at once with one line instead of training the same directory twice."""
    from sparsecl.engine.io import RunDirLock

    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.format(out=tmp_path / "runs"))
    jobs, out = load_grid(grid)
    held = RunDirLock(out / jobs[0].name)  # as the still-running run of the first sweep would
    try:
        assert main(["sweep", str(grid)]) == 1
    finally:
        held.release()
    log = capsys.readouterr().out
    assert "5 of 6 runs complete, 1 failed" in log
    assert f"{jobs[0].name} failed (sparsecl: error: run directory {out / jobs[0].name} is in use by another run" in log
