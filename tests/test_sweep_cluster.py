"""sparsecl sweep on a cluster through submitit: --executor submitit-local runs the jobs here (the
submission path of --executor slurm), restart semantics as the local executor's; the sbatch
scripts carry the user's options; bad options are one line."""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sparsecl
from conftest import extra
from interrupt import alive, run_interrupted
from sparsecl.cli import main
from sparsecl.config import merge_config
from sparsecl.sweep import ClusterOptions, load_grid

GRID = """
out: {out}
seeds: [0, 1]
base: {{benchmark: digits, epochs: {epochs}, batch_size: 16, device: cpu}}
runs:
  - {{method: er, method_options: {{buffer_size: [20, 50], lr: 0.05}}}}
"""


def _grid(tmp_path: Path, epochs: int = 1) -> Path:
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID.format(out=tmp_path / "runs", epochs=epochs))
    return grid


def _job_logs(out: Path) -> dict[str, str]:
    """The stdout of every job, by job folder."""
    return {p.parent.name: p.read_text() for p in (out / "submitit").glob("*/*_log.out")}


@pytest.mark.extras
def test_submitit_local_runs_a_grid_skips_finished_and_resumes_checkpointed(tmp_path, capsys):
    extra("submitit")
    grid = _grid(tmp_path)
    jobs, out = load_grid(grid)
    killed = jobs[0]
    run_interrupted(merge_config(killed.config), out / killed.name, at_task=2)  # a run killed mid-way
    assert main(["sweep", str(grid), "--executor", "submitit-local", "--time", "10"]) == 0
    log = capsys.readouterr().out
    assert "4 to run" in log and "submitted 4 jobs" in log and "4 of 4 runs complete" in log
    for job in jobs:
        result = json.loads((out / job.name / "result.json").read_text())
        assert result["complete"]
        if job != killed:  # (the killed run was started in this process)
            assert result["threads"] == max(1, os.cpu_count() // 4)  # the CPUs split between the 4 jobs
    decisions = sorted(line.split(": ")[-1].split(" ")[0] for text in _job_logs(out).values()
                       for line in text.splitlines() if line.startswith("sweep job:"))
    assert decisions == ["new", "new", "new", "resume"]  # each job decided from its run directory
    assert f"sweep job: {killed.name}: resume" in "".join(_job_logs(out).values())

    assert main(["sweep", str(grid), "--executor", "submitit-local", "--time", "10"]) == 0  # restarted
    assert "4 already complete, 0 to run" in capsys.readouterr().out
    assert len(_job_logs(out)) == 4  # nothing was submitted again


def _fake_slurm(tmp_path: Path, monkeypatch, sbatch: str) -> Path:
    """srun and sbatch on PATH: sbatch runs the shell line ``sbatch`` with the job script as $1;
    returns BIN/sbatch-scripts (``"$0-scripts"`` in that line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", sbatch)):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "sbatch-scripts"


@pytest.mark.extras
def test_sbatch_scripts_carry_the_cluster_options(tmp_path, monkeypatch):
    """The options users set reach sbatch: one job per run (named after it) or one array."""
    extra("submitit")
    from sparsecl.cluster import SweepRun, make_executor, submit

    record = _fake_slurm(tmp_path, monkeypatch, 'cat "$1" >> "$0-scripts"; echo "Submitted batch job 4242"')
    jobs, out = load_grid(_grid(tmp_path))
    options = ClusterOptions(time="1:30:00", partition="gpu", gpus_per_node=1, cpus_per_task=4, mem_gb=8,
                             account="proj", qos="high", constraint="a100", slurm_opt={"mail_type": "END"},
                             setup=["module load cuda"], array=True, array_parallelism=2)
    runs = [SweepRun(job, out, None, 4) for job in jobs]
    submit(make_executor("slurm", out, options), runs, array=True)
    script = record.read_text()
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=8GB",
                 "--account=proj", "--qos=high", "--constraint=a100", "--mail-type=END", "--array=0-3%2"):
        assert f"#SBATCH {line}\n" in script
    assert "\nmodule load cuda\n" in script and f"--output={out / 'submitit'}/%A_%a/" in script
    record.unlink()
    options.array, options.array_parallelism = False, None
    submit(make_executor("slurm", out, options), runs[:2], array=False)
    script = record.read_text()
    assert script.count("#!/bin/bash") == 2 and "--array" not in script
    assert f"#SBATCH --job-name={jobs[0].name}\n" in script and f"#SBATCH --job-name={jobs[1].name}\n" in script


@pytest.mark.extras
def test_a_refused_submission_is_one_line(tmp_path, monkeypatch, capsys):
    extra("submitit")
    _fake_slurm(tmp_path, monkeypatch, 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    assert main(["sweep", str(_grid(tmp_path)), "--executor", "slurm", "--time", "10", "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == "sparsecl: error: the jobs were not submitted: sbatch: error: invalid partition specified: nope\n"


@pytest.mark.extras
def test_slurm_without_slurm_is_one_line(tmp_path, monkeypatch, capsys):
    extra("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert main(["sweep", str(_grid(tmp_path)), "--executor", "slurm", "--time", "10"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "srun not found" in err and "--executor submitit-local" in err


@pytest.mark.parametrize("argv, message", [
    (["--array"], "--array: only with --executor slurm or submitit-local"),
    (["--partition", "gpu", "--time", "10"], "--time, --partition: only with --executor slurm or submitit-local"),
    (["--executor", "slurm"], "--executor slurm needs --time"),
    (["--executor", "slurm", "--time", "1h"], "--time '1h': expected MINUTES, H:MM:SS or D-HH:MM:SS"),
    (["--executor", "slurm", "--time", "10", "--jobs", "2"], "--jobs is for --executor local"),
    (["--executor", "slurm", "--time", "10", "--devices", "cuda:0"], "--devices is for --executor local"),
    (["--executor", "slurm", "--time", "10", "--array-parallelism", "4"], "--array-parallelism needs --array"),
    (["--executor", "slurm", "--time", "10", "--gpus-per-node", "2"], "a sweep's run trains on one device"),
    (["--executor", "slurm", "--time", "10", "--cpus-per-task", "0"], "--cpus-per-task must be positive"),
    (["--executor", "slurm", "--time", "10", "--slurm-opt", "exclusive"], "--slurm-opt expects KEY=VALUE"),
    (["--executor", "slurmm"], "invalid choice: 'slurmm'"),
])
def test_bad_cluster_options_are_one_line(argv, message, tmp_path, capsys):
    grid = _grid(tmp_path)
    assert main(["sweep", str(grid), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_cluster_executors_without_submitit_name_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as where the extra is not installed
    monkeypatch.delitem(sys.modules, "sparsecl.cluster", raising=False)
    monkeypatch.delattr(sparsecl, "cluster", raising=False)
    assert main(["sweep", str(_grid(tmp_path)), "--executor", "submitit-local", "--time", "10"]) == 2
    assert capsys.readouterr().err == ("sparsecl: error: --executor slurm|submitit-local needs the optional "
                                       "'slurm' extra: pip install 'sparsecl[slurm]'\n")


def test_time_limits_in_slurm_formats():
    assert [ClusterOptions(time=t).minutes() for t in ("45", "1:30:00", "2-00:00:00", "0:00:30")] == [45, 90, 2880, 1]


def _run_pids(out: Path, names: list[str], sweep: subprocess.Popen) -> list[int]:
    """The pids of the runs once each holds its directory's lock."""
    locks = [out / name / ".lock" for name in names]
    deadline = time.monotonic() + 120
    while not all(lock.exists() and lock.read_text().strip() for lock in locks):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return [int(lock.read_text()) for lock in locks]


@pytest.mark.extras
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigterm_of_the_sweep_cancels_its_jobs(tmp_path):
    """As with the local executor, no run outlives a sweep stopped with SIGTERM (or Ctrl-C)."""
    extra("submitit")
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0]\nbase: {{epochs: 400, device: cpu}}\n"
                    "runs: [{method: sgd, benchmark: digits}]\n")
    sweep = subprocess.Popen([sys.executable, "-m", "sparsecl", "sweep", str(grid), "--executor", "submitit-local",
                              "--time", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = _run_pids(tmp_path / "runs", ["sgd-digits-s0"], sweep)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 130 and "interrupted; its runs were stopped" in sweep.stderr.read()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in runs):
        assert time.monotonic() < deadline, f"runs {runs} outlived the sweep"
        time.sleep(0.05)


@pytest.mark.extras
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_preempted_job_is_requeued_and_resumes_its_run(tmp_path, capsys):
    """submitit's preemption signal (SIGUSR2, as SLURM sends before a timeout or preemption) to a
    job whose run has a checkpoint: the job is requeued and its second attempt resumes the run."""
    extra("submitit")
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0]\nbase: {{epochs: 10, batch_size: 16, device: cpu}}\n"
                    "runs: [{method: sgd, benchmark: digits}]\n")
    run_dir = tmp_path / "runs" / "sgd-digits-s0"
    sweep = subprocess.Popen([sys.executable, "-m", "sparsecl", "sweep", str(grid), "--executor", "submitit-local",
                              "--time", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (run,) = _run_pids(tmp_path / "runs", [run_dir.name], sweep)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():  # the first task is done
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    with open(f"/proc/{run}/stat") as f:
        job_process = int(f.read().rsplit(")", 1)[1].split()[1])  # the run's parent: submitit's job
    os.kill(job_process, signal.SIGUSR2)
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0 and "1 of 1 runs complete" in out
    (log,) = _job_logs(tmp_path / "runs").values()
    assert "this job is preempted" in log and "Requeued job" in log
    assert f"sweep job: {run_dir.name}: new" in log and f"sweep job: {run_dir.name}: resume" in log
    assert json.loads((run_dir / "result.json").read_text())["complete"]


@pytest.mark.extras
def test_a_run_stopped_by_the_cluster_is_reported_by_its_job_state(tmp_path, monkeypatch, capsys):
    """A run ended by SIGTERM (scancel, a preemption) leaves its job without a result, so that a
    requeued job would be waited for; an ended one is a failure naming the job's state, with
    RUN_DIR/sweep.log pointing at the job's logs."""
    submitit = extra("submitit")
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 1)  # how long a result is awaited
    grid = tmp_path / "g.yaml"
    grid.write_text(f"out: {tmp_path / 'runs'}\nseeds: [0]\nbase: {{epochs: 400, device: cpu}}\n"
                    "runs: [{method: sgd, benchmark: digits}]\n")
    lock = tmp_path / "runs" / "sgd-digits-s0" / ".lock"

    def stop_the_run() -> None:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(lock.read_text()), signal.SIGTERM)

    stopper = threading.Thread(target=stop_the_run)
    stopper.start()
    assert main(["sweep", str(grid), "--executor", "submitit-local", "--time", "30"]) == 1
    stopper.join()
    assert "sgd-digits-s0 failed (job ended without a result, state FINISHED)" in capsys.readouterr().out
    log = (tmp_path / "runs" / "sgd-digits-s0" / "sweep.log").read_text()
    assert log.startswith("job ") and f"its logs: {tmp_path / 'runs' / 'submitit'}" in log
