// Direct sparse convolution on the CPU, tensors in batch-last layout [C][H][W][Np], Np a multiple of 16.
//
// Two kernels serve every conv/linear shape; the Python index (index.py) turns a mask into their tables.
// Output positions come in "lines" (runs of positions along one output row): line j has len[j] positions,
// the first at input offset pin[j] and output offset pout[j]; position t of the line is at
// pin[j] + t * S * Np in the input (S: the input step, the conv's stride or 1) and pout[j] + t * ostep
// in the output. A tile is T positions of one line, so its offsets are fixed for all the row's
// nonzeros: one broadcast and T*V loads + FMAs per nonzero.
//
// gather: for every row r (an output channel, or an (input channel, stride class) pair for the input
// gradient), every line j of the row's class and position t of the line,
//     out[rowbase[r] + pout[j] + t*ostep + n] = sum_{k in row r} val[k] * in[noff[k] + pin[j] + t*S*Np + n].
// wgrad:  for every nonzero k of row r (an output channel),
//     dw[k] = sum_{j, t, n} g[r * grow + gpos[j] + t*Np + n] * in[noff[k] + pin[j] + t*S*Np + n].
//
// Work is split over rows only, each row owned by one thread, and every sum runs in a fixed order that
// does not depend on the split, so results are bitwise identical for any thread count. Rows are walked in
// (N chunk, block of lines, reduction-channel block) order so that one input slab stays in cache and is
// reused by all of a thread's rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "batch_norm_relu.h"

#include <algorithm>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
// x - 0 is x for every x (0 + x is not, for x = -0), so this compiles to one broadcast.
inline vf splat(float x) { return x - (vf){}; }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

struct Lines {
  const int* pin;
  const int* pout;
  const int* len;
  const int* clsptr;  // lines of class c: clsptr[c] .. clsptr[c+1]
  int np;             // floats per position
};

struct Rows {
  const int* blkptr;       // [R * nblk + 1]: nonzeros of row r in reduction block b: blkptr[r*nblk+b] ..
  int nblk;
  const int* rowcls;       // [R]
  const int64_t* rowbase;  // [R]
  const int* noff;         // [nnz]
  int R;
};

// Pointers to a tile's T positions; a short tile (tt < T) repeats position 0, whose results are dropped.
// One pointer per position keeps each load a single base + index*4 + constant address.
template <int T>
inline void tile_pointers(const float* in, int tt, int pstep, const float* (&pt)[T]) {
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) pt[t] = in + (t < tt ? t : 0) * pstep;
}

// Tile of T positions x V vectors: out = (first ? 0 : out) + sum_k val[k] * in[noff[k] + ...].
template <int T, int V>
inline void gather_tile(const float* __restrict in, const int* __restrict noff, const float* __restrict val,
                        int k0, int k1, int tt, int pstep, bool first, float* __restrict out, int ostep) {
  const float* pt[T];
  tile_pointers<T>(in, tt, pstep, pt);
  vf acc[T][V];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[t][v] = (first || t >= tt) ? (vf){} : load(out + t * ostep + kLanes * v);
  for (int k = k0; k < k1; ++k) {
    const int o = noff[k];
    const vf w = splat(val[k]);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[t][v] += w * load(pt[t] + o + kLanes * v);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
    if (t < tt)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) store(out + t * ostep + kLanes * v, acc[t][v]);
}

// A tile of tt <= T positions on the narrowest instantiation that holds it (halving T), so short
// lines (4x4 images, a batch-1 row of two vectors) do not pay for a full tile.
template <int T, int V>
inline void gather_fit(const float* in, const int* noff, const float* val, int k0, int k1, int tt, int pstep,
                       bool first, float* out, int ostep) {
  if constexpr (T > 1) {
    if (tt <= T / 2) return gather_fit<T / 2, V>(in, noff, val, k0, k1, tt, pstep, first, out, ostep);
  }
  gather_tile<T, V>(in, noff, val, k0, k1, tt, pstep, first, out, ostep);
}

