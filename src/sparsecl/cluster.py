"""Sweeps on a SLURM cluster through submitit: ``sparsecl sweep GRID --executor slurm --time 4:00:00``.

Each run of the grid is one job (or, with ``--array``, one element of a job array) that runs
``sparsecl run`` as the local executor does, on the CPUs SLURM gives it (OMP/MKL threads set to
them) and its GPU. ``--executor submitit-local`` takes the same submission path with submitit's
LocalExecutor: every job starts at once on this machine (what the tests use).

A job decides at run time, from its run directory, whether to start or resume its run, so a job
that SLURM requeues (preempted, or timed out: submitit signals it before the limit and requeues it,
:class:`SweepRun` being Checkpointable) continues after the run's last completed task. The sweep
waits for its jobs and reports them as the local executor does (RUN_DIR/sweep.log, the stop after
identical failures: the jobs not started yet are cancelled). Ctrl-C or SIGTERM of the sweep cancels
all its jobs; if the sweep itself is killed otherwise, they go on (a cluster's jobs outlive a
login shell), and a restarted sweep skips or resumes what they finished. Job logs and submitit's
files: OUT/submitit/JOB_ID/.
"""
from __future__ import annotations

import io
import os
import signal
import time
from contextlib import redirect_stderr
from pathlib import Path

import submitit
from submitit.core.core import Job
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from sparsecl import SparseCLError
from sparsecl.sweep import Children, ClusterOptions, Outcomes, SweepJob, execute, job_state, sigterm_as_interrupt

LOGS = "submitit"  # under the sweep's out: one folder per job
STOPPED = (-signal.SIGTERM, -signal.SIGKILL)  # how a run ends when the cluster stops its job
# seconds between looks at the jobs: a cluster's take minutes, and each look reads a shared file system
POLL_S = {"slurm": 10.0, "submitit-local": 1.0}


def job_cpus() -> int:
    """The CPUs this job has: SLURM's ``--cpus-per-task``, else those this process may run on."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        return int(slurm)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SweepRun(submitit.helpers.Checkpointable):
    """One run of a sweep as a job. Checkpointable: on preemption or timeout submitit requeues
    this same call, which then finds the run's checkpoint and resumes it."""

    def __init__(self, job: SweepJob, out: Path, data_dir: str | None, threads: int | None) -> None:
        self.job, self.out, self.data_dir, self.threads = job, out, data_dir, threads

    def __call__(self) -> tuple[str, float]:
        run_dir = self.out / self.job.name
        state = job_state(run_dir)
        print(f"sweep job: {self.job.name}: {state} ({run_dir})", flush=True)
        if state == "done":  # finished by this job's previous attempt, just before a requeue
            return "skipped", 0.0
        result, seconds, code = execute(self.job, run_dir, state, data_dir=self.data_dir, device=None,
                                        threads=self.threads or job_cpus(), children=Children())
        if code in STOPPED:
            # SLURM ends the job (scancel, preemption, its OOM killer): no result, so that a requeued
            # job is waited for (it resumes the run) and an ended one is reported by its state
            raise SystemExit(128 - code)
        return result, seconds


def make_executor(kind: str, out: Path, options: ClusterOptions) -> submitit.AutoExecutor:
    """A submitit executor for ``kind`` ('slurm' or 'submitit-local') with the user's options."""
    try:
        executor = submitit.AutoExecutor(folder=out / LOGS / "%j", cluster="slurm" if kind == "slurm" else "local")
    except RuntimeError:  # SlurmExecutor: no srun here
        raise SparseCLError("--executor slurm: no SLURM on this machine (srun not found); submit from the cluster's "
                            "login node, or try the grid here with --executor submitit-local") from None
    try:
        executor.update_parameters(
            name="sparsecl-sweep", timeout_min=options.minutes(), cpus_per_task=options.cpus_per_task,
            gpus_per_node=options.gpus_per_node, mem_gb=options.mem_gb, slurm_partition=options.partition,
            slurm_account=options.account, slurm_qos=options.qos, slurm_constraint=options.constraint,
            slurm_additional_parameters=options.slurm_opt or None, slurm_setup=options.setup or None,
            local_setup=options.setup or None, slurm_array_parallelism=options.array_parallelism)
    except (ValueError, TypeError, NameError, AssertionError) as e:  # submitit's checks of the values
        raise SparseCLError(f"cluster options: {str(e).splitlines()[0]}") from None
    return executor


