// Per-class feature statistics of the distribution-matching family, fused on the CPU.
//
//   cpu_cf_class_sums          per-class sums of cos(t_k . e_i) and sin(t_k . e_i)   [K, F] x 2
//   cpu_cf_class_sums_bwd      d/de and d/dt of those sums, the projection recomputed
//   cpu_channel_attention      sum_hw |f|^p per channel, L2-normalised over channels [N, C]
//   cpu_channel_attention_bwd
//   cpu_channel_moments        per-sample channel means of f and f^2                 [N, C] x 2
//   cpu_channel_moments_bwd
//
// Characteristic function. The cost is the projection GEMM e @ t^T (N*F*D multiply-adds); the
// cos/sin and the per-class reduction are O(N*F). The [N, F] projection is never formed: rows are
// grouped by class (a counting sort of the labels, no comparison sort), and each group is cut into
// tiles of TM rows (TM*F*4 bytes ~ 4 MB: 256 rows at F = 4096; smaller tiles cost GEMM efficiency,
// 64 rows ran 1.4x slower than one GEMM of all rows on a 2-core AVX-512 host). Each tile is one at::mm_out
// (the BLAS torch uses, on torch's threads) into a reused buffer, then ATen's vectorised cos/sin
// (Sleef) and a column sum per class segment. With one frequency matrix for all classes a tile
// spans class boundaries (one GEMM per tile, segment sums after it); with per-class frequencies a
// tile stays inside one class. The backward recomputes each tile's projection (or reads the
// forward's, when the caller asked the forward to keep it: the small synthetic side), forms
// G = g_sin * cos(P) - g_cos * sin(P) in the tile buffer, and takes dE = G @ t_k and dt_k += G^T @ E
// as two more GEMMs per tile, so nothing [N, F] is stored there either.
//
// Channel statistics read every plane once (NCHW: a contiguous H*W plane per (n, c), reduced with
// a vectorisable inner loop; channels_last: the channel vector of each pixel, accumulated into a
// [C] row). Other strides are made NCHW-contiguous first (one copy) by the caller.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// rows grouped by class: order[offsets[k] .. offsets[k+1]) are the rows of class k, in row order
void group_rows(const at::Tensor& labels, int64_t K, std::vector<int64_t>& order, std::vector<int64_t>& offsets) {
  auto lab = labels.to(at::kLong).contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  const int64_t N = lab.numel();
  offsets.assign(K + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(l[i] >= 0 && l[i] < K, "datadam_fast: label ", l[i], " at row ", i, " outside [0, ", K, ")");
    offsets[l[i] + 1]++;
  }
  for (int64_t k = 0; k < K; ++k) offsets[k + 1] += offsets[k];
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  order.resize(N);
  for (int64_t i = 0; i < N; ++i) order[fill[l[i]]++] = i;
}

int64_t tile_rows(int64_t F) {
  return std::max<int64_t>(16, std::min<int64_t>(512, (int64_t(1) << 20) / std::max<int64_t>(F, 1)));
}

// One tile: rows order[a..b) (inside class k when per-class), their projection into P[0..b-a).
struct Tile {
  int64_t a, b;
  int64_t k;  // class of the tile when the frequencies are per class; -1 for shared frequencies
};

std::vector<Tile> make_tiles(const std::vector<int64_t>& offsets, int64_t K, int64_t TM, bool per_class) {
  std::vector<Tile> tiles;
  if (per_class) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t a = offsets[k]; a < offsets[k + 1]; a += TM)
        tiles.push_back({a, std::min(a + TM, offsets[k + 1]), k});
  } else {
    const int64_t N = offsets[K];
    for (int64_t a = 0; a < N; a += TM) tiles.push_back({a, std::min(a + TM, N), -1});
  }
  return tiles;
}

// the tile's rows E[order[a..a+n)]: a view of E when they are consecutive (class-major input, what
// the engine passes: no copy), else gathered into Et
at::Tensor tile_rows_of(const at::Tensor& E, const std::vector<int64_t>& order, int64_t a, int64_t n, at::Tensor& Et);

// Et[0..n) = E[order[a..a+n)]
void gather_rows(const at::Tensor& E, const std::vector<int64_t>& order, int64_t a, int64_t n, at::Tensor& Et) {
  const int64_t D = E.size(1);
  const size_t bytes = size_t(D) * E.element_size();
  const char* src = static_cast<const char*>(E.data_ptr());
  char* dst = static_cast<char*>(Et.data_ptr());
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * bytes, src + order[a + i] * bytes, bytes);
  });
}

