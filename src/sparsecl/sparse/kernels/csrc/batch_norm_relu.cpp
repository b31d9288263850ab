// BatchNorm (+ residual) + ReLU of batch-last tensors held in zero-bordered buffers ("frames").
//
// A frame is a tensor [C][Hb][Wb][Nb] whose values sit at rows top..top+H, columns left..left+W and the
// first N batch lanes; everything else (the border and the padded lanes) is zero. The sparse
// convolutions read their input and their output gradient in such buffers, so these kernels write
// them directly: the forward writes relu(bn(y) + residual) into the next convolution's zero-padded
// input, the backward writes the BatchNorm input gradient into the producing convolution's padded
// output-gradient buffer. Only borders are zero-filled.
//
// Each channel is owned by one thread and every sum runs in a fixed order, so results are bitwise
// identical for any thread count. Sums are taken over 16-lane float vectors per image row and added
// into doubles per row.
#include "batch_norm_relu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }

inline double lanes_sum(vf a) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += a[j];
  return s;
}

// Element (c, h, w, n) of a frame's values: at(c, h, w)[n].
struct View {
  float* p = nullptr;
  int64_t cs = 0, hs = 0, ws = 0;
  View() = default;
  View(const torch::Tensor& t, int64_t top, int64_t left) {
    TORCH_CHECK(t.dim() == 4 && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(),
                "frames must be contiguous float32 CPU tensors [C, H, W, N]");
    ws = t.size(3);
    hs = t.size(2) * ws;
    cs = t.size(1) * hs;
    p = t.data_ptr<float>() + top * hs + left * ws;
  }
  float* at(int64_t c, int64_t h, int64_t w) const { return p + c * cs + h * hs + w * ws; }
};

// Zero channel c of buffer t outside its values (rows, columns and batch lanes).
void zero_border(const torch::Tensor& t, int64_t c, int64_t top, int64_t left, int64_t H, int64_t W, int64_t N) {
  const int64_t Hb = t.size(1), Wb = t.size(2), Nb = t.size(3), hs = Wb * Nb;
  float* b = t.data_ptr<float>() + c * Hb * hs;
  std::fill(b, b + top * hs, 0.f);
  std::fill(b + (top + H) * hs, b + Hb * hs, 0.f);
  for (int64_t h = top; h < top + H; ++h) {
    float* row = b + h * hs;
    std::fill(row, row + left * Nb, 0.f);
    std::fill(row + (left + W) * Nb, row + hs, 0.f);
    if (N < Nb)
      for (int64_t w = left; w < left + W; ++w) std::fill(row + w * Nb + N, row + (w + 1) * Nb, 0.f);
  }
}

// sum over the channel's values of f(h, w, n), f returning a float; fixed order.
template <typename F>
double channel_sum(int64_t H, int64_t W, int64_t N, F&& f) {
  double s = 0;
  for (int64_t h = 0; h < H; ++h) {
    vf acc = {};
    float tail = 0;
    for (int64_t w = 0; w < W; ++w) {
      int64_t n = 0;
      for (; n + kLanes <= N; n += kLanes) acc += f.vec(h, w, n);
      for (; n < N; ++n) tail += f.one(h, w, n);
    }
    s += lanes_sum(acc) + tail;
  }
  return s;
}

// sums over the channel of g and g * (y - mu), g the ReLU-masked output gradient, in one pass.
void grad_sums(const View& g, const View& o, const View& y, int64_t c, float mu, int64_t H, int64_t W, int64_t N,
               double& gsum, double& dot) {
  gsum = dot = 0;
  for (int64_t h = 0; h < H; ++h) {
    vf as = {}, ad = {};
    float ts = 0, td = 0;
    for (int64_t w = 0; w < W; ++w) {
      const float *gi = g.at(c, h, w), *oi = o.at(c, h, w), *yi = y.at(c, h, w);
      int64_t n = 0;
      for (; n + kLanes <= N; n += kLanes) {
        const vf gm = load(oi + n) > 0.f ? load(gi + n) : (vf){};
        as += gm;
        ad += gm * (load(yi + n) - mu);
      }
      for (; n < N; ++n) {
        const float gm = oi[n] > 0.f ? gi[n] : 0.f;
        ts += gm;
        td += gm * (yi[n] - mu);
      }
    }
    gsum += lanes_sum(as) + ts;
    dot += lanes_sum(ad) + td;
  }
}

}  // namespace

