"""Real sparse execution on the CPU: direct sparse convolution and linear kernels (batch-last layout).

- :func:`load_extension` / :func:`kernels_available`: the C++ kernels, compiled once and cached.
- :class:`SparseConvIndex`: the kernels' tables for one mask (rebuild when the mask changes).
- :func:`sparse_conv2d`, :func:`sparse_linear`: autograd functions on ``[C, H, W, N]`` / ``[I, N]``
  inputs, equal to the dense op with the masked weight to float32 rounding; the weight gradient only
  at the weight-gradient positions.
- :class:`Frame`, :func:`framed_sparse_conv2d`, :func:`batch_norm_relu`, :func:`into_frame`, :func:`frame_values`: a
  network's convolutions and BatchNorm + ReLU passing zero-bordered buffers, so no op pads a copy.
"""
from sparsecl.sparse.kernels.batchnorm import batch_norm_relu
from sparsecl.sparse.kernels.build import kernels_available, load_extension
from sparsecl.sparse.kernels.index import LANES, Frame, SparseConvIndex
from sparsecl.sparse.kernels.ops import (frame_values, framed_sparse_conv2d, into_frame, sparse_conv2d,
                                         sparse_linear)

__all__ = ["LANES", "Frame", "SparseConvIndex", "batch_norm_relu", "frame_values", "framed_sparse_conv2d",
           "into_frame", "kernels_available", "load_extension", "sparse_conv2d", "sparse_linear"]