at::Tensor tile_rows_of(const at::Tensor& E, const std::vector<int64_t>& order, int64_t a, int64_t n, at::Tensor& Et) {
  // order is increasing inside a class (a stable counting sort), so consecutive <=> span n - 1
  if (n > 0 && order[a + n - 1] - order[a] == n - 1) return E.narrow(0, order[a], n);
  gather_rows(E, order, a, n, Et);
  return Et.narrow(0, 0, n);
}

// the class segments [s, e) of tile rows (indices into the tile) and their class
template <typename F>
void for_segments(const Tile& t, const std::vector<int64_t>& offsets, int64_t K, F&& fn) {
  if (t.k >= 0) {
    fn(int64_t(0), t.b - t.a, t.k);
    return;
  }
  // first class whose range ends after t.a
  int64_t k = std::upper_bound(offsets.begin(), offsets.end(), t.a) - offsets.begin() - 1;
  for (; k < K && offsets[k] < t.b; ++k) {
    const int64_t s = std::max(offsets[k], t.a), e = std::min(offsets[k + 1], t.b);
    if (e > s) fn(s - t.a, e - t.a, k);
  }
}

at::Tensor freq_of(const at::Tensor& T, int64_t k) { return T.dim() == 2 ? T : T.select(0, k); }

void check_cf_inputs(const at::Tensor& emb, const at::Tensor& freqs, const at::Tensor& labels, int64_t K) {
  TORCH_CHECK(emb.dim() == 2, "datadam_fast: embeddings must be [N, D]");
  TORCH_CHECK(freqs.dim() == 2 || freqs.dim() == 3, "datadam_fast: frequencies must be [F, D] or [K, F, D]");
  TORCH_CHECK(freqs.size(-1) == emb.size(1), "datadam_fast: frequency width != embedding width");
  TORCH_CHECK(freqs.dim() == 2 || freqs.size(0) == K, "datadam_fast: [K, F, D] frequencies need K = num_classes");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == emb.size(0), "datadam_fast: one label per embedding row");
  TORCH_CHECK(emb.scalar_type() == freqs.scalar_type(), "datadam_fast: embeddings and frequencies differ in dtype");
  TORCH_CHECK(emb.scalar_type() == at::kFloat || emb.scalar_type() == at::kDouble,
              "datadam_fast: cpu_cf_class_sums takes float32 or float64 (the caller converts)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_cf_class_sums(const at::Tensor& emb_in, const at::Tensor& freqs_in,
                                                                 const at::Tensor& labels, int64_t K,
                                                                 bool save_projection) {
  check_cf_inputs(emb_in, freqs_in, labels, K);
  auto E = emb_in.contiguous();
  auto T = freqs_in.contiguous();
  const int64_t N = E.size(0), D = E.size(1), F = T.size(-2);
  const bool per_class = T.dim() == 3;
  auto opts = E.options();
  auto cos_s = at::zeros({K, F}, opts), sin_s = at::zeros({K, F}, opts);
  auto proj = save_projection ? at::empty({N, F}, opts) : at::empty({0}, opts);
  if (N == 0 || F == 0) return {cos_s, sin_s, proj};
  std::vector<int64_t> order, offsets;
  group_rows(labels, K, order, offsets);
  const int64_t TM = tile_rows(F);
  auto Et = at::empty({TM, D}, opts), P = at::empty({TM, F}, opts);
  auto C = at::empty({TM, F}, opts), S = at::empty({TM, F}, opts), col = at::empty({F}, opts);
  const size_t row_bytes = size_t(F) * E.element_size();
  for (const Tile& t : make_tiles(offsets, K, TM, per_class)) {
    const int64_t n = t.b - t.a;
    auto p = P.narrow(0, 0, n), c = C.narrow(0, 0, n), s = S.narrow(0, 0, n);
    auto et = tile_rows_of(E, order, t.a, n, Et);
    at::mm_out(p, et, freq_of(T, t.k >= 0 ? t.k : 0).t());
    if (save_projection) {
      const char* src = static_cast<const char*>(P.data_ptr());
      char* dst = static_cast<char*>(proj.data_ptr());
      for (int64_t i = 0; i < n; ++i) std::memcpy(dst + order[t.a + i] * row_bytes, src + i * row_bytes, row_bytes);
    }
    at::cos_out(c, p);
    at::sin_out(s, p);
    for_segments(t, offsets, K, [&](int64_t s0, int64_t s1, int64_t k) {
      at::sum_out(col, c.narrow(0, s0, s1 - s0), {0});
      cos_s.select(0, k).add_(col);
      at::sum_out(col, s.narrow(0, s0, s1 - s0), {0});
      sin_s.select(0, k).add_(col);
    });
  }
  return {cos_s, sin_s, proj};
}

