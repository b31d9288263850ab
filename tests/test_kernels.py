"""Sparse CPU kernels (sparse/kernels) against dense conv2d/linear with the masked weight and autograd.

The first test of a session builds the C++ extension (about a minute on a loaded 2-core machine); a
build failure FAILS the tests, it does not skip them. Every layer shape that a method masks in ResNet-18,
MLP, LeNet, VGG and MobileNetV2 is checked at small widths.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.sparse.kernels import index as kernel_index
from sparsecl.sparse.kernels import (Frame, SparseConvIndex, batch_norm_relu, build, framed_sparse_conv2d,
                                     into_frame, kernels_available, load_extension, sparse_conv2d, sparse_linear)

# (name, C, OC, kernel, stride, padding, groups, H, bias)
CONV_SHAPES = [
    ("resnet18 stem 3x3 s1 C=3", 3, 8, 3, 1, 1, 1, 8, False),
    ("resnet18 3x3 s1", 8, 8, 3, 1, 1, 1, 8, False),
    ("resnet18 3x3 s2", 8, 16, 3, 2, 1, 1, 8, False),
    ("resnet18 1x1 s2 shortcut", 8, 16, 1, 2, 0, 1, 8, False),
    ("lenet 5x5 pad 2 bias", 3, 6, 5, 1, 2, 1, 9, True),
    ("vgg 3x3 pad 1 bias", 4, 8, 3, 1, 1, 1, 6, True),
    ("mobilenetv2 3x3 s2 stem", 3, 8, 3, 2, 1, 1, 9, False),
    ("mobilenetv2 1x1", 8, 16, 1, 1, 0, 1, 6, False),
    ("mobilenetv2 depthwise 3x3 s1", 16, 16, 3, 1, 1, 16, 6, False),
    ("mobilenetv2 depthwise 3x3 s2", 16, 16, 3, 2, 1, 16, 7, False),
    ("any stride: 3x3 s3 pad 1", 4, 6, 3, 3, 1, 1, 10, False),
]
# (name, I, O, bias): MLP (bias), LeNet's fully connected layers (bias), a head without bias
LINEAR_SHAPES = [("mlp 20->12", 20, 12, True), ("lenet fc 48->10", 48, 10, True), ("no bias 9->7", 9, 7, False)]
BATCHES = [1, 3, 17, 32, 40]


@pytest.fixture(scope="session", autouse=True)
def extension(tmp_path_factory):
    """Build once per session in a session cache (a failure fails every test here)."""
    mp = pytest.MonkeyPatch()
    cache = os.environ.get("SPARSECL_KERNELS_TEST_CACHE") or str(tmp_path_factory.mktemp("kernel-cache"))
    mp.setenv("SPARSECL_CACHE", cache)
    try:
        yield load_extension()
    finally:
        mp.undo()


def _mask(shape, density, gen):
    return torch.rand(shape, generator=gen) < density


def _to_last(x):      # NCHW -> CHWN
    return x.permute(1, 2, 3, 0).contiguous()


def _from_last(x):    # CHWN -> NCHW
    return x.permute(3, 0, 1, 2)


def _close(a, b, rel=2e-5):
    if b.numel() == 0:
        assert a.numel() == 0
        return
    scale = max(b.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= rel * scale, f"max error {(a - b).abs().max().item():.3g} at scale {scale:.3g}"


def _conv_case(C, OC, k, s, p, g, H, bias, N, mask, positions=None, seed=0):
    """Dense reference and sparse result: (reference grads, sparse grads) as dicts."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OC, C // g, k, k, generator=gen)
    b = torch.randn(OC, generator=gen) if bias else None
    x = torch.randn(N, C, H, H, generator=gen)
    w_eff = (w * mask).requires_grad_()
    xr = x.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    y = F.conv2d(xr, w_eff, br, stride=s, padding=p, groups=g)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    index = SparseConvIndex(mask, stride=s, padding=p, groups=g)
    index.set_weight_grad(positions)
    xs = _to_last(x).requires_grad_()
    ws = w.clone().requires_grad_()      # the unmasked parameter: values outside the mask must be ignored
    bs = b.clone().requires_grad_() if bias else None
    ys = sparse_conv2d(xs, ws, index, bs)
    ys.backward(_to_last(gy))
    ref = dict(y=y.detach(), x=xr.grad, w=w_eff.grad, b=br.grad if bias else None)
    out = dict(y=_from_last(ys.detach()), x=_from_last(xs.grad), w=ws.grad, b=bs.grad if bias else None)
    return ref, out


