"""Continual-learning methods, one file each, registered by name in :data:`METHODS`."""
from sparsecl.methods.base import METHODS, Batch, ContinualMethod, MethodContext, MethodOptions, register_method
from sparsecl.methods import derpp, er, joint, sgd  # noqa: F401  (registration side effect)
from sparsecl.methods import ewc  # noqa: F401
from sparsecl.methods import lwf  # noqa: F401
from sparsecl.methods import agem  # noqa: F401
from sparsecl.methods import icarl  # noqa: F401
from sparsecl.methods import snip_derpp  # noqa: F401
from sparsecl.methods import rigl_derpp  # noqa: F401
from sparsecl.methods import packnet  # noqa: F401
from sparsecl.methods import sparcl  # noqa: F401
from sparsecl.methods import esacl  # noqa: F401
from sparsecl.methods import scratch, cl_lsg, grow  # noqa: F401  (CL-LSG and its baselines)
from sparsecl.methods import continual_dst  # noqa: F401
from sparsecl.methods import nispa, cpg, den  # noqa: F401  (issue 23: NISPA, CPG, DEN)
from sparsecl.methods import fdr, finetune, lps, pnn  # noqa: F401  (issue 23: FDR, Fine-tune, LPS, PNN)

__all__ = ["METHODS", "Batch", "ContinualMethod", "MethodContext", "MethodOptions", "register_method"]