std::tuple<at::Tensor, at::Tensor> cpu_cf_class_sums_bwd(const at::Tensor& emb_in, const at::Tensor& freqs_in,
                                                         const at::Tensor& labels, int64_t K,
                                                         const at::Tensor& grad_cos_in, const at::Tensor& grad_sin_in,
                                                         const at::Tensor& proj, bool need_emb, bool need_freqs) {
  check_cf_inputs(emb_in, freqs_in, labels, K);
  auto E = emb_in.contiguous();
  auto T = freqs_in.contiguous();
  const int64_t N = E.size(0), D = E.size(1), F = T.size(-2);
  const bool per_class = T.dim() == 3;
  auto opts = E.options();
  auto gc = grad_cos_in.to(E.scalar_type()).contiguous(), gs = grad_sin_in.to(E.scalar_type()).contiguous();
  TORCH_CHECK(gc.sizes() == at::IntArrayRef({K, F}) && gs.sizes() == at::IntArrayRef({K, F}),
              "datadam_fast: gradients of the class sums must be [K, F]");
  const bool saved = proj.numel() == N * F && N * F > 0;
  auto grad_emb = need_emb ? at::zeros({N, D}, opts) : at::empty({0}, opts);
  auto grad_freqs = need_freqs ? at::zeros(T.sizes(), opts) : at::empty({0}, opts);
  if (N == 0 || F == 0 || (!need_emb && !need_freqs)) return {grad_emb, grad_freqs};
  std::vector<int64_t> order, offsets;
  group_rows(labels, K, order, offsets);
  const int64_t TM = tile_rows(F);
  auto Et = at::empty({TM, D}, opts), P = at::empty({TM, F}, opts), S = at::empty({TM, F}, opts);
  auto dEt = at::empty({TM, D}, opts);
  auto Pc = proj.contiguous();
  const size_t row_bytes = size_t(F) * E.element_size(), emb_bytes = size_t(D) * E.element_size();
  for (const Tile& t : make_tiles(offsets, K, TM, per_class)) {
    const int64_t n = t.b - t.a;
    auto p = P.narrow(0, 0, n), s = S.narrow(0, 0, n);
    auto Tk = freq_of(T, t.k >= 0 ? t.k : 0);
    auto et = tile_rows_of(E, order, t.a, n, Et);
    if (saved) {
      const char* src = static_cast<const char*>(Pc.data_ptr());
      char* dst = static_cast<char*>(P.data_ptr());
      for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row_bytes, src + order[t.a + i] * row_bytes, row_bytes);
    } else {
      at::mm_out(p, et, Tk.t());
    }
    // G = g_sin[k] * cos(P) - g_cos[k] * sin(P), in place in P (its sine kept in S first)
    at::sin_out(s, p);
    p.cos_();
    for_segments(t, offsets, K, [&](int64_t s0, int64_t s1, int64_t k) {
      auto pp = p.narrow(0, s0, s1 - s0), ss = s.narrow(0, s0, s1 - s0);
      pp.mul_(gs.select(0, k));
      pp.sub_(ss.mul_(gc.select(0, k)));
    });
    if (need_emb) {
      auto de = dEt.narrow(0, 0, n);
      if (per_class) {
        at::mm_out(de, p, Tk);
      } else {
        at::mm_out(de, p, T);
      }
      const char* src = static_cast<const char*>(dEt.data_ptr());
      char* dst = static_cast<char*>(grad_emb.data_ptr());
      for (int64_t i = 0; i < n; ++i) std::memcpy(dst + order[t.a + i] * emb_bytes, src + i * emb_bytes, emb_bytes);
    }
    if (need_freqs) {
      auto gT = per_class ? grad_freqs.select(0, t.k) : grad_freqs;
      gT.addmm_(p.t(), et);
    }
  }
  return {grad_emb, grad_freqs};
}

