"""Autograd functions of the sparse kernels: :func:`sparse_conv2d` and :func:`sparse_linear`.

Forward, input gradient and weight gradient run in the C++ kernels on batch-last tensors; the weight
gradient is computed only at the index's weight-gradient positions (the mask unless
:meth:`SparseConvIndex.set_weight_grad` says otherwise) and is zero elsewhere.
"""
from __future__ import annotations

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.kernels.build import load_extension
from sparsecl.sparse.kernels.index import LANES, Geometry, RowGeometry, SparseConvIndex


def _pad(x: torch.Tensor, top: int, left: int, Hp: int, Wp: int, Np: int, *, relu: bool = False) -> torch.Tensor:
    """``x [C, H, W, N]`` (with ``relu``: ``relu(x)``) placed at (top, left) in zeros of
    ``[C, Hp, Wp, Np]`` (no copy when it already fits and no ReLU is asked for)."""
    C, H, W, N = x.shape
    if (H, W, N) == (Hp, Wp, Np) and not relu:
        return x.contiguous()
    out = x.new_empty(C, Hp, Wp, Np)
    out[:, :top].zero_()                        # zero only the border: the copy fills the rest
    out[:, top + H:].zero_()
    out[:, top:top + H, :left].zero_()
    out[:, top:top + H, left + W:].zero_()
    out[:, top:top + H, left:left + W, N:].zero_()
    inner = out[:, top:top + H, left:left + W, :N]
    if relu:  # the ReLU's one pass writes the padded input: no separate activation, no copy
        torch.clamp(x, min=0, out=inner)
    else:
        inner.copy_(x)
    return out


def _unpad_batch(y: torch.Tensor, N: int) -> torch.Tensor:
    return y if y.shape[-1] == N else y[..., :N].contiguous()


def _gather(ext, src: torch.Tensor, val: torch.Tensor, tables, Np: int, out_shape: tuple[int, ...]) -> torch.Tensor:
    out = src.new_empty(out_shape)
    ln = tables.lines
    ext.gather(src, val, tables.noff, tables.blkptr, tables.nblk, tables.rowcls, tables.rowbase, ln.pin, ln.pout,
               ln.len, ln.clsptr, Np, ln.step, ln.ostep, tables.sblines, out)
    return out