def _assert_matches(ref, out, positions):
    _close(out["y"], ref["y"])
    _close(out["x"], ref["x"])
    _close(out["w"][positions], ref["w"][positions], rel=1e-4)
    assert torch.all(out["w"][~positions] == 0), "weight gradient must be exactly zero outside the positions"
    if ref["b"] is not None:
        _close(out["b"], ref["b"])


@pytest.mark.parametrize("N", BATCHES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[s[0] for s in CONV_SHAPES])
def test_conv_matches_dense_masked_conv(shape, N):
    _, C, OC, k, s, p, g, H, bias = shape
    mask = _mask((OC, C // g, k, k), 0.4, torch.Generator().manual_seed(N))
    ref, out = _conv_case(C, OC, k, s, p, g, H, bias, N, mask)
    _assert_matches(ref, out, mask)


@pytest.mark.parametrize("N", [1, 3, 15])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[s[0] for s in CONV_SHAPES])
def test_small_batch_inference_matches_dense(shape, N):
    # Without autograd a batch below 16 runs vectorised along the output row (batch-1 latency).
    _, C, OC, k, s, p, g, H, bias = shape
    gen = torch.Generator().manual_seed(N)
    mask = _mask((OC, C // g, k, k), 0.4, gen)
    w, x = torch.randn(OC, C // g, k, k, generator=gen), torch.randn(N, C, H + 1, H, generator=gen)
    b = torch.randn(OC, generator=gen) if bias else None
    ref = F.conv2d(x, w * mask, b, stride=s, padding=p, groups=g)
    with torch.no_grad():
        out = sparse_conv2d(_to_last(x), w, SparseConvIndex(mask, stride=s, padding=p, groups=g), b)
    _close(_from_last(out), ref)


@pytest.mark.parametrize("N", [1, 3, 17, 150])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[s[0] for s in LINEAR_SHAPES])
def test_linear_matches_dense_masked_linear(shape, N):
    _, I, O, bias = shape
    gen = torch.Generator().manual_seed(N)
    mask = _mask((O, I), 0.3, gen)
    w, x = torch.randn(O, I, generator=gen), torch.randn(N, I, generator=gen)
    b = torch.randn(O, generator=gen) if bias else None
    w_eff, xr = (w * mask).requires_grad_(), x.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    y = F.linear(xr, w_eff, br)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    ws, xs = w.clone().requires_grad_(), x.t().requires_grad_()     # [I, N], a transposed view
    bs = b.clone().requires_grad_() if bias else None
    ys = sparse_linear(xs, ws, SparseConvIndex(mask), bs)
    ys.backward(gy.t().contiguous())
    ref = dict(y=y.detach(), x=xr.grad, w=w_eff.grad, b=br.grad if bias else None)
    out = dict(y=ys.detach().t(), x=xs.grad.t(), w=ws.grad, b=bs.grad if bias else None)
    _assert_matches(ref, out, mask)


@pytest.mark.parametrize("shape", [CONV_SHAPES[i] for i in (1, 2, 4, 9)], ids=lambda s: s[0])
def test_weight_grad_line_by_line(shape, monkeypatch):
    # Large layers accumulate the weight gradient line by line (their input does not fit in L2).
    monkeypatch.setattr(kernel_index, "WGRAD_SLAB_BYTES", 0)
    _, C, OC, k, s, p, g, H, bias = shape
    mask = _mask((OC, C // g, k, k), 0.4, torch.Generator().manual_seed(7))
    ref, out = _conv_case(C, OC, k, s, p, g, H + 3, bias, 19, mask)
    _assert_matches(ref, out, mask)


def _border(buf: torch.Tensor, frame: Frame) -> torch.Tensor:
    """Everything of ``buf`` outside the frame's values."""
    outside = torch.ones(buf.shape, dtype=torch.bool)
    frame.values(outside).fill_(False)
    return buf[outside]


@pytest.mark.parametrize("N", [5, 32])
@pytest.mark.parametrize("stride", [1, 2])
def test_framed_conv_equals_the_plain_conv(stride, N):
    # Between frames: same output and gradients, bitwise, as sparse_conv2d on plain tensors; the
    # input gradient comes back zero-bordered in the input's frame.
    gen = torch.Generator().manual_seed(stride * N)
    mask = _mask((16, 8, 3, 3), 0.3, gen)
    index = SparseConvIndex(mask, stride=stride, padding=1)
    x, w = torch.randn(8, 9, 9, N, generator=gen), torch.randn(16, 8, 3, 3, generator=gen)
    gy = torch.randn(16, *index.output_size(9, 9), N, generator=gen)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = sparse_conv2d(xs, ws, index)
    y.backward(gy)
    for frame in (Frame.plain(x).padded((1, 1)), Frame.plain(x).padded((2, 0))):  # the conv's padding, or not
        xp = into_frame(x, frame).requires_grad_()
        wf = w.clone().requires_grad_()
        yp, out_frame = framed_sparse_conv2d(xp, frame, wf, index)
        assert yp.shape == out_frame.buffer_shape(16) and torch.equal(out_frame.values(yp), y)
        yp.backward(into_frame(gy, out_frame))
        assert torch.equal(frame.values(xp.grad), xs.grad) and not _border(xp.grad, frame).any()
        assert torch.equal(wf.grad, ws.grad)


def _bn_reference(y, weight, bias, rm, rv, train, residual):
    out = F.batch_norm(y.reshape(1, y.shape[0], -1), rm, rv, weight, bias, train, 0.1, 1e-5).view_as(y)
    return F.relu(out if residual is None else out + residual)


@pytest.mark.parametrize("N", [3, 17, 32])
@pytest.mark.parametrize("train", [True, False], ids=["batch-stats", "eval"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_relu_equals_torch_batch_norm_then_relu(N, train, residual, affine):
    gen = torch.Generator().manual_seed(N)
    C, H, W = 6, 5, 7
    y = torch.randn(C, H, W, N, generator=gen) * 3 + 1
    r = torch.randn(C, H, W, N, generator=gen) if residual else None
    weight, bias = (torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)) if affine else (None, None)
    rm, rv = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    refs = [t.clone().requires_grad_() if t is not None else None for t in (y, weight, bias, r)]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    ref = _bn_reference(refs[0], refs[1], refs[2], rm_ref, rv_ref, train, refs[3])

    y_frame = Frame(H, W, N, 2, 1, H + 3, W + 2, -(-N // 16) * 16)    # a conv output's frame
    yp = into_frame(y, y_frame).requires_grad_()
    ours = [t.clone().requires_grad_() if t is not None else None for t in (weight, bias)]
    res = None
    if residual:
        rp = into_frame(r, Frame.plain(r).padded((1, 1))).requires_grad_()
        res = (rp, Frame.plain(r).padded((1, 1)))
    out, frame = batch_norm_relu(yp, y_frame, ours[0], ours[1], rm, rv, train, 0.1, 1e-5, (1, 1), res)
    assert frame == Frame.plain(y).padded((1, 1)) and out.shape == frame.buffer_shape(C)
    _close(frame.values(out), ref.detach())
    assert not _border(out, frame).any()               # the next convolution's zero padding
    _close(rm, rm_ref)                                 # running statistics updated (or left) alike
    _close(rv, rv_ref)

    g = torch.randn(ref.shape, generator=gen)
    ref.backward(g)
    gp = into_frame(g, frame)
    gp[:, 0] = 7.0                                     # the border of the incoming gradient is not read
    out.backward(gp)
    _close(y_frame.values(yp.grad), refs[0].grad)
    assert not _border(yp.grad, y_frame).any()        # the producing convolution's padded output gradient
    if affine:
        _close(ours[0].grad, refs[1].grad, rel=1e-4)
        _close(ours[1].grad, refs[2].grad, rel=1e-4)
    if residual:
        _close(res[1].values(res[0].grad), refs[3].grad)
        assert not _border(res[0].grad, res[1]).any()


def test_batch_norm_relu_needs_batch_statistics_or_running_ones():
    y = torch.randn(2, 1, 1, 1)
    with pytest.raises(SparseCLError):
        batch_norm_relu(y, Frame.plain(y), None, None, None, None, True, 0.1, 1e-5, (0, 0))    # 1 value per channel
    with pytest.raises(SparseCLError):
        batch_norm_relu(y, Frame.plain(y), None, None, None, None, False, 0.1, 1e-5, (0, 0))   # no statistics at all


def test_wide_batch_is_split_into_chunks():
    # 150 samples = 10 vectors of 16: covered by chunks of 8 + 2, the last one padded.
    mask = _mask((16, 8, 3, 3), 0.3, torch.Generator().manual_seed(1))
    ref, out = _conv_case(8, 16, 3, 2, 1, 1, 8, False, 150, mask)
    _assert_matches(ref, out, mask)


def test_empty_rows_and_columns():
    mask = _mask((16, 8, 3, 3), 0.5, torch.Generator().manual_seed(2))
    mask[3] = False          # an output channel without weights: its output is exactly zero
    mask[:, 5] = False       # an input channel no weight reads: its input gradient is exactly zero
    ref, out = _conv_case(8, 16, 3, 1, 1, 1, 6, False, 5, mask)
    _assert_matches(ref, out, mask)
    assert torch.all(out["y"][:, 3] == 0) and torch.all(out["x"][:, 5] == 0)


@pytest.mark.parametrize("s", [1, 2])
def test_fully_dense_and_empty_masks(s):
    dense = torch.ones(12, 6, 3, 3, dtype=torch.bool)
    ref, out = _conv_case(6, 12, 3, s, 1, 1, 8, True, 7, dense)
    _assert_matches(ref, out, dense)
    empty = torch.zeros_like(dense)
    ref, out = _conv_case(6, 12, 3, s, 1, 1, 8, True, 7, empty)
    _assert_matches(ref, out, empty)
    assert torch.equal(out["y"], ref["y"]) and torch.all(out["x"] == 0)     # the bias alone, exactly


@pytest.mark.parametrize("s", [1, 2])
def test_weight_grad_at_a_subset_of_the_mask(s):
    gen = torch.Generator().manual_seed(3)
    mask = _mask((16, 8, 3, 3), 0.5, gen)
    subset = mask & _mask(mask.shape, 0.5, gen)         # e.g. SparCL's gradient mask
    ref, out = _conv_case(8, 16, 3, s, 1, 1, 8, False, 9, mask, positions=subset)
    _assert_matches(ref, out, subset)


def test_dense_weight_grad_of_a_sparse_conv():
    mask = _mask((16, 8, 3, 3), 0.2, torch.Generator().manual_seed(4))
    everywhere = torch.ones_like(mask)
    ref, out = _conv_case(8, 16, 3, 1, 1, 1, 8, False, 9, mask, positions=everywhere)
    _assert_matches(ref, out, everywhere)     # the dense conv's weight gradient, also outside the mask


def test_weight_grad_positions_are_read_at_backward_and_cached():
    gen = torch.Generator().manual_seed(5)
    mask = _mask((8, 4, 3, 3), 0.5, gen)
    subset = mask & _mask(mask.shape, 0.5, gen)
    index = SparseConvIndex(mask, padding=1)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    x = torch.randn(4, 6, 6, 5)
    y = sparse_conv2d(x, w, index)
    index.set_weight_grad(subset)             # changed between forward and backward
    y.sum().backward()
    assert torch.all(w.grad[~subset] == 0) and torch.any(w.grad[subset] != 0)
    geom = index.geometry(6, 6, 5)
    tables = index.wgrad_tables(geom)[1]
    index.set_weight_grad(None)
    assert index.wgrad_tables(geom)[1] is not tables
    index.set_weight_grad(subset.clone())     # an equal tensor finds the cached tables
    assert index.wgrad_tables(geom)[1] is tables
    live = subset.clone()
    index.set_weight_grad(live)
    assert index.wgrad_tables(geom)[1] is tables
    live[0] = ~live[0]                        # written in place after use: seen at the next backward
    assert index.wgrad_tables(geom)[1] is not tables
    assert index.wgrad_tables(geom)[0].flat.numel() == int(live.sum())


def _run_layer(threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(6)
    mask = _mask((64, 32, 3, 3), 0.1, gen)
    index = SparseConvIndex(mask, stride=1, padding=1)
    w = torch.randn(64, 32, 3, 3, generator=gen).requires_grad_()
    x = torch.randn(32, 16, 16, 40, generator=gen).requires_grad_()
    y = sparse_conv2d(x, w, index)
    y.backward(torch.randn(y.shape, generator=gen))
    gamma, beta = torch.rand(32, generator=gen).requires_grad_(), torch.randn(32, generator=gen).requires_grad_()
    stats = torch.zeros(32), torch.ones(32)
    out, frame = batch_norm_relu(x, Frame.plain(x), gamma, beta, *stats, True, 0.1, 1e-5, (1, 1), (x, Frame.plain(x)))
    out.backward(torch.randn(out.shape, generator=gen))
    return y.detach(), x.grad, w.grad, out.detach(), gamma.grad, beta.grad, *stats


def test_bitwise_identical_for_one_and_two_threads():
    one, two = _run_layer(1), _run_layer(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_second_process_loads_from_the_cache_without_compiling(extension):
    so = Path(extension.__file__)
    cache = str(so.parents[2])      # <cache>/kernels/<hash>/<name>.so: the cache it was loaded from
    mtime = so.stat().st_mtime_ns
    code = textwrap.dedent("""
        from sparsecl.sparse.kernels import load_extension
        print(load_extension().__file__)
    """)
    # No compiler on PATH: a rebuild would fail, so success means the cached library was imported.
    env = dict(os.environ, SPARSECL_CACHE=cache, PATH="", CXX="no-such-compiler")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(so)
    assert so.stat().st_mtime_ns == mtime


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process that has not loaded the kernels yet, with an empty cache."""
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setenv("SPARSECL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("CXX", raising=False)
    return tmp_path


def _one_line_error():
    with pytest.raises(SparseCLError) as err:
        load_extension()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_compiler_is_one_line_naming_what_to_install(fresh_build, monkeypatch):
    monkeypatch.setenv("PATH", str(fresh_build))      # an empty directory: no c++, no ninja
    msg = _one_line_error()
    assert "C++ compiler" in msg and "g++" in msg
    assert not kernels_available()


def _fake_compiler(directory, monkeypatch):
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    cxx = bin_dir / "c++"
    cxx.write_text("#!/bin/sh\necho 'fake compiler' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_missing_ninja_is_one_line_naming_pip_install_ninja(fresh_build, monkeypatch):
    _fake_compiler(fresh_build, monkeypatch)
    monkeypatch.setitem(sys.modules, "ninja", None)   # the PyPI package is not installed either
    assert "pip install ninja" in _one_line_error()


def test_failed_build_is_one_line_with_the_log(fresh_build, monkeypatch):
    _fake_compiler(fresh_build, monkeypatch)
    msg = _one_line_error()
    assert "build failed" in msg and "build.log" in msg


def test_bad_input_is_a_sparsecl_error():
    index = SparseConvIndex(torch.ones(4, 2, 3, 3, dtype=torch.bool), padding=1)
    with pytest.raises(SparseCLError):
        sparse_conv2d(torch.randn(3, 5, 5, 2), torch.randn(4, 2, 3, 3), index)        # wrong channel count
    with pytest.raises(SparseCLError):
        sparse_conv2d(torch.randn(2, 5, 5, 2), torch.randn(4, 3, 3, 3), index)        # wrong weight shape
    with pytest.raises(SparseCLError):
        sparse_conv2d(torch.randn(2, 5, 5, 2), torch.randn(4, 2, 3, 3).double(), index)  # not float32
    with pytest.raises(SparseCLError):
        sparse_linear(torch.randn(2, 5), torch.randn(4, 2, 3, 3), index)              # a conv index
    with pytest.raises(SparseCLError):
        SparseConvIndex(torch.ones(4, 2, 3, 3))                                        # not bool
    with pytest.raises(SparseCLError):
        SparseConvIndex(torch.ones(4, 2, 3, 3, dtype=torch.bool), stride=0)
    with pytest.raises(SparseCLError):
        index.set_weight_grad(torch.ones(4, 2, 3, dtype=torch.bool))