// ------------------------------------------------------------------------------------ channels
namespace {

template <typename scalar_t>
inline scalar_t abs_pow(scalar_t x, int mode, scalar_t power) {
  const scalar_t a = std::abs(x);
  switch (mode) {
    case 1: return a;
    case 2: return a * a;
    case 3: return a * a * a;
    case 4: { const scalar_t q = a * a; return q * q; }
    default: return a == scalar_t(0) ? scalar_t(0) : std::pow(a, power);
  }
}

// d|x|^p / dx
template <typename scalar_t>
inline scalar_t abs_pow_grad(scalar_t x, int mode, scalar_t power) {
  const scalar_t a = std::abs(x);
  const scalar_t sg = x > 0 ? scalar_t(1) : (x < 0 ? scalar_t(-1) : scalar_t(0));
  switch (mode) {
    case 1: return sg;
    case 2: return scalar_t(2) * x;
    case 3: return scalar_t(3) * a * x;
    case 4: return scalar_t(4) * a * a * x;
    default: return a == scalar_t(0) ? scalar_t(0) : power * std::pow(a, power - scalar_t(1)) * sg;
  }
}

int power_mode(double p) { return (p == 1.0 || p == 2.0 || p == 3.0 || p == 4.0) ? int(p) : 0; }

bool is_channels_last(const at::Tensor& f) {
  return f.dim() == 4 && !f.is_contiguous() && f.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor dense(const at::Tensor& f) { return is_channels_last(f) ? f : f.contiguous(); }

void check_features(const at::Tensor& f, const char* op) {
  TORCH_CHECK(f.dim() == 4, "datadam_fast: ", op, " takes [N, C, H, W] feature maps");
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
              "datadam_fast: ", op, " takes float32 or float64 (the caller converts)");
}

// s[n, c] = sum_hw phi(f[n, c, hw]) for two functions at once (phi1, phi2), one read of f
template <typename scalar_t, typename Phi>
void plane_sums(const at::Tensor& f, at::Tensor& out1, at::Tensor* out2, Phi&& phi) {
  const int64_t N = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  const scalar_t* x = f.data_ptr<scalar_t>();
  scalar_t* o1 = out1.data_ptr<scalar_t>();
  scalar_t* o2 = out2 ? out2->data_ptr<scalar_t>() : nullptr;
  if (!is_channels_last(f)) {
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t nc = lo; nc < hi; ++nc) {
        const scalar_t* p = x + nc * HW;
        scalar_t a1 = 0, a2 = 0;
        for (int64_t i = 0; i < HW; ++i) {
          scalar_t v1, v2;
          phi(p[i], v1, v2);
          a1 += v1;
          a2 += v2;
        }
        o1[nc] = a1;
        if (o2) o2[nc] = a2;
      }
    });
  } else {
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> a1(C), a2(C);
      for (int64_t n = lo; n < hi; ++n) {
        std::fill(a1.begin(), a1.end(), scalar_t(0));
        std::fill(a2.begin(), a2.end(), scalar_t(0));
        const scalar_t* p = x + n * HW * C;
        for (int64_t i = 0; i < HW; ++i, p += C)
          for (int64_t c = 0; c < C; ++c) {
            scalar_t v1, v2;
            phi(p[c], v1, v2);
            a1[c] += v1;
            a2[c] += v2;
          }
        std::copy(a1.begin(), a1.end(), o1 + n * C);
        if (o2) std::copy(a2.begin(), a2.end(), o2 + n * C);
      }
    });
  }
}

// g[n, c, hw] = psi(f[n, c, hw], n, c) written in f's layout
template <typename scalar_t, typename Psi>
at::Tensor plane_map(const at::Tensor& f, Psi&& psi) {
  const int64_t N = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  const bool cl = is_channels_last(f);
  auto g = at::empty_like(f, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const scalar_t* x = f.data_ptr<scalar_t>();
  scalar_t* y = g.data_ptr<scalar_t>();
  if (!cl) {
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t nc = lo; nc < hi; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        for (int64_t i = 0; i < HW; ++i) y[nc * HW + i] = psi(x[nc * HW + i], n, c);
      }
    });
  } else {
    at::parallel_for(0, N * HW, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / HW;
        for (int64_t c = 0; c < C; ++c) y[r * C + c] = psi(x[r * C + c], n, c);
      }
    });
  }
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cpu_channel_attention(const at::Tensor& f_in, double power) {
  check_features(f_in, "cpu_channel_attention");
  auto f = dense(f_in);
  const int64_t N = f.size(0), C = f.size(1);
  auto att = at::empty({N, C}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cpu_channel_attention", [&] {
    const int mode = power_mode(power);
    const scalar_t p = scalar_t(power);
    plane_sums<scalar_t>(f, att, nullptr, [&](scalar_t v, scalar_t& a, scalar_t& b) {
      a = abs_pow(v, mode, p);
      b = 0;
    });
  });
  auto norms = att.norm(2, {1});
  att.div_(norms.clamp_min(kNormEps).unsqueeze(1));
  return {att, norms};
}

