"""SNIP-DER++ (``snip-der++``): DER++ on a fixed mask chosen by SNIP at initialisation.

SNIP (Lee et al., ICLR 2019) scores every maskable weight by its connection sensitivity
``|g * w|`` at initialisation and keeps the top ones. Here (SparCL Table 2's adaptation to CL):

- ``g`` is the gradient of DER++'s cross-entropy on ``snip_batches`` batches (default 10) of the
  run's batch size, drawn at random from the *first* task's training data (augmented as in
  training), i.e. the gradient of the mean loss over those batches; ``w`` the initial weights.
  BatchNorm running statistics are restored afterwards, so scoring leaves the model unchanged.
- per-layer counts: ``uniform`` (default, SparCL's protocol: the same sparsity in every masked
  layer), ``erk``, or ``global`` (the original SNIP: one top-k over all masked layers).
- the mask is then fixed for all tasks; inactive weights stay exactly zero.

The scoring passes are dense forward + backward passes and are charged to the FLOP counter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import register_method
from sparsecl.methods.sparse_derpp import SparseDERpp, SparseDERppOptions
from sparsecl.sparse.allocation import ALLOCATIONS
from sparsecl.sparse.masks import MaskSet, topk_mask


@dataclass
class SNIPDERppOptions(SparseDERppOptions):
    snip_batches: int = 10  # batches of the first task scored at init (each of the run's batch size)

    allocations: ClassVar[tuple[str, ...]] = (*ALLOCATIONS, "global")

    def validate(self) -> None:
        super().validate()
        if self.snip_batches < 1:
            raise SparseCLError(f"snip_batches must be >= 1, got {self.snip_batches}")


@register_method
class SNIPDERpp(SparseDERpp, graph_capturable=True, distributed=True):
    """DER++ with a static SNIP mask computed on the first task at initialisation."""

    name = "snip-der++"
    description = "SNIP-DER++: DER++ on a fixed SNIP mask (|g*w| at init) at the given sparsity"
    options_cls = SNIPDERppOptions
    # The mask is fixed after begin_task and applied by optimiser hooks (device kernels only), so
    # DER++'s step stays CUDA-graph capturable; FLOPs are counted at the fixed density on replay.
    # distributed: the SNIP pass runs whole on every rank; masks broadcast

    def snip_scores(self, task: Task) -> dict[str, torch.Tensor]:
        """``|g * w|`` per maskable weight from ``snip_batches`` batches of ``task``'s training data."""
        model = self.model
        params = dict(model.named_parameters())
        weights = [params[n] for n in self.mask_names]
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        split = self.train_split(task)
        bs = self.ctx.batch_size
        n_batches = min(self.options.snip_batches, math.ceil(len(split) / bs))
        perm = torch.randperm(len(split), device=self.device)
        grads = [torch.zeros_like(w) for w in weights]
        was_training = model.training
        model.train()
        n_samples = 0
        for b in range(n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            x = self.ctx.augment.train(split.x[idx])
            loss = self.loss(model(x), split.y[idx], task.index)
            for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                acc.add_(g, alpha=1.0 / n_batches)
            n_samples += int(idx.shape[0])
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        self.ctx.flops.train_samples(n_samples)  # dense: no mask is bound yet
        return {n: (g * w.detach()).abs() for n, g, w in zip(self.mask_names, grads, weights)}

    def create_masks(self, task: Task) -> MaskSet:
        scores = self.snip_scores(task)
        counts = self.layer_counts() if self.options.allocation != "global" else None
        if counts is not None:
            return MaskSet.from_scores(self.model, scores, counts)
        flat = torch.cat([scores[n].reshape(-1) for n in self.mask_names])
        keep = round((1.0 - self.options.sparsity) * flat.numel())
        chosen = topk_mask(flat, keep).split([scores[n].numel() for n in self.mask_names])
        masks = {n: c.view(scores[n].shape) for n, c in zip(self.mask_names, chosen)}
        return MaskSet(self.model, masks)