// Rows r0..r1 on one N chunk (in/out already offset to the chunk).
template <int T, int V>
void gather_rows(const Rows& rw, const Lines& ln, const float* in, const float* val, int step, int sblines,
                 int maxlines, int ostep, int64_t r0, int64_t r1, float* out) {
  const int pstep = step * ln.np;
  for (int s0 = 0; s0 < maxlines; s0 += sblines) {
    for (int b = 0; b < rw.nblk; ++b) {
      for (int64_t r = r0; r < r1; ++r) {
        const int k0 = rw.blkptr[r * rw.nblk + b], k1 = rw.blkptr[r * rw.nblk + b + 1];
        if (b > 0 && k0 == k1) continue;  // block 0 always runs: it writes the row (zeros if empty)
        const int c = rw.rowcls[r];
        const int jb = ln.clsptr[c] + s0, je = std::min(ln.clsptr[c + 1], jb + sblines);
        float* o = out + rw.rowbase[r];
        for (int j = jb; j < je; ++j)
          for (int t0 = 0; t0 < ln.len[j]; t0 += T)
            gather_fit<T, V>(in + ln.pin[j] + t0 * pstep, rw.noff, val, k0, k1, std::min(T, ln.len[j] - t0), pstep,
                             b == 0, o + ln.pout[j] + t0 * ostep, ostep);
      }
    }
  }
}

// Weight gradient of one tile (tt <= T positions) for nonzeros k0..k1: acc[k - kbase] += its sum.
template <int T, int V>
inline void wgrad_tile(const float* in, const float* g, const int* noff, int k0, int k1, int tt, int pstep, int np,
                       vf* acc, int kbase) {
  vf gg[T][V];  // the output gradient of the tile, zero at the positions a short tile repeats
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) gg[t][v] = t < tt ? load(g + t * np + kLanes * v) : (vf){};
  const float* pt[T];
  tile_pointers<T>(in, tt, pstep, pt);
  for (int k = k0; k < k1; ++k) {
    const int o = noff[k];
    vf part[4] = {(vf){}, (vf){}, (vf){}, (vf){}};
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) part[(t * V + v) & 3] += gg[t][v] * load(pt[t] + o + kLanes * v);
    acc[k - kbase] += (part[0] + part[1]) + (part[2] + part[3]);
  }
}

template <int T, int V>
inline void wgrad_fit(const float* in, const float* g, const int* noff, int k0, int k1, int tt, int pstep, int np,
                      vf* acc, int kbase) {
  if constexpr (T > 1) {
    if (tt <= T / 2) return wgrad_fit<T / 2, V>(in, g, noff, k0, k1, tt, pstep, np, acc, kbase);
  }
  wgrad_tile<T, V>(in, g, noff, k0, k1, tt, pstep, np, acc, kbase);
}

// Sampled weight gradient of rows r0..r1 on one N chunk; acc[k - kbase] collects 16 partial sums per nonzero.
template <int T, int V>
void wgrad_rows(const Rows& rw, const Lines& ln, const float* in, const float* g, int64_t grow, int step,
                int sblines, int64_t r0, int64_t r1, int kbase, vf* acc) {
  const int nlines = ln.clsptr[1];
  const int np = ln.np, pstep = step * np;
  for (int s0 = 0; s0 < nlines; s0 += sblines) {
    const int je = std::min(nlines, s0 + sblines);
    for (int b = 0; b < rw.nblk; ++b) {
      for (int64_t r = r0; r < r1; ++r) {
        const int k0 = rw.blkptr[r * rw.nblk + b], k1 = rw.blkptr[r * rw.nblk + b + 1];
        if (k0 == k1) continue;
        for (int j = s0; j < je; ++j)
          for (int t0 = 0; t0 < ln.len[j]; t0 += T)
            wgrad_fit<T, V>(in + ln.pin[j] + t0 * pstep, g + r * grow + ln.pout[j] + t0 * np, rw.noff, k0, k1,
                            std::min(T, ln.len[j] - t0), pstep, np, acc, kbase);
      }
    }
  }
}

