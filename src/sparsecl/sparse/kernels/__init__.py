"""Real sparse execution on the CPU: direct sparse convolution and linear kernels (batch-last layout).

- :func:`load_extension` / :func:`kernels_available`: the C++ kernels, compiled once and cached.
- :class:`SparseConvIndex`: the kernels' tables for one mask (rebuild when the mask changes).
- :func:`sparse_conv2d`, :func:`sparse_linear` (and :func:`relu_sparse_conv2d`, ReLU fused in): autograd functions on ``[C, H, W, N]`` / ``[I, N]`` inputs,
  equal to the dense op with the masked weight to float32 rounding; the weight gradient only at the
  weight-gradient positions.
"""
from sparsecl.sparse.kernels.build import kernels_available, load_extension
from sparsecl.sparse.kernels.index import SparseConvIndex
from sparsecl.sparse.kernels.ops import relu_sparse_conv2d, sparse_conv2d, sparse_linear

__all__ = ["SparseConvIndex", "kernels_available", "load_extension", "relu_sparse_conv2d", "sparse_conv2d",
           "sparse_linear"]
