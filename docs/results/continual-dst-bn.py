"""Where a shared-BatchNorm continual-DST run forgets (docs/results/continual-dst.md, "BatchNorm").

Usage (from the repository root; DATA_DIR defaults to $SPARSECL_DATA):
    python docs/results/continual-dst-bn.py RUN_DIR [DATA_DIR] [N_TRAIN]

For every task j of a finished ``per_task_bn=false`` run, the Task-IL test accuracy of task j's
subnetwork M_j, rebuilt from the run's final checkpoint (the stored backbone, M_j, the final model's
heads, biases and BN), which is what the run evaluated:

- ``after j``: R[j][j] from result.json (just after task j was trained);
- ``final``: with the final shared BN (running statistics and affine parameters of the last task),
  recomputed here; it must equal the run's R[T][j];
- ``stats re-estimated``: the same network with only the BN running statistics recomputed on the
  first N_TRAIN (default 2,000) of task j's training images (non-augmented) through M_j, the final
  affine parameters kept.

If the re-estimated statistics bring task j back to about ``after j``, the forgetting is the running
statistics (which follow the latest task's data and subnetwork), not the shared weights or affine
parameters.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.sparse.export import build_from_spec


def task_il_accuracy(model, augment, task, x, y, batch=500):
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(augment.eval(x[i:i + batch]))
            own = torch.full_like(logits, float("-inf"))
            own[:, task.classes] = 0
            correct += int(((logits + own).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def reestimate_bn(model, augment, x, batch=256):
    """Running statistics of every BN layer recomputed as the plain average over ``x`` (momentum None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(augment.eval(x[i:i + batch]))
    model.eval()
    return len(bns)


def main(run_dir: str, data_dir: str | None = None, n_train: str = "2000") -> None:
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    cfg = result["config"]
    if cfg["method_options"].get("per_task_bn"):
        raise SystemExit("this run keeps per-task BN; the measurement is about shared BN")
    final_state = torch.load(run_dir / "model.pt", weights_only=True)
    method = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]
    model = build_from_spec(result["model"])
    stream = load_benchmark(cfg["benchmark"], data_dir, class_order=cfg.get("class_order"), download=False)
    augment = DeviceAugment(stream.augment, stream.input_shape)
    R = result["accuracy"]["task_il"]["matrix"]
    print(f"{run_dir.name}: {cfg['method_options']}")
    print("| task | after j | final (run) | final (here) | BN stats re-estimated |")
    print("|---|---|---|---|---|")
    for t in stream.tasks:
        state = dict(final_state)  # task j's view: M_j over the stored backbone, the rest as the run ended
        for n, values in method["backbone"].items():
            state[n] = torch.where(method["task_masks"][t.index][n], values, torch.zeros_like(values))
        model.load_state_dict(state)
        model.eval()
        final = task_il_accuracy(model, augment, t, t.test.x, t.test.y)
        reestimate_bn(model, augment, t.train.x[: int(n_train)])
        fixed = task_il_accuracy(model, augment, t, t.test.x, t.test.y)
        print(f"| {t.index + 1} | {R[t.index][t.index]:.2f} | {R[-1][t.index]:.2f} | {final:.2f} | {fixed:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:4])