void bn_relu_forward(torch::Tensor y, int64_t ytop, int64_t yleft, int64_t H, int64_t W, int64_t N,
                     torch::Tensor res, int64_t rtop, int64_t rleft, torch::Tensor gamma, torch::Tensor beta,
                     torch::Tensor mean, torch::Tensor var, torch::Tensor invstd, bool batch_stats, double eps,
                     torch::Tensor out, int64_t otop, int64_t oleft) {
  const View vy(y, ytop, yleft), vo(out, otop, oleft);
  const bool has_res = res.defined() && res.numel();
  const View vr = has_res ? View(res, rtop, rleft) : View();
  const int64_t C = y.size(0);
  TORCH_CHECK(out.size(0) == C && gamma.numel() == C && beta.numel() == C && mean.numel() == C &&
                  var.numel() == C && invstd.numel() == C,
              "batch_norm_relu: channel counts differ");
  const float *g = gamma.data_ptr<float>(), *b = beta.data_ptr<float>();
  float *m = mean.data_ptr<float>(), *v = var.data_ptr<float>(), *is = invstd.data_ptr<float>();
  const double count = double(H) * W * N;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (batch_stats) {
        struct {
          const View& y;
          int64_t c;
          vf vec(int64_t h, int64_t w, int64_t n) const { return load(y.at(c, h, w) + n); }
          float one(int64_t h, int64_t w, int64_t n) const { return y.at(c, h, w)[n]; }
        } values{vy, c};
        const float mu = float(channel_sum(H, W, N, values) / count);
        struct {
          const View& y;
          int64_t c;
          float mu;
          vf vec(int64_t h, int64_t w, int64_t n) const {
            const vf d = load(y.at(c, h, w) + n) - mu;
            return d * d;
          }
          float one(int64_t h, int64_t w, int64_t n) const {
            const float d = y.at(c, h, w)[n] - mu;
            return d * d;
          }
        } squares{vy, c, mu};
        m[c] = mu;
        v[c] = float(channel_sum(H, W, N, squares) / count);
      }
      is[c] = float(1.0 / std::sqrt(double(v[c]) + eps));
      const float scale = g[c] * is[c], shift = b[c] - m[c] * scale;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const float* yi = vy.at(c, h, w);
          const float* ri = has_res ? vr.at(c, h, w) : nullptr;
          float* o = vo.at(c, h, w);
          if (ri) {
            for (int64_t n = 0; n < N; ++n) {
              const float t = yi[n] * scale + shift + ri[n];
              o[n] = t < 0.f ? 0.f : t;
            }
          } else {
            for (int64_t n = 0; n < N; ++n) {
              const float t = yi[n] * scale + shift;
              o[n] = t < 0.f ? 0.f : t;
            }
          }
        }
      zero_border(out, c, otop, oleft, H, W, N);
    }
  });
}

void bn_relu_backward(torch::Tensor gout, torch::Tensor out, int64_t otop, int64_t oleft, torch::Tensor y,
                      int64_t ytop, int64_t yleft, int64_t H, int64_t W, int64_t N, torch::Tensor mean,
                      torch::Tensor invstd, torch::Tensor gamma, bool batch_stats, torch::Tensor gy,
                      torch::Tensor gres, int64_t rtop, int64_t rleft, torch::Tensor dgamma, torch::Tensor dbeta) {
  const View vg(gout, otop, oleft), vo(out, otop, oleft), vy(y, ytop, yleft), vgy(gy, ytop, yleft);
  TORCH_CHECK(gout.sizes() == out.sizes() && gy.sizes() == y.sizes(), "batch_norm_relu: gradient shapes differ");
  const bool has_res = gres.defined() && gres.numel();
  const View vr = has_res ? View(gres, rtop, rleft) : View();
  const int64_t C = y.size(0);
  const float *m = mean.data_ptr<float>(), *is = invstd.data_ptr<float>(), *ga = gamma.data_ptr<float>();
  float *dg = dgamma.data_ptr<float>(), *db = dbeta.data_ptr<float>();
  const double count = double(H) * W * N;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float mu = m[c];
      double gsum, dot;  // the ReLU's gradient: gout where the output is positive (the residual's, too)
      grad_sums(vg, vo, vy, c, mu, H, W, N, gsum, dot);
      dg[c] = float(dot * is[c]);
      db[c] = float(gsum);
      const float scale = ga[c] * is[c];
      const float gmean = batch_stats ? float(gsum / count) : 0.f;
      const float k = batch_stats ? float(dot * is[c] * is[c] / count) : 0.f;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const float *gi = vg.at(c, h, w), *oi = vo.at(c, h, w), *yi = vy.at(c, h, w);
          float* gx = vgy.at(c, h, w);
          for (int64_t n = 0; n < N; ++n) {
            const float g = oi[n] > 0.f ? gi[n] : 0.f;
            gx[n] = (g - gmean - (yi[n] - mu) * k) * scale;
          }
          if (has_res) {
            float* gr = vr.at(c, h, w);
            for (int64_t n = 0; n < N; ++n) gr[n] = oi[n] > 0.f ? gi[n] : 0.f;
          }
        }
      zero_border(gy, c, ytop, yleft, H, W, N);
      if (has_res) zero_border(gres, c, rtop, rleft, H, W, N);
    }
  });
}

void zero_frame_border(torch::Tensor t, int64_t top, int64_t left, int64_t H, int64_t W, int64_t N) {
  View(t, top, left);  // checks the buffer
  at::parallel_for(0, t.size(0), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) zero_border(t, c, top, left, H, W, N);
  });
}