def _phase_rows(x: torch.Tensor, index: SparseConvIndex, rg: RowGeometry) -> torch.Tensor:
    """``x [C, H, W, N]`` zero-padded and split into stride phases along W: ``[C, Hp, sw, Wq]``."""
    C, H, W, N = x.shape
    sw, (ph, pw) = index.stride[1], index.padding
    out = x.new_zeros(C, rg.Hp, sw, rg.Wq)
    for f in range(sw):   # one strided copy per phase (the stride along W), not per element
        c0 = max(0, -(-(pw - f) // sw))          # first phase column that holds an image column
        cols = x[:, :, c0 * sw + f - pw::sw]
        n = cols.shape[2]
        out[:, ph:ph + H, f, c0 * N:(c0 + n) * N] = cols.reshape(C, H, n * N)
    return out


def _row_forward(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Inference forward for batches below the vector width (vectors along the output row)."""
    C, H, W, N = x.shape
    rg = index.row_geometry(H, W, N)
    val = weight.detach().reshape(-1)[index.taps.flat].contiguous()
    y = _gather(load_extension(), _phase_rows(x, index, rg), val, rg.fwd, LANES, (index.OC, rg.OH, rg.row))
    y = y[..., :rg.OW * N].reshape(index.OC, rg.OH, rg.OW, N)
    return y if bias is None else y + bias.detach().view(-1, 1, 1, 1)


def _conv_forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: SparseConvIndex,
                  relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of both autograd functions: ``(y, xp)``, xp the padded (ReLU'd) input it saves."""
    C, H, W, N = x.shape
    g = index.geometry(H, W, N)
    ph, pw = index.padding
    xp = _pad(x.detach(), ph, pw, g.Hp, g.Wp, g.Np, relu=relu)
    val = weight.detach().reshape(-1)[index.taps.flat].contiguous()
    y = _unpad_batch(_gather(load_extension(), xp, val, g.fwd, g.Np, (index.OC, g.OH, g.OW, g.Np)), N)
    if bias is not None:
        y.add_(bias.detach().view(-1, 1, 1, 1))
    ctx.index, ctx.geom, ctx.has_bias, ctx.weight_shape = index, g, bias is not None, weight.shape
    ctx.save_for_backward(xp, val)
    return y, xp


def _conv_backward(ctx, gy: torch.Tensor, input_grad: bool):
    """Input (unpadded), weight and bias gradients of :func:`_conv_forward`'s convolution."""
    ext = load_extension()
    index: SparseConvIndex = ctx.index
    g: Geometry = ctx.geom
    xp, val = ctx.saved_tensors
    gy = gy.contiguous()
    gx = gw = gb = None
    if input_grad:
        top, left, OHp, OWp = g.gpad
        gyp = _pad(gy, top, left, OHp, OWp, g.Np)
        bval = val[index._bwd_order].contiguous()
        gx = _unpad_batch(_gather(ext, gyp, bval, g.bwd, g.Np, (index.C, g.H, g.W, g.Np)), g.N)
    if ctx.needs_input_grad[1]:
        taps, tables = index.wgrad_tables(g)
        gyn = _pad(gy, 0, 0, g.OH, g.OW, g.Np)
        dw = gy.new_empty(taps.flat.numel())
        ln = tables.lines
        ext.wgrad(xp, gyn, tables.noff, tables.blkptr, tables.nblk, ln.pin, ln.pout, ln.len, g.Np, ln.step,
                  tables.sblines, dw)
        gw = dw.new_zeros(ctx.weight_shape.numel()).index_put_((taps.flat,), dw).view(ctx.weight_shape)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = gy.sum(dim=(1, 2, 3))
    return gx, gw, gb


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: SparseConvIndex) -> torch.Tensor:
        return _conv_forward(ctx, x, weight, bias, index, relu=False)[0]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        return *_conv_backward(ctx, gy, ctx.needs_input_grad[0]), None


class _ReluSparseConv(torch.autograd.Function):
    """``a = relu(x)`` and ``conv(a)`` in one: the ReLU writes the conv's padded input, which is the
    only tensor kept for the backward (it also holds ReLU's mask); ``a`` is a view of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: SparseConvIndex) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        y, xp = _conv_forward(ctx, x, weight, bias, index, relu=True)
        (ph, pw), (_, H, W, N) = index.padding, x.shape
        return y, xp[:, ph:ph + H, pw:pw + W, :N]

    @staticmethod
    def backward(ctx, gy: torch.Tensor | None, ga: torch.Tensor | None):
        gx, gw, gb = _conv_backward(ctx, gy, ctx.needs_input_grad[0]) if gy is not None else (None, None, None)
        if ctx.needs_input_grad[0]:
            gx = ga if gx is None else gx if ga is None else gx + ga
            if gx is not None:
                (ph, pw), g = ctx.index.padding, ctx.geom
                active = ctx.saved_tensors[0][:, ph:ph + g.H, pw:pw + g.W, :g.N] > 0
                gx = gx * active
        return gx, gw, gb, None


def _check(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex, dims: int, channels: int) -> None:
    if x.dim() != dims or x.dtype != torch.float32 or x.device.type != "cpu":
        raise SparseCLError(f"sparse kernels: expected a float32 CPU input of {dims} dims (batch last), got {x.dim()} dims {x.dtype} on {x.device}")
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise SparseCLError(f"sparse kernels: expected a float32 CPU weight, got {weight.dtype} on {weight.device}")
    if tuple(weight.shape) != index.weight_shape:
        raise SparseCLError(f"sparse kernels: weight shape {tuple(weight.shape)} does not match the index's {index.weight_shape}")
    if x.shape[0] != channels:
        raise SparseCLError(f"sparse kernels: input has {x.shape[0]} channels, the weight expects {channels}")


def _row_inference(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex, bias: torch.Tensor | None) -> bool:
    """Check a conv call's arguments; True for an untracked batch below the vector width (the row kernels)."""
    if index.linear:
        raise SparseCLError("sparse kernels: this index was built for a linear weight; use sparse_linear")
    _check(x, weight, index, 4, index.C)
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return x.shape[3] < LANES and not tracked


def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse 2-d convolution of a batch-last input.

    Args:
        x: ``[C, H, W, N]`` float32 (batch last).
        weight: the dense parameter ``[OC, C/groups, kh, kw]``; only the index's positions are read
            (weights outside the mask count as zero).
        index: the mask's :class:`SparseConvIndex` (stride, padding, groups).
        bias: optional ``[OC]``.

    Returns:
        ``[OC, OH, OW, N]``; differentiable in ``x``, ``weight`` (at the weight-gradient positions only)
        and ``bias``. Without autograd (inference) a batch below 16 is vectorised along the output
        row instead of being padded to 16.
    """
    if _row_inference(x, weight, index, bias):
        return _row_forward(x, weight, index, bias)
    return _SparseConv.apply(x, weight, bias, index)


def relu_sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sparse_conv2d(relu(x)), relu(x))`` in one pass over ``x`` and one saved tensor: the ReLU
    writes the convolution's zero-padded input directly (``relu(x)`` is returned as a view of it, for
    a shortcut), so the activation is neither copied nor kept twice. Same arguments and gradients
    as :func:`sparse_conv2d` after :func:`torch.relu`."""
    if _row_inference(x, weight, index, bias):
        a = torch.relu(x)
        return _row_forward(a, weight, index, bias), a
    return _ReluSparseConv.apply(x, weight, bias, index)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse linear layer of a batch-last input: ``x [I, N]``, ``weight [O, I]`` -> ``[O, N]``.

    The same kernels as :func:`sparse_conv2d` (a 1x1 convolution of a 1x1 image), same gradients.
    """
    if not index.linear:
        raise SparseCLError("sparse kernels: this index was built for a conv weight; use sparse_conv2d")
    _check(x, weight, index, 2, index.C)
    y = _SparseConv.apply(x.reshape(x.shape[0], 1, 1, x.shape[1]), weight.view(index.mask.shape), bias, index)
    return y.view(index.OC, x.shape[1])