at::Tensor cpu_channel_attention_bwd(const at::Tensor& f_in, const at::Tensor& att, const at::Tensor& norms,
                                     const at::Tensor& grad_att, double power) {
  check_features(f_in, "cpu_channel_attention_bwd");
  auto f = dense(f_in);
  // dL/ds = (g - a <a, g>) / n (n > eps), g / eps otherwise: the [N, C] part, in ATen
  auto g = grad_att.to(att.scalar_type());
  auto dot = (att * g).sum(1, true);
  auto n = norms.unsqueeze(1);
  auto gs = at::where(n > kNormEps, (g - att * dot) / n.clamp_min(kNormEps), g / kNormEps).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cpu_channel_attention_bwd", [&] {
    const int mode = power_mode(power);
    const scalar_t p = scalar_t(power);
    const int64_t C = f.size(1);
    const scalar_t* w = gs.data_ptr<scalar_t>();
    out = plane_map<scalar_t>(f, [&](scalar_t v, int64_t i, int64_t c) { return abs_pow_grad(v, mode, p) * w[i * C + c]; });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cpu_channel_moments(const at::Tensor& f_in) {
  check_features(f_in, "cpu_channel_moments");
  auto f = dense(f_in);
  const int64_t N = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  auto m1 = at::empty({N, C}, f.options()), m2 = at::empty({N, C}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cpu_channel_moments", [&] {
    plane_sums<scalar_t>(f, m1, &m2, [](scalar_t v, scalar_t& a, scalar_t& b) {
      a = v;
      b = v * v;
    });
  });
  if (HW > 0) {
    m1.div_(double(HW));
    m2.div_(double(HW));
  }
  return {m1, m2};
}

at::Tensor cpu_channel_moments_bwd(const at::Tensor& f_in, const at::Tensor& g1_in, const at::Tensor& g2_in) {
  check_features(f_in, "cpu_channel_moments_bwd");
  auto f = dense(f_in);
  const int64_t HW = f.size(2) * f.size(3);
  auto g1 = g1_in.to(f.scalar_type()).contiguous(), g2 = g2_in.to(f.scalar_type()).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cpu_channel_moments_bwd", [&] {
    const int64_t C = f.size(1);
    const scalar_t inv = scalar_t(1) / scalar_t(std::max<int64_t>(HW, 1));
    const scalar_t* a = g1.data_ptr<scalar_t>();
    const scalar_t* b = g2.data_ptr<scalar_t>();
    out = plane_map<scalar_t>(f, [&](scalar_t v, int64_t i, int64_t c) {
      return (a[i * C + c] + scalar_t(2) * v * b[i * C + c]) * inv;
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(datadam_fast, m) {
  m.def("cpu_cf_class_sums(Tensor emb, Tensor freqs, Tensor labels, int num_classes, bool save_projection) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_cf_class_sums_bwd(Tensor emb, Tensor freqs, Tensor labels, int num_classes, Tensor grad_cos, "
        "Tensor grad_sin, Tensor proj, bool need_emb, bool need_freqs) -> (Tensor, Tensor)");
  m.def("cpu_channel_attention(Tensor feat, float power) -> (Tensor, Tensor)");
  m.def("cpu_channel_attention_bwd(Tensor feat, Tensor att, Tensor norms, Tensor grad_att, float power) -> Tensor");
  m.def("cpu_channel_moments(Tensor feat) -> (Tensor, Tensor)");
  m.def("cpu_channel_moments_bwd(Tensor feat, Tensor grad_mean, Tensor grad_sq) -> Tensor");
}

TORCH_LIBRARY_IMPL(datadam_fast, CPU, m) {
  m.impl("cpu_cf_class_sums", &cpu_cf_class_sums);
  m.impl("cpu_cf_class_sums_bwd", &cpu_cf_class_sums_bwd);
  m.impl("cpu_channel_attention", &cpu_channel_attention);
  m.impl("cpu_channel_attention_bwd", &cpu_channel_attention_bwd);
  m.impl("cpu_channel_moments", &cpu_channel_moments);
  m.impl("cpu_channel_moments_bwd", &cpu_channel_moments_bwd);
}
