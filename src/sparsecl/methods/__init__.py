"""Continual-learning methods, one file each, registered by name in :data:`METHODS`."""
from sparsecl.methods.base import METHODS, Batch, ContinualMethod, MethodContext, MethodOptions, register_method
from sparsecl.methods import derpp, er, joint, sgd  # noqa: F401  (registration side effect)

__all__ = ["METHODS", "Batch", "ContinualMethod", "MethodContext", "MethodOptions", "register_method"]
