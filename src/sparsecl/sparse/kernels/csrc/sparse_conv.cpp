// Direct sparse convolution on the CPU, tensors in batch-last layout [C][H][W][Np], Np a multiple of 16.
//
// Two kernels serve every conv/linear shape; the Python index (index.py) turns a mask into their flat tables.
//
// gather: for every row r (an output channel, or an (input channel, stride class) pair for the input
// gradient) and every position p of the row's class,
//     out[rowbase[r] + pout[p] + n] = sum_{k in row r} val[k] * in[noff[k] + pin[p] + n],   n < Np.
// wgrad:  for every nonzero k of row r (an output channel),
//     dw[k] = sum_p sum_n g[r * grow + gpos[p] + n] * in[noff[k] + pin[p] + n].
//
// Work is split over rows only, each row owned by one thread, and every sum runs in a fixed order that
// does not depend on the split, so results are bitwise identical for any thread count. Rows are walked in
// (N chunk, spatial block, reduction-channel block) order so that one input slab stays in L2 and is reused
// by all of a thread's rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

// Row tables shared by both kernels (all int32 but rowbase).
struct Rows {
  const int* blkptr;      // [R * nblk + 1]: nonzeros of row r in reduction block b are blkptr[r*nblk+b] ..
  int nblk;
  const int* rowcls;      // [R]: class of row r (selects its positions)
  const int64_t* rowbase; // [R]: offset of row r's output (gather only)
  const int* clsptr;      // [ncls + 1]: positions of class c are clsptr[c] .. clsptr[c+1]
  const int* noff;        // [nnz]
  int R;
};

// One tile: T positions x V vectors of 16 batch entries, accumulated over nonzeros k0..k1.
template <int T, int V>
inline void gather_tile(const float* __restrict in, const int* __restrict noff, const float* __restrict val,
                        int k0, int k1, const int* __restrict pin, const int* __restrict pout, int tt,
                        bool first, float* __restrict out) {
  vf acc[T][V];
  int po[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    po[t] = t < tt ? pin[t] : pin[0];  // a short tail tile re-reads position 0 and discards it
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[t][v] = (first || t >= tt) ? (vf){} : load(out + pout[t] + kLanes * v);
  }
  for (int k = k0; k < k1; ++k) {
    const float* base = in + noff[k];
    const vf w = (vf){} + val[k];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[t][v] += w * load(base + po[t] + kLanes * v);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
    if (t < tt)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) store(out + pout[t] + kLanes * v, acc[t][v]);
}

// Rows r0..r1 on one N chunk (in/out already offset to the chunk).
template <int T, int V>
void gather_rows(const Rows& rw, const float* in, const float* val, const int* pin, const int* pout, int sbpos,
                 int maxpos, int64_t r0, int64_t r1, float* out) {
  for (int s0 = 0; s0 < maxpos; s0 += sbpos) {
    for (int b = 0; b < rw.nblk; ++b) {
      for (int64_t r = r0; r < r1; ++r) {
        const int k0 = rw.blkptr[r * rw.nblk + b], k1 = rw.blkptr[r * rw.nblk + b + 1];
        if (b > 0 && k0 == k1) continue;  // block 0 always runs: it writes the row (zeros if empty)
        const int c = rw.rowcls[r];
        const int pbeg = rw.clsptr[c] + s0, pend = std::min(rw.clsptr[c + 1], pbeg + sbpos);
        float* o = out + rw.rowbase[r];
        for (int p = pbeg; p < pend; p += T)
          gather_tile<T, V>(in, rw.noff, val, k0, k1, pin + p, pout + p, std::min(T, pend - p), b == 0, o);
      }
    }
  }
}

