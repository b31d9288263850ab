"""Fine-tuning (``sgd``): plain training on each task in turn, the lower bound."""
from __future__ import annotations

from sparsecl.methods.base import ContinualMethod, register_method


@register_method
class FineTune(ContinualMethod, graph_capturable=True, distributed=True):
    """Cross-entropy on the current task only; forgets catastrophically in Class-IL."""

    name = "sgd"
    description = "fine-tune: plain SGD on each task in turn (lower bound)"