// Vectors per N chunk, largest first; a batch of nv vectors is covered greedily (e.g. 7 = 6 + 1).
constexpr int kChunks[] = {8, 6, 4, 3, 2, 1};

template <typename F>
void for_chunks(int nv, F&& f) {
  for (int v0 = 0; v0 < nv;) {
    for (int c : kChunks)
      if (c <= nv - v0) {
        f(v0, c);
        v0 += c;
        break;
      }
  }
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
}

void check_i32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(), name, " must be a contiguous int32 tensor");
}

Lines make_lines(const torch::Tensor& pin, const torch::Tensor& pout, const torch::Tensor& len,
                 const torch::Tensor& clsptr, int64_t np) {
  check_i32(pin, "pin");
  check_i32(pout, "pout");
  check_i32(len, "len");
  check_i32(clsptr, "clsptr");
  TORCH_CHECK(np % kLanes == 0, "np must be a multiple of 16");
  TORCH_CHECK(pin.numel() == pout.numel() && pin.numel() == len.numel(), "line tables differ in size");
  return Lines{pin.data_ptr<int>(), pout.data_ptr<int>(), len.data_ptr<int>(), clsptr.data_ptr<int>(), (int)np};
}

// Tile width T (positions) for a chunk of V vectors: T * V accumulators fill most of the 32 registers.
#define SPARSECL_DISPATCH(NV, CALL) \
  switch (NV) {                      \
    case 8: CALL(3, 8); break;       \
    case 6: CALL(4, 6); break;       \
    case 4: CALL(6, 4); break;       \
    case 3: CALL(8, 3); break;       \
    case 2: CALL(8, 2); break;       \
    default: CALL(12, 1); break;     \
  }

}  // namespace

// in: padded input; lines (pin, pout, len, clsptr) per class; step: input step along a line (1 or 2);
// ostep: output floats between neighbouring positions of a line; sblines: lines per cache block.
void gather(torch::Tensor in, torch::Tensor val, torch::Tensor noff, torch::Tensor blkptr, int64_t nblk,
            torch::Tensor rowcls, torch::Tensor rowbase, torch::Tensor pin, torch::Tensor pout, torch::Tensor len,
            torch::Tensor clsptr, int64_t np, int64_t step, int64_t ostep, int64_t sblines, torch::Tensor out) {
  check_f32(in, "input");
  check_f32(out, "output");
  check_f32(val, "values");
  check_i32(noff, "noff");
  check_i32(blkptr, "blkptr");
  check_i32(rowcls, "rowcls");
  TORCH_CHECK(rowbase.scalar_type() == torch::kInt64, "rowbase must be int64");
  const int R = rowcls.numel();
  TORCH_CHECK(blkptr.numel() == R * nblk + 1 && noff.numel() == val.numel(), "row tables differ in size");
  const Lines ln = make_lines(pin, pout, len, clsptr, np);
  const Rows rw{blkptr.data_ptr<int>(), (int)nblk, rowcls.data_ptr<int>(), rowbase.data_ptr<int64_t>(),
                noff.data_ptr<int>(), R};
  int maxlines = 0;
  for (int c = 0; c + 1 < clsptr.numel(); ++c) maxlines = std::max(maxlines, ln.clsptr[c + 1] - ln.clsptr[c]);
  const float* x = in.data_ptr<float>();
  const float* w = val.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int sb = std::max<int64_t>(1, sblines);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for_chunks(np / kLanes, [&](int v0, int nvc) {
#define CALL(T, V) gather_rows<T, V>(rw, ln, x + kLanes * v0, w, step, sb, maxlines, ostep, r0, r1, y + kLanes * v0)
      SPARSECL_DISPATCH(nvc, CALL)
#undef CALL
    });
  });
}

