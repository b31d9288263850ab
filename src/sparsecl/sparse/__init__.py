"""Sparse core: masks, density allocation and the FLOP accounting (:mod:`sparsecl.sparse.flops`)."""
