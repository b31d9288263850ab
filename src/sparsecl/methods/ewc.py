"""Online Elastic Weight Consolidation (``ewc``).

Schwarz et al., "Progress & Compress: A scalable framework for continual learning", ICML 2018
(online EWC, building on Kirkpatrick et al., PNAS 2017). One running diagonal Fisher ``F`` and one
anchor ``theta*`` for all past tasks:

* at the end of each task, ``F <- gamma * F + F_task`` and ``theta* <- theta``, where ``F_task`` is
  the mean over the task's training examples of the squared per-example gradient of
  ``log p(y | x)``;
* every step minimises ``CE + (e_lambda / 2) * sum_i F_i (theta_i - theta*_i)^2``.

Choices where the papers leave room (named options):

* ``fisher="empirical"`` (default) uses the true label ``y``; ``"weighted"`` multiplies each
  example's squared gradient by ``p(y | x)``, as Mammoth's ``ewc_on`` does.
* The penalty carries the papers' factor ``1/2``; Mammoth's ``ewc_on`` adds
  ``e_lambda * sum F (theta - theta*)^2`` without it, so Mammoth's ``e_lambda`` equals ``2 x`` ours
  for the same penalty (the shipped presets keep the published numbers, see their ``source``).
* The Fisher is computed in eval mode (BatchNorm with running statistics; a batch of one cannot
  update them) on the task's augmented training inputs, with per-example gradients from
  ``torch.func.vmap`` in chunks of ``fisher_batch_size``, on the device. These passes are counted
  as training samples (forward + backward), one per example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, StepLoss, StepOutputs, register_method

FISHER_KINDS = ("empirical", "weighted")


@dataclass
class EWCOptions(MethodOptions):
    lr: float = 0.03
    e_lambda: float = 10.0  # penalty weight lambda in (lambda / 2) * sum F (theta - theta*)^2
    gamma: float = 1.0  # decay of the running Fisher: F <- gamma * F + F_task
    fisher: str = "empirical"  # empirical | weighted (each example weighted by p(y|x), Mammoth)
    fisher_batch_size: int = 64  # examples per vmap chunk when computing per-example gradients

    def validate(self) -> None:
        super().validate()
        if self.e_lambda < 0:
            raise SparseCLError(f"e_lambda must be >= 0, got {self.e_lambda}")
        if self.gamma < 0:
            raise SparseCLError(f"gamma must be >= 0, got {self.gamma}")
        if self.fisher not in FISHER_KINDS:
            raise SparseCLError(f"unknown fisher {self.fisher!r} (known: {', '.join(FISHER_KINDS)})")
        if self.fisher_batch_size < 1:
            raise SparseCLError(f"fisher_batch_size must be >= 1, got {self.fisher_batch_size}")


class _Unhooked(nn.Module):
    """Calls ``net.forward`` directly: the engine's pre-hook on ``net`` does not fire, because under
    ``vmap`` it would see one example per chunk; those passes are counted explicitly instead."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward(x)


@register_method
class OnlineEWC(ContinualMethod):
    """Online EWC: cross-entropy plus a quadratic pull towards the last task's weights, each weight
    weighted by its running Fisher information (see the module docstring)."""

    name = "ewc"
    description = "online EWC (Schwarz et al. 2018): running diagonal Fisher penalty (e_lambda, gamma)"
    options_cls = EWCOptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._plist = [p for p in model.parameters() if p.requires_grad]  # same order as _names
        self.fisher: list[torch.Tensor] | None = None  # aligned with self._names
        self.anchor: list[torch.Tensor] | None = None  # theta*

    # ------------------------------------------------------------------ loss
    def penalty(self) -> torch.Tensor:
        """``(e_lambda / 2) * sum F (theta - theta*)^2`` (0 before the first task has ended)."""
        if self.fisher is None:
            return torch.zeros((), device=self.device)
        total = sum((f * (p - a).pow(2)).sum() for p, f, a in zip(self._plist, self.fisher, self.anchor))
        return 0.5 * self.options.e_lambda * total

    def step_loss(self, batch: Batch) -> StepLoss:
        out = self.model(batch.x)
        loss = self.loss(out, batch.y, batch.task_id)
        if self.fisher is not None and self.options.e_lambda > 0:
            loss = loss + self.penalty()
        return StepLoss(loss, StepOutputs(batch, out, batch.y.shape[0]))

    # ---------------------------------------------------------------- fisher
    def task_fisher(self, x_raw: torch.Tensor, y: torch.Tensor, task_id: int) -> list[torch.Tensor]:
        """Diagonal Fisher of one task: mean over examples of (d log p(y|x) / d theta)^2."""
        o = self.options
        module = _Unhooked(self.model)
        named = dict(self.model.named_parameters())
        params = {f"net.{n}": named[n].detach() for n in self._names}
        frozen = {f"net.{n}": p.detach() for n, p in self.model.named_parameters() if n not in self._names}
        frozen.update({f"net.{n}": b for n, b in self.model.named_buffers()})
        keep = self._task_class_mask[task_id] if self.ctx.setting == TASK_IL else None

        def log_lik(p: dict, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = functional_call(module, (p, frozen), (x.unsqueeze(0),))[0].float()
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            lp = torch.gather(F.log_softmax(logits, dim=0), 0, target.unsqueeze(0))[0]
            return lp, lp.detach()

        per_example = vmap(grad(log_lik, has_aux=True), in_dims=(None, 0, 0))
        fisher = {k: torch.zeros_like(v) for k, v in params.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            n = int(y.shape[0])
            for start in range(0, n, o.fisher_batch_size):
                xb = self.ctx.augment.train(x_raw[start : start + o.fisher_batch_size])
                grads, lp = per_example(params, xb, y[start : start + o.fisher_batch_size])
                w = lp.exp() if o.fisher == "weighted" else None
                for k, g in grads.items():
                    sq = g.pow(2)
                    if w is not None:
                        sq = sq * w.view(-1, *([1] * (sq.dim() - 1)))
                    fisher[k] += sq.sum(0)
        finally:
            self.model.train(was_training)
        self.count_samples(train=n)
        return [fisher[f"net.{name}"] / max(n, 1) for name in self._names]

    def end_task(self, task: Task) -> None:
        f_task = self.task_fisher(task.train.x, task.train.y, task.index)
        if self.fisher is None:
            self.fisher = f_task
        else:
            self.fisher = [self.options.gamma * f + ft for f, ft in zip(self.fisher, f_task)]
        self.anchor = [p.detach().clone() for p in self._plist]

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        if self.fisher is None:
            return {"fisher": None, "anchor": None}
        return {
            "fisher": {n: f.cpu() for n, f in zip(self._names, self.fisher)},
            "anchor": {n: a.cpu() for n, a in zip(self._names, self.anchor)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fisher") is None:
            self.fisher = self.anchor = None
            return
        self.fisher = [state["fisher"][n].to(self.device) for n in self._names]
        self.anchor = [state["anchor"][n].to(self.device) for n in self._names]
