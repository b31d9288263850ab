"""Grow (``grow``, Yuan, Savarese & Maire, ICLR 2021, as CL-LSG's "grow only" baseline): every task
grows new channels with the learnable grown-mask only, on top of a frozen backbone; Task-IL.

It is CL-LSG's machinery (:mod:`sparsecl.methods.cl_lsg`) with its own parts switched off: no
selective mask (earlier tasks' weights are reused whole and frozen), no attentive mask (grown
channels are used whole, so nothing is released), no pick-and-reuse stage and no target: each task
is one growth stage over all its epochs (continuous-sparsification channel gates from the 1/8 seed
network, binarised at the end of the task, penalty ``lam * sum(gates)``). Model size is reported as
for CL-LSG (``size_task``, ``size_total`` relative to the full backbone). Like CL-LSG it trains on
each task's training data less the held-out validation part (``val_fraction``), so the baselines
and CL-LSG see the same examples.
"""
from __future__ import annotations

from dataclasses import dataclass

from sparsecl import SparseCLError
from sparsecl.methods.base import register_method
from sparsecl.methods.cl_lsg import CLLSG, CLLSGOptions


@dataclass
class GrowOptions(CLLSGOptions):
    growth: str = "always"
    selective: bool = False
    attentive: bool = False
    retrain_released: bool = False
    target: object = 0.0  # unused: growth is always on

    def validate(self) -> None:
        if self.selective or self.attentive or self.retrain_released or self.growth != "always":
            raise SparseCLError("grow has no selective/attentive masks, released weights or target "
                                "(use cl-lsg with those options)")
        super().validate()


@register_method
class Grow(CLLSG):
    """Learnable channel growth only (grown-mask), earlier weights frozen and reused whole."""

    name = "grow"
    description = "Grow: learnable channel growth (grown-mask only) from a 1/8 seed, frozen reuse (Task-IL)"
    options_cls = GrowOptions
