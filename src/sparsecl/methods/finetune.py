"""Fine-tune per task (``finetune-per-task``): CL-LSG's "fine-tune" baseline, a separate model per
task, each initialised from the previous task's trained model; Task-IL.

CL-LSG (Yang et al., NeurIPS 2022, App. A.4 "Baselines", (ii) *fine-tune*): "we train the model
from scratch for the first task only and then fine-tune it for the rest tasks individually". Every
task keeps its own copy of the whole backbone, so task ``j`` is evaluated with model ``j`` (no
forgetting by construction, forward transfer from the previous task's weights) and the model size
grows by one full network per task (``size_task`` 1.0, ``size_total`` = tasks so far, as the
paper's Table 3 "Fine-tune 1x ... 20x"). Not to be confused with ``sgd`` (Mammoth's fine-tuning:
one model trained on every task in turn, evaluated on all of them with the last weights).

Like Scratch (whose machinery this is, :class:`~sparsecl.methods.scratch.Scratch`) and CL-LSG, it
trains on each task's training data less the held-out validation part (``val_fraction``), so the
baselines of CL-LSG's tables see the same examples; the head of task ``j`` is trained with model
``j`` only. The paper does not say whether the optimiser state carries over between tasks; as
everywhere in this library (SPEC) the optimiser is re-created per task.
"""
from __future__ import annotations

from sparsecl.data.stream import Task
from sparsecl.methods.base import register_method
from sparsecl.methods.scratch import Scratch


@register_method
class FineTunePerTask(Scratch):
    """A model per task, task t's initialised from task t-1's trained model (Task-IL only)."""

    name = "finetune-per-task"
    description = "Fine-tune per task: a model per task initialised from the previous one (CL-LSG baseline, size T x)"

    def begin_task(self, task: Task) -> None:
        # The live backbone is the previous task's trained model (task 1: the initial weights);
        # the copy taken at its end_task is what serves that task's evaluation.
        self.train_backbone(task)
