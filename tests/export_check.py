"""Shared test helper: Task-IL accuracy of every task measured from a run's export alone."""
from pathlib import Path

import torch

from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.engine.io import export_run
from sparsecl.sparse.export import load_export, use_task


def exported_task_il(run_dir: Path, out: Path, fmt: str = "pt", per_task: bool = True) -> list[float]:
    """Export ``run_dir`` (a digits run), reload it and evaluate each task's test split through
    ``use_task`` (``per_task=False``: the final network for every task, what a view-less export gives)."""
    path, _ = export_run(run_dir, fmt, out)
    model, info = load_export(path)
    stream = load_benchmark("digits")
    augment = DeviceAugment(stream.augment, stream.input_shape)
    accs = []
    with torch.no_grad():
        for t in stream.tasks:
            if per_task:
                use_task(model, info, t.index)
            logits = model(augment.eval(t.test.x))
            own = torch.full_like(logits, float("-inf"))
            own[:, t.classes] = 0
            accs.append(100.0 * ((logits + own).argmax(1) == t.test.y).sum().item() / len(t.test))
    return accs