// g: [R][grow] gradient of the output (unpadded spatially; its lines at pout); one class.
void wgrad(torch::Tensor in, torch::Tensor g, torch::Tensor noff, torch::Tensor blkptr, int64_t nblk,
           torch::Tensor pin, torch::Tensor pout, torch::Tensor len, int64_t np, int64_t step, int64_t sblines,
           torch::Tensor dw) {
  check_f32(in, "input");
  check_f32(g, "output gradient");
  check_f32(dw, "weight gradient");
  check_i32(noff, "noff");
  check_i32(blkptr, "blkptr");
  const int R = (blkptr.numel() - 1) / nblk;
  TORCH_CHECK(dw.numel() == noff.numel(), "dw and noff differ in size");
  const auto clsptr = torch::tensor({0, (int)pin.numel()}, torch::kInt32);
  const Lines ln = make_lines(pin, pout, len, clsptr, np);
  const Rows rw{blkptr.data_ptr<int>(), (int)nblk, nullptr, nullptr, noff.data_ptr<int>(), R};
  const int64_t grow = R ? g.numel() / R : 0;
  const float* x = in.data_ptr<float>();
  const float* gg = g.data_ptr<float>();
  float* out = dw.data_ptr<float>();
  const int sb = std::max<int64_t>(1, sblines);
  // Rows are processed in groups of bounded nonzero count so the accumulators stay small (a dense
  // weight gradient of a wide layer would otherwise need 64 bytes per weight at once).
  constexpr int kMaxAcc = 8192;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<vf> acc;
    for (int64_t ga = r0; ga < r1;) {
      int64_t gb = ga + 1;
      const int kb = rw.blkptr[ga * nblk];
      while (gb < r1 && rw.blkptr[(gb + 1) * nblk] - kb <= kMaxAcc) ++gb;
      const int ke = rw.blkptr[gb * nblk];
      acc.assign(std::max(1, ke - kb), (vf){});
      for_chunks(np / kLanes, [&](int v0, int nvc) {
#define CALL(T, V) wgrad_rows<T, V>(rw, ln, x + kLanes * v0, gg + kLanes * v0, grow, step, sb, ga, gb, kb, acc.data())
        SPARSECL_DISPATCH(nvc, CALL)
#undef CALL
      });
      for (int k = kb; k < ke; ++k) {  // fixed pairwise order over the 16 lanes
        const vf a = acc[k - kb];
        float s8[8];
        for (int j = 0; j < 8; ++j) s8[j] = a[j] + a[j + 8];
        for (int j = 0; j < 4; ++j) s8[j] += s8[j + 4];
        out[k] = (s8[0] + s8[2]) + (s8[1] + s8[3]);
      }
      ga = gb;
    }
  });
}

// Tile width (positions) of the first batch chunk for nv vectors per position: lines are cut to multiples.
int64_t tile_positions(int64_t nv) {
  int64_t positions = 0;
  for_chunks(std::max<int64_t>(1, nv), [&](int v0, int nvc) {
#define CALL(T, V) positions = v0 == 0 ? T : positions
    SPARSECL_DISPATCH(nvc, CALL)
#undef CALL
  });
  return positions;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tile_positions", &tile_positions, "positions per tile for a batch of nv vectors");
  m.doc() = "sparsecl direct sparse convolution kernels (batch-last layout)";
  m.def("gather", &gather, "sparse gather convolution (forward and input gradient)");
  m.def("wgrad", &wgrad, "weight gradient at the index's nonzeros only");
  m.def("bn_relu_forward", &bn_relu_forward, "BatchNorm (+ residual) + ReLU into a zero-bordered frame");
  m.def("bn_relu_backward", &bn_relu_backward, "backward of bn_relu_forward into zero-bordered frames");
  m.def("zero_frame_border", &zero_frame_border, "zero a frame's buffer outside its values");
}
