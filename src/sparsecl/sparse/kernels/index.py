"""The sparse index of one masked conv/linear weight: the kernels' tables, built from the mask once.

Layout is batch-last: activations are ``[C, H, W, N]``. Inside, the batch is padded to ``Np``, a
multiple of 16 (the vector width), and the input is zero-padded spatially, so every tap is a plain
offset. What depends only on the mask (which weights, in which order, per output row and per
input-gradient row) is built in the constructor; what depends on the input's H, W and N (flat offsets,
positions, cache blocks) is built on first use of that geometry and cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.kernels.build import load_extension

LANES = 16                 # floats per vector: the batch is padded to a multiple of this
# Cache blocking, measured on ResNet-18's 3x3 convs at N = 32 and 96: runs of about 8 output positions
# (whole tiles), each visited by all of a thread's rows for one block of reduction channels at a time,
# beat whole rows with L2-sized channel blocks by 20-45 %; the best blocks hold about 32 nonzeros per
# row (16 channels at density 0.25, 32 at 0.1, 64 at 0.05), within 16..64 channels.
LINE = 8
NNZ_PER_BLOCK = 32
# The weight gradient finishes each (row, block) over the whole image at once (its few accumulators stay
# in L1) when the block's input over the whole image fits in this much of L2; otherwise it goes line by line.
WGRAD_SLAB_BYTES = 3 << 19
_I32_MAX = 2**31 - 1
_MAX_WGRAD_CACHE = 4

I32 = torch.int32


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a < 0 or b < 0 or (what == "stride" and min(a, b) < 1):
        raise SparseCLError(f"sparse kernels: invalid {what} {v!r}")
    return int(a), int(b)


def _ptr(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum with a leading 0 (CSR row pointer) as int32."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(I32)


def line_length(Np: int) -> int:
    """Positions per line piece: whole tiles of the kernel (csrc tile_positions), about LINE."""
    tile = int(load_extension().tile_positions(Np // LANES))
    return tile * max(1, round(LINE / tile))


def _lines(pin: torch.Tensor, pout: torch.Tensor, length: torch.Tensor, cls: torch.Tensor, ncls: int,
           step: int, Np: int, ostep: int, line: int) -> _Lines:
    """Line tables from runs of output positions (first position's input and output offsets in
    positions, length, class; sorted by class), each run cut into pieces of at most ``line`` positions.
    ``step``: input positions between neighbours of a run; ``ostep``: output positions between them."""
    pieces = -(-int(length.max()) // line) if length.numel() else 0
    i = torch.arange(pieces)
    plen = (length[:, None] - i * line).clamp(0, line).reshape(-1)
    keep = plen > 0
    pin = (pin[:, None] + i * (line * step)).reshape(-1)[keep]
    pout = (pout[:, None] + i * (line * ostep)).reshape(-1)[keep]
    cls = cls.repeat_interleave(pieces)[keep]
    return _Lines(_i32(pin * Np), _i32(pout * Np), _i32(plen[keep]), _ptr(torch.bincount(cls, minlength=ncls)),
                  step, ostep * Np)


def _i32(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and int(t.max()) > _I32_MAX:
        raise SparseCLError("sparse kernels: tensor too large for 32-bit offsets (use a smaller batch)")
    return t.to(I32).contiguous()


def _memo(cache: dict, key: tuple, build):
    """``cache[key]``, built as ``build(*key)`` on first use."""
    if key not in cache:
        cache[key] = build(*key)
    return cache[key]


def padded_batch(n: int) -> int:
    """Batch size rounded up to the vector width."""
    return -(-n // LANES) * LANES


@dataclass
class _Lines:
    """Output positions as runs along output rows (see csrc/sparse_conv.cpp): start offsets and lengths."""

    pin: torch.Tensor
    pout: torch.Tensor
    len: torch.Tensor
    clsptr: torch.Tensor
    step: int          # input positions between neighbours of a line (the stride along W, or 1)
    ostep: int         # output floats between neighbours of a line


@dataclass
class _Gather:
    """Tables of one gather kernel call."""

    noff: torch.Tensor
    blkptr: torch.Tensor
    nblk: int
    rowcls: torch.Tensor
    rowbase: torch.Tensor
    lines: _Lines
    sblines: int


@dataclass
class _WGrad:
    noff: torch.Tensor
    blkptr: torch.Tensor
    nblk: int
    lines: _Lines
    sblines: int


@dataclass(frozen=True)
class Frame:
    """Where a batch-last tensor's values sit in a zero-bordered buffer ``[C, Hb, Wb, Nb]``: rows
    ``top..top+H``, columns ``left..left+W``, the first ``N`` batch lanes; the rest is zero.

    The kernels read their inputs and output gradients in such buffers (the zero border is the
    convolution's padding), so an op that writes its result straight into the next one's frame saves
    a padded copy (see :mod:`sparsecl.sparse.kernels.batchnorm`).
    """

    H: int
    W: int
    N: int
    top: int
    left: int
    Hb: int
    Wb: int
    Nb: int

    @staticmethod
    def plain(x: torch.Tensor) -> "Frame":
        """The frame of a contiguous ``[C, H, W, N]`` tensor (no border)."""
        _, H, W, N = x.shape
        return Frame(H, W, N, 0, 0, H, W, N)

    def padded(self, padding: tuple[int, int]) -> "Frame":
        """The same values with a border of ``padding`` (rows, columns) and the batch padded to the vector width."""
        ph, pw = padding
        return Frame(self.H, self.W, self.N, ph, pw, self.H + 2 * ph, self.W + 2 * pw, padded_batch(self.N))

    def buffer_shape(self, C: int) -> tuple[int, int, int, int]:
        return C, self.Hb, self.Wb, self.Nb

    def values(self, buf: torch.Tensor) -> torch.Tensor:
        """The ``[C, H, W, N]`` view of ``buf``'s values."""
        return buf[:, self.top:self.top + self.H, self.left:self.left + self.W, :self.N]


@dataclass
class Geometry:
    """Shapes of one input geometry and the kernel tables for it. ``fwd``/``bwd`` read padded
    buffers and write plain tensors; ``framed_fwd``/``framed_bwd`` write into the frames
    ``out_frame`` (the output, laid out as the input gradient reads the output gradient) and
    ``in_frame`` (the input gradient, laid out as the forward reads the input)."""

    H: int
    W: int
    N: int
    Np: int
    OH: int
    OW: int
    Hp: int            # padded input (forward)
    Wp: int
    fwd: _Gather
    bwd: _Gather
    in_frame: Frame
    out_frame: Frame
    framed_fwd: _Gather
    framed_bwd: _Gather


@dataclass
class RowGeometry:
    """Tables of the small-batch inference forward: vectors of 16 floats along the flattened (W, N)
    output row instead of along the batch (no padding of a batch of 1 to 16), the input split into
    stride phases along W so that a vector's inputs are contiguous too."""

    H: int
    W: int
    N: int
    OH: int
    OW: int
    Hp: int            # padded input rows
    Wq: int            # floats per phase row of the input (a multiple of 16)
    row: int           # floats per output row (a multiple of 16; the tail is dropped)
    fwd: _Gather


class _Taps:
    """Weight positions (nonzeros) of a [OC, C/groups, kh, kw] bool tensor, sorted by (oc, ci, kh, kw)."""

    def __init__(self, positions: torch.Tensor, groups: int) -> None:
        oc, cl, kh, kw = positions.nonzero().unbind(1)
        ocg = positions.shape[0] // groups
        self.flat = torch.flatten(positions).nonzero().squeeze(1)   # same order as nonzero()
        self.oc, self.kh, self.kw = oc, kh, kw
        self.ci = (oc // ocg) * positions.shape[1] + cl             # absolute input channel
        self.local_ci = cl


def _blocks(row: torch.Tensor, red: torch.Tensor, nrows: int, nred: int) -> tuple[torch.Tensor, int]:
    """Per (row, reduction block) nonzero pointers; the taps must be sorted by (row, red)."""
    per_channel = row.numel() / max(1, nrows * nred)          # nonzeros per row and reduction channel
    block = min(nred, max(16, min(64, int(NNZ_PER_BLOCK / max(per_channel, 1e-9)))))
    nblk = -(-nred // block)
    counts = torch.bincount(row * nblk + red // block, minlength=nrows * nblk)
    return _ptr(counts), nblk


class SparseConvIndex:
    """Index of a masked conv (or linear) weight for :func:`sparse_conv2d` / :func:`sparse_linear`.

    Args:
        mask: bool tensor of the weight's shape ``[OC, C/groups, kh, kw]`` (a linear ``[O, I]`` is
            treated as ``[O, I, 1, 1]``). Build a new index whenever the mask changes.
        stride, padding: as in :func:`torch.nn.functional.conv2d` (int or pair).
        groups: channel groups (``groups == C`` is a depthwise conv).
    """

    def __init__(self, mask: torch.Tensor, *, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, groups: int = 1) -> None:
        if mask.dtype != torch.bool or mask.dim() not in (2, 4):
            raise SparseCLError("sparse kernels: the mask must be a bool tensor of shape [OC, C/groups, kh, kw] or [O, I]")
        mask = mask.detach().to("cpu")
        self.linear = mask.dim() == 2
        self.mask = mask.reshape(*mask.shape, 1, 1) if self.linear else mask
        self.weight_shape = tuple(mask.shape)
        self.OC, self.Cg, self.KH, self.KW = self.mask.shape
        self.groups = int(groups)
        if self.groups < 1 or self.OC % self.groups:
            raise SparseCLError(f"sparse kernels: groups={groups} does not divide {self.OC} output channels")
        self.C = self.Cg * self.groups
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.taps = _Taps(self.mask, self.groups)
        self.nnz = int(self.taps.flat.numel())
        self._bwd_order = self._input_grad_order()
        self._geometries: dict[tuple[int, int, int], Geometry] = {}
        self._row_geometries: dict[tuple[int, int, int], RowGeometry] = {}
        self._wgrad_positions: torch.Tensor | None = None
        # (positions' copy, taps, tables per geometry, the tensor last given, its version then)
        self._wgrad_cache: list[tuple[torch.Tensor, _Taps, dict, torch.Tensor, int]] = []
        self._mask_wgrad: tuple[_Taps, dict] = (self.taps, {})

    # ------------------------------------------------------------------ mask-only structure
    def _input_grad_order(self) -> torch.Tensor:
        """Order of the taps for the input gradient: rows (ci, stride class), then oc, kh, kw.

        An input pixel y receives taps kh with (y + pad - kh) divisible by the stride, so the taps split
        into stride*stride classes by (kh % sh, kw % sw) and each class gathers from its own positions.
        """
        t = self.taps
        sh, sw = self.stride
        row = (t.ci * sh + t.kh % sh) * sw + t.kw % sw
        key = ((row * self.OC + t.oc) * self.KH + t.kh) * self.KW + t.kw
        return torch.argsort(key)

    # ------------------------------------------------------------------ geometry
    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """Output height and width for an input of H x W."""
        (sh, sw), (ph, pw) = self.stride, self.padding
        OH, OW = (H + 2 * ph - self.KH) // sh + 1, (W + 2 * pw - self.KW) // sw + 1
        if OH < 1 or OW < 1:
            raise SparseCLError(f"sparse kernels: input {H}x{W} is smaller than the {self.KH}x{self.KW} kernel")
        return OH, OW

    def geometry(self, H: int, W: int, N: int) -> Geometry:
        """Tables for an input ``[C, H, W, N]`` (built once per (H, W, N), then cached)."""
        return _memo(self._geometries, (H, W, N), self._build_geometry)

    def _build_geometry(self, H: int, W: int, N: int) -> Geometry:
        (sh, sw), (ph, pw) = self.stride, self.padding
        OH, OW = self.output_size(H, W)
        Np = padded_batch(N)
        Hp, Wp = H + 2 * ph, W + 2 * pw
        line = line_length(Np)
        in_frame = Frame(H, W, N, ph, pw, Hp, Wp, Np)
        bwd, gpad = self._bwd_tables(H, W, OH, OW, Np, line, Frame(H, W, N, 0, 0, H, W, Np))
        out_frame = Frame(OH, OW, N, *gpad, Np)
        return Geometry(H, W, N, Np, OH, OW, Hp, Wp,
                        self._fwd_tables(Hp, Wp, Np, line, Frame(OH, OW, N, 0, 0, OH, OW, Np)), bwd,
                        in_frame, out_frame, self._fwd_tables(Hp, Wp, Np, line, out_frame),
                        self._bwd_tables(H, W, OH, OW, Np, line, in_frame)[0])

    def _fwd_tables(self, Hp: int, Wp: int, Np: int, line: int, out: Frame) -> _Gather:
        """Forward gather from the padded input into the output's frame ``out``."""
        sh, sw = self.stride
        t = self.taps
        # row = oc; tap k reads xp[ci, oh*sh + kh, ow*sw + kw]
        oh = torch.arange(out.H)
        flines = _lines(oh * sh * Wp, (oh + out.top) * out.Wb + out.left, torch.full((out.H,), out.W),
                        torch.zeros(out.H, dtype=torch.long), 1, sw, Np, 1, line)
        fnoff = _i32(((t.ci * Hp + t.kh) * Wp + t.kw) * Np)
        fptr, fnb = _blocks(t.oc, t.local_ci, self.OC, self.Cg)
        return _Gather(fnoff, fptr, fnb, torch.zeros(self.OC, dtype=I32),
                       torch.arange(self.OC, dtype=torch.int64) * (out.Hb * out.Wb * Np), flines, 1)

    def row_geometry(self, H: int, W: int, N: int) -> RowGeometry:
        """Small-batch inference tables for an input ``[C, H, W, N]`` (built once, then cached)."""
        return _memo(self._row_geometries, (H, W, N), self._build_row_geometry)

    def _build_row_geometry(self, H: int, W: int, N: int) -> RowGeometry:
        (sh, sw), (ph, pw) = self.stride, self.padding
        OH, OW = self.output_size(H, W)
        Hp, phase_cols = H + 2 * ph, -(-(W + 2 * pw) // sw)
        vectors = -(-(OW * N) // LANES)
        row = vectors * LANES
        # input layout [C][Hp][sw][Wq]: output (ow, n) reads phase kw % sw at float (ow + kw // sw) * N + n
        Wq = padded_batch(max(phase_cols * N, row + (self.KW - 1) // sw * N))
        t = self.taps
        noff = _i32(((t.ci * Hp + t.kh) * sw + t.kw % sw) * Wq + t.kw // sw * N)
        oh = torch.arange(OH)
        # one "position" of these lines is one vector of 16 floats
        lines = _lines(oh * sh * sw * Wq // LANES, oh * row // LANES, torch.full((OH,), vectors),
                       torch.zeros(OH, dtype=torch.long), 1, 1, LANES, 1, line_length(LANES))
        ptr, nb = _blocks(t.oc, t.local_ci, self.OC, self.Cg)
        fwd = _Gather(noff, ptr, nb, torch.zeros(self.OC, dtype=I32),
                      torch.arange(self.OC, dtype=torch.int64) * (OH * row), lines, 1)
        return RowGeometry(H, W, N, OH, OW, Hp, Wq, row, fwd)

    def _bwd_tables(self, H: int, W: int, OH: int, OW: int, Np: int, line: int,
                    out: Frame) -> tuple[_Gather, tuple[int, int, int, int]]:
        """Input-gradient gather: rows (ci, class), reduction over (oc, kh, kw) of the padded output
        grad, written into the input gradient's frame ``out``."""
        (sh, sw), (ph, pw) = self.stride, self.padding
        # class (ry, rx) holds input pixels y = sh*a + ry - ph; tap kh = ry + sh*dh reads output row a - dh.
        top, left = (self.KH - 1) // sh, (self.KW - 1) // sw
        OHp = max(OH, (H - 1 + ph) // sh + 1) + top
        OWp = max(OW, (W - 1 + pw) // sw + 1) + left
        pins, pouts, lens, classes = [], [], [], []
        for ry in range(sh):          # stride*stride classes (one for stride 1): not a per-element loop
            for rx in range(sw):
                a = torch.arange(-(-(ph - ry) // sh), (H - 1 + ph - ry) // sh + 1)
                b0, b1 = -(-(pw - rx) // sw), (W - 1 + pw - rx) // sw + 1
                if b1 <= b0:
                    a = a[:0]
                pins.append(a * OWp + b0)
                pouts.append((a * sh + ry - ph + out.top) * out.Wb + (b0 * sw + rx - pw + out.left))
                lens.append(torch.full((a.numel(),), b1 - b0))
                classes.append(torch.full((a.numel(),), ry * sw + rx))
        t, order = self.taps, self._bwd_order
        oc, kh, kw, ci = t.oc[order], t.kh[order], t.kw[order], t.ci[order]
        noff = _i32(((oc * OHp + top - kh // sh) * OWp + left - kw // sw) * Np)
        row = (ci * sh + kh % sh) * sw + kw % sw
        ncls = sh * sw
        # reduction channel of a tap within its group's output channels
        ocg = self.OC // self.groups
        ptr, nb = _blocks(row, oc % ocg, self.C * ncls, ocg)
        rowbase = (torch.arange(self.C, dtype=torch.int64) * (out.Hb * out.Wb * Np)).repeat_interleave(ncls)
        lines = _lines(torch.cat(pins), torch.cat(pouts), torch.cat(lens), torch.cat(classes), ncls, 1, Np, sw, line)
        bwd = _Gather(noff, ptr, nb, torch.arange(ncls, dtype=I32).repeat(self.C), rowbase, lines, 1)
        return bwd, (top, left, OHp, OWp)

    # ------------------------------------------------------------------ weight-gradient positions
    def set_weight_grad(self, positions: torch.Tensor | None) -> None:
        """Where the weight gradient is computed (read at backward time).

        Args:
            positions: bool tensor of the weight's shape (a subset of the mask for a gradient mask, the
                mask itself, or all True for a dense weight gradient), or ``None`` for the mask.
        """
        if positions is not None:
            if positions.dtype != torch.bool or tuple(positions.shape) != self.weight_shape:
                raise SparseCLError(f"sparse kernels: weight-gradient positions must be a bool tensor of shape {self.weight_shape}")
            positions = positions.detach().to("cpu").reshape(self.mask.shape)
        self._wgrad_positions = positions

    def _wgrad_taps(self) -> tuple[_Taps, dict]:
        pos = self._wgrad_positions
        if pos is None:
            return self._mask_wgrad
        for i, (stored, taps, geoms, source, version) in enumerate(self._wgrad_cache):
            # the tensor last seen, not written since (its version counter), is known without a compare
            if (source is pos and version == pos._version) or torch.equal(stored, pos):
                self._wgrad_cache.insert(0, (stored, taps, geoms, pos, pos._version))
                del self._wgrad_cache[i + 1]
                return taps, geoms
        entry = (pos.clone(), _Taps(pos, self.groups), {}, pos, pos._version)
        self._wgrad_cache = [entry] + self._wgrad_cache[: _MAX_WGRAD_CACHE - 1]
        return entry[1], entry[2]

    def wgrad_tables(self, geom: Geometry, framed: bool = False) -> tuple[_Taps, _WGrad]:
        """Weight-gradient taps at the current positions and their tables for ``geom`` (cached);
        ``framed``: the output gradient is in ``geom.out_frame``, else a plain ``[OC, OH, OW, Np]``."""
        taps, geoms = self._wgrad_taps()
        key = (geom.H, geom.W, geom.N, framed)
        if key not in geoms:
            noff = _i32(((taps.ci * geom.Hp + taps.kh) * geom.Wp + taps.kw) * geom.Np)
            ptr, nb = _blocks(taps.oc, taps.local_ci, self.OC, self.Cg)
            slab = -(-self.Cg // nb) * geom.Hp * geom.Wp * geom.Np * 4
            nlines = int(geom.fwd.lines.len.numel())
            lines = (geom.framed_fwd if framed else geom.fwd).lines
            geoms[key] = _WGrad(noff, ptr, nb, lines, nlines if slab <= WGRAD_SLAB_BYTES else 1)
        return taps, geoms[key]