// Sampled weight gradient of rows r0..r1 on one N chunk; acc[k - kbase] collects 16 partial sums per nonzero.
template <int T, int V>
void wgrad_rows(const Rows& rw, const float* in, const float* g, int64_t grow, const int* pin, const int* gpos,
                int sbpos, int npos, int64_t r0, int64_t r1, int kbase, vf* acc) {
  for (int s0 = 0; s0 < npos; s0 += sbpos) {
    const int pend = std::min(npos, s0 + sbpos);
    for (int b = 0; b < rw.nblk; ++b) {
      for (int64_t r = r0; r < r1; ++r) {
        const int k0 = rw.blkptr[r * rw.nblk + b], k1 = rw.blkptr[r * rw.nblk + b + 1];
        if (k0 == k1) continue;
        const float* gr = g + r * grow;
        for (int p = s0; p < pend; p += T) {
          const int tt = std::min(T, pend - p);
          vf gg[T][V];
          int po[T];
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            po[t] = t < tt ? pin[p + t] : pin[p];
#pragma GCC unroll 16
            for (int v = 0; v < V; ++v) gg[t][v] = t < tt ? load(gr + gpos[p + t] + kLanes * v) : (vf){};
          }
          for (int k = k0; k < k1; ++k) {
            const float* base = in + rw.noff[k];
            vf part[4] = {(vf){}, (vf){}, (vf){}, (vf){}};
#pragma GCC unroll 16
            for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
              for (int v = 0; v < V; ++v) part[(t * V + v) & 3] += gg[t][v] * load(base + po[t] + kLanes * v);
            acc[k - kbase] += (part[0] + part[1]) + (part[2] + part[3]);
          }
        }
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

Rows make_rows(const torch::Tensor& blkptr, int64_t nblk, const torch::Tensor& rowcls, const torch::Tensor& rowbase,
               const torch::Tensor& clsptr, const torch::Tensor& noff) {
  const int R = rowcls.numel();
  TORCH_CHECK(blkptr.numel() == R * nblk + 1, "blkptr size");
  return Rows{blkptr.data_ptr<int>(), (int)nblk, rowcls.data_ptr<int>(),
              rowbase.defined() && rowbase.numel() ? rowbase.data_ptr<int64_t>() : nullptr,
              clsptr.data_ptr<int>(), noff.data_ptr<int>(), R};
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// np: floats per position (a multiple of 16); sbpos: positions per spatial block.
void gather(torch::Tensor in, torch::Tensor val, torch::Tensor noff, torch::Tensor blkptr, int64_t nblk,
            torch::Tensor rowcls, torch::Tensor rowbase, torch::Tensor clsptr, torch::Tensor pin,
            torch::Tensor pout, int64_t np, int64_t sbpos, torch::Tensor out) {
  check_f32(in, "input");
  check_f32(out, "output");
  check_f32(val, "values");
  TORCH_CHECK(np % kLanes == 0, "np must be a multiple of 16");
  const Rows rw = make_rows(blkptr, nblk, rowcls, rowbase, clsptr, noff);
  const int ncls = clsptr.numel() - 1;
  int maxpos = 0;
  for (int c = 0; c < ncls; ++c) maxpos = std::max(maxpos, rw.clsptr[c + 1] - rw.clsptr[c]);
  const float* x = in.data_ptr<float>();
  const float* w = val.data_ptr<float>();
  const int* pi = pin.data_ptr<int>();
  const int* pu = pout.data_ptr<int>();
  float* y = out.data_ptr<float>();
  const int sb = std::max<int64_t>(1, sbpos);
  at::parallel_for(0, rw.R, 1, [&](int64_t r0, int64_t r1) {
    for_chunks(np / kLanes, [&](int v0, int nvc) {
      const float* xi = x + kLanes * v0;
      float* yo = y + kLanes * v0;
      switch (nvc) {
        case 8: gather_rows<3, 8>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
        case 6: gather_rows<4, 6>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
        case 4: gather_rows<6, 4>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
        case 3: gather_rows<6, 3>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
        case 2: gather_rows<8, 2>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
        default: gather_rows<12, 1>(rw, xi, w, pi, pu, sb, maxpos, r0, r1, yo); break;
      }
    });
  });
}

// g: [R][grow] gradient of the output, gpos[p] its position offsets; one class (all rows share pin/gpos).
void wgrad(torch::Tensor in, torch::Tensor g, torch::Tensor noff, torch::Tensor blkptr, int64_t nblk,
           torch::Tensor pin, torch::Tensor gpos, int64_t np, int64_t sbpos, torch::Tensor dw) {
  check_f32(in, "input");
  check_f32(g, "output gradient");
  check_f32(dw, "weight gradient");
  TORCH_CHECK(np % kLanes == 0, "np must be a multiple of 16");
  const int R = (blkptr.numel() - 1) / nblk;
  const auto zero_cls = torch::zeros({R}, torch::kInt32);
  const auto clsptr = torch::tensor({0, (int)pin.numel()}, torch::kInt32);
  const Rows rw = make_rows(blkptr, nblk, zero_cls, torch::Tensor(), clsptr, noff);
  const int npos = pin.numel();
  const int64_t grow = R ? g.numel() / R : 0;
  const float* x = in.data_ptr<float>();
  const float* gg = g.data_ptr<float>();
  const int* pi = pin.data_ptr<int>();
  const int* gp = gpos.data_ptr<int>();
  float* out = dw.data_ptr<float>();
  const int sb = std::max<int64_t>(1, sbpos);
  // Rows are processed in groups of bounded nonzero count so the accumulators stay small (a dense
  // weight gradient of a wide layer would otherwise need 64 bytes per weight).
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
        const float* xi = x + kLanes * v0;
        const float* gi = gg + kLanes * v0;
        switch (nvc) {
          case 8: wgrad_rows<2, 8>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
          case 6: wgrad_rows<4, 6>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
          case 4: wgrad_rows<4, 4>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
          case 3: wgrad_rows<4, 3>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
          case 2: wgrad_rows<8, 2>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
          default: wgrad_rows<8, 1>(rw, xi, gi, grow, pi, gp, sb, npos, ga, gb, kb, acc.data()); break;
        }
      });
      for (int k = kb; k < ke; ++k) {
        // fixed pairwise order over the 16 lanes
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsecl direct sparse convolution kernels (batch-last layout)";
  m.def("gather", &gather, "sparse gather convolution (forward and input gradient)");
  m.def("wgrad", &wgrad, "weight gradient at the index's nonzeros only");
}
