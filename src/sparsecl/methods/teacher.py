"""A frozen copy of the model (the "old model" of LwF and iCaRL), kept as plain tensors.

The copy is a snapshot of the live model's ``state_dict``, run *through the live module* with
:func:`torch.func.functional_call`. Two consequences: its passes go through the engine's forward
pre-hook, so under ``torch.no_grad`` they are counted as forward-only FLOPs with no bookkeeping; and
its state is a flat dict of tensors that checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class FrozenCopy:
    """Snapshot of ``model``'s parameters and buffers, evaluated in eval mode without gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state: dict[str, torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        return self.state is not None

    def snapshot(self) -> None:
        """Freeze the model as it is now (call at ``end_task``)."""
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen model's logits for ``x``. Eval mode (as Mammoth's ``deepcopy(net.eval())``):
        BatchNorm uses the frozen running statistics and never updates them."""
        was_training = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, self.state, (x,))
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self.state is None else {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        device = next(self.model.parameters()).device
        self.state = None if state is None else {k: v.to(device) for k, v in state.items()}
