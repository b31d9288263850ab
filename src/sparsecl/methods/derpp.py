"""Dark Experience Replay (``der++`` and ``der``, Buzzega et al., NeurIPS 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsecl.methods.base import Batch, StepLoss, StepOutputs, register_method
from sparsecl.methods.er import ReplayMethod, ReplayOptions


@dataclass
class DERppOptions(ReplayOptions):
    lr: float = 0.03
    alpha: float = 0.1  # weight of the logit-matching (MSE) term on replayed samples
    beta: float = 0.5  # weight of the cross-entropy term on a second replayed minibatch
    # One forward over [current | logit minibatch | label minibatch] instead of three. Same loss,
    # a third of the kernel launches; BatchNorm then normalises with statistics of the joint
    # batch (as ER does) instead of each part's own.
    fused_forward: bool = False


@register_method
class DERpp(ReplayMethod, distributed=True):
    """Loss = CE(current) + alpha * MSE(logits of buffer x, stored logits) + beta * CE(buffer x', y').

    The buffer stores each example's non-augmented input, label and the logits the network gave it
    (on its augmented view) when it was seen; two independent minibatches are drawn per step.
    """

    name = "der++"
    description = "DER++: replay with stored-logit matching (alpha) and labels (beta)"
    options_cls = DERppOptions

    def step_loss(self, batch: Batch) -> StepLoss:
        o = self.options
        n = batch.y.shape[0]
        if self.buffer.is_empty:
            out = self.net(batch.x)
            loss = self.loss(out, batch.y, batch.task_id)
            step = StepOutputs(batch, out, n)
        else:
            x1, z1 = self.draw("logits")
            use_labels = o.beta != 0
            if use_labels:
                x2, y2, t2 = self.draw("y", "task")
            if o.fused_forward:
                parts = [batch.x, x1] + ([x2] if use_labels else [])
                outs = self.net(torch.cat(parts)).split([p.shape[0] for p in parts])
                out, o1 = outs[0], outs[1]
                o2 = outs[2] if use_labels else None
            else:
                out, o1 = self.net(batch.x), self.net(x1)
                o2 = self.net(x2) if use_labels else None
            loss = self.loss(out, batch.y, batch.task_id) + o.alpha * F.mse_loss(o1, z1)
            fused = sum(p.shape[0] for p in (batch.x, x1, *([x2] if use_labels else [])))
            step = StepOutputs(batch, out, fused if o.fused_forward else n)
            if use_labels:
                loss = loss + o.beta * self.loss(o2, y2, t2)
                step.buffer, step.buffer_y, step.buffer_task = o2, y2, t2
                step.buffer_rows = fused if o.fused_forward else x2.shape[0]
        # fp32 targets even under bf16 autocast
        return StepLoss(loss, step, stored={"logits": out.detach().float()})


@dataclass
class DEROptions(DERppOptions):
    alpha: float = 0.3
    beta: float = 0.0


@register_method
class DER(DERpp, distributed=True):
    """DER: DER++ without the label term (beta = 0)."""

    name = "der"
    description = "DER: replay with stored-logit matching only (DER++ with beta = 0)"
    options_cls = DEROptions
