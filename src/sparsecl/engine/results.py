"""result.json, typed: what a run reports after every task and at its end (:class:`RunResult`).

The trainer records a run's raw measurements in its checkpointed state; the functions here turn
that state into the report. ``RunResult.to_json()`` is the file's content (the keys in this order).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import sparsecl
from sparsecl.metrics.accuracy import summarize
from sparsecl.sparse.flops import CONVENTIONS, FlopCounter

FLOP_NOTE = ("2 FLOPs per MAC of conv/linear layers; spec: backward = 2x forward for every trained sample; "
             "sparcl-paper: replayed samples one forward, gradient masks scale the whole backward, task-end "
             "passes not charged; selection (importance backward passes) apart; BN and activations omitted")


@dataclass
class Accuracy:
    """One setting's accuracy matrix R[i][j] (after task i, on task j; None = not yet) and its metrics
    over the completed tasks."""

    matrix: list[list[float | None]]
    random_init: list[float] | None  # the untrained model's accuracy per task (forward transfer's b_j)
    acc: float | None
    bwt: float | None
    fwt: float | None
    forgetting: float | None


@dataclass
class Timing:
    train_seconds_per_task: list[float]
    eval_seconds_per_task: list[float]
    train_seconds: float
    samples_per_second: list[float | None]


@dataclass
class Samples:
    trained_per_task: list[int]
    trained: int
    forward_only: int


@dataclass
class Memory:
    footprint_bytes: dict[str, Any] | None  # the formula's footprint of the model as the last task left it
    peak_bytes_per_task: list[int | None]
    peak_kind: str


@dataclass
class RunResult:
    """Everything ``result.json`` holds (see docs/results and the README for each field's meaning)."""

    complete: bool  # every task trained and every final file written
    tasks_completed: int
    n_tasks: int
    config: dict[str, Any]
    seed: int
    versions: dict[str, str]
    device: str
    threads: int  # results are identical for the same seed and thread count
    distributed: dict[str, Any] | None  # world size, backend, per-rank batch under torchrun
    benchmark: dict[str, Any]
    accuracy: dict[str, Accuracy]  # "class_il" (Class-IL runs) and "task_il"
    timing: Timing
    samples: Samples
    flops: dict[str, Any]
    method: dict[str, Any]  # the method's own report
    sparsity: dict[str, Any] | None
    capacity: dict[str, Any] | None
    model: dict[str, Any]
    memory: Memory
    loss_per_epoch: list[list[float | None]]
    kernel_choices: dict[str, Any] | None  # --sparse-kernels auto only

    def to_json(self) -> dict[str, Any]:
        """The JSON object of result.json (the two optional sections only when present)."""
        out = asdict(self)
        for key in ("distributed", "kernel_choices"):
            if out[key] is None:
                del out[key]
        return out


def versions() -> dict[str, str]:
    return {"sparsecl": sparsecl.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def accuracy_results(state: dict[str, Any], settings: list[str]) -> dict[str, Accuracy]:
    """Each setting's matrix with its metrics over the ``state["completed"]`` tasks."""
    done, init = state["completed"], state["random_init"]
    out = {}
    for key in settings:
        R = [row[:done] for row in state[key][:done]]
        metrics = summarize(R, init[key][:done]) if done else dict.fromkeys(("acc", "bwt", "fwt", "forgetting"))
        out[key] = Accuracy(matrix=state[key], random_init=init[key] if init else None, **metrics)
    return out


def timing_result(state: dict[str, Any]) -> Timing:
    seconds = state["train_seconds"]
    return Timing(train_seconds_per_task=seconds, eval_seconds_per_task=state["eval_seconds"],
                  train_seconds=sum(seconds),
                  samples_per_second=[n / t if t > 0 else None for n, t in zip(state["samples"], seconds)])


def flops_result(state: dict[str, Any], flops: FlopCounter) -> dict[str, Any]:
    """result.json's ``flops``: the run's convention, both conventions, the selection cost."""
    train, dense = sum(state["flops"]), sum(state["dense_flops"])
    conventions = {}
    for c in CONVENTIONS:
        t = flops.totals(c)
        conventions[c] = {"train": t["train"], "dense_equivalent": t["dense_equivalent"],
                          "ratio": t["train"] / t["dense_equivalent"] if t["dense_equivalent"] else None}
    selection = flops.selection
    return {"train": train, "dense_equivalent": dense, "ratio": train / dense if dense else None,
            "convention": flops.convention, "conventions": conventions,
            "selection": {"flops": selection, "share_of_train": selection / train if train else None,
                          "samples": flops.n_selection_samples},
            "replayed_samples": flops.n_replay_samples,
            "per_task": state["flops"], "per_layer": flops.per_layer(), "note": FLOP_NOTE}