def submit(executor: submitit.AutoExecutor, runs: list[SweepRun], array: bool) -> list[Job]:
    """One job per run (named after it), or one job array; nothing stays queued if one is refused."""
    jobs: list[Job] = []
    try:
        with redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too: it is said once, below
            if array:
                jobs = executor.submit_array(runs)
            else:
                for run in runs:
                    executor.update_parameters(name=run.job.name)
                    jobs.append(executor.submit(run))
    except BaseException as e:  # sbatch's refusal (a partition, an account, an option), or Ctrl-C
        for job in jobs:
            job.cancel(check=False)
        if not isinstance(e, (FailedJobError, FailedSubmissionError, OSError)):
            raise
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise SparseCLError(f"the jobs were not submitted: {lines[-1] if lines else type(e).__name__}") from None
    return jobs


def run_jobs(kind: str, todo: list[tuple[int, SweepJob, str]], out: Path, data_dir: str | None,
             options: ClusterOptions, outcomes: Outcomes) -> dict[str, str]:
    """Submit the runs, wait for them and report each; returns run name -> status."""
    out = out.resolve()  # the jobs may start elsewhere (a shared file system, another working directory)
    executor = make_executor(kind, out, options)
    threads = options.cpus_per_task  # None: each job finds its own (job_cpus)
    if threads is None and kind == "submitit-local":  # every job starts at once: the CPUs are split
        threads = max(1, (os.cpu_count() or 1) // len(todo))
    runs = [SweepRun(job, out, data_dir, threads) for _, job, _ in todo]
    with sigterm_as_interrupt():
        jobs = submit(executor, runs, options.array)
        outcomes.log(f"sweep: submitted {len(jobs)} jobs" + (" as one array" if options.array else "")
                     + f" (job logs in {out / LOGS})")
        pending = {run.job.name: (job, out / run.job.name) for run, job in zip(runs, jobs)}
        try:
            return _wait(pending, outcomes, POLL_S[kind])
        except BaseException:  # Ctrl-C or SIGTERM: as the local executor, no run outlives the sweep
            for job, _ in pending.values():
                job.cancel(check=False)
            raise


def _wait(pending: dict[str, tuple[Job, Path]], outcomes: Outcomes, poll_s: float) -> dict[str, str]:
    """Collect the jobs as they end (``pending`` shrinks with them); after the stopping failure the
    jobs still waiting for the cluster are cancelled ('not run')."""
    status: dict[str, str] = {}
    while pending:
        for name, (job, run_dir) in list(pending.items()):
            if not job.done():
                continue
            del pending[name]
            status[name], seconds = _result(job, run_dir)
            if outcomes.record(name, status[name], seconds):
                for waiting in [n for n, (j, _) in pending.items() if j.state == "PENDING"]:
                    pending.pop(waiting)[0].cancel(check=False)
                    status[waiting] = "not run"
        if pending:
            time.sleep(poll_s)
    return status


def _result(job: Job, run_dir: Path) -> tuple[str, float]:
    """The job's (status, seconds); a job that ended without one (out of memory or time, node
    failure, cancelled by hand) says so in RUN_DIR/sweep.log with submitit's account of it."""
    try:
        return job.result()
    except (FailedJobError, UncompletedJobError) as e:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sweep.log").write_text(f"job {job.job_id} ended without a result (state {job.state}); "
                                           f"its logs: {job.paths.folder}\n{e}\n")
        return f"failed (job ended without a result, state {job.state})", 0.0
