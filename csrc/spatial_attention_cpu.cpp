// Fused CPU kernels for datadam_fast's spatial attention (backend="cpu").
//
// forward(feats, p)  -> (maps, norms)
//     a[n, hw] = sum_c |f[n, c, hw]|^p         accumulated in float32 (float64 for float64 input)
//     norms[n] = ||a[n, :]||_2                 (sum of squares accumulated in float64)
//     maps[n]  = a[n] / max(norms[n], eps)    (F.normalize semantics, eps = 1e-12)
// backward(feats, maps, norms, grad_maps, p) -> grads
//     ga[n, hw]          = (g - m <m, g>) / n   if n > eps, else g / eps
//     grad_f[n, c, hw]   = p |f|^(p-1) sign(f) ga[n, hw]     (written once, in the input dtype)
//
// Every feature map is read once per direction and nothing of size [N, C, H, W] is materialised
// other than the gradient itself. All layers of a call are processed in one C++ call.
//
// Layouts: NCHW-contiguous and channels_last are handled natively (channels_last reduces over the
// contiguous C of each pixel); any other strides are first made NCHW-contiguous (one extra copy)
// and the gradient is then returned NCHW-contiguous. A channels_last input gets a channels_last
// gradient.
//
// Dtypes: float32, float64, bfloat16, float16 (low precision is accumulated in float32).
//
// Parallelism: one at::parallel_for region per call for all layers (torch's intra-op pool; with
// torch's OpenMP backend the header template needs -fopenmp, which _build passes) over work units =
// (layer, sample, block of H*W), in cost-balanced chunks claimed dynamically. A whole sample is one
// unit when there are enough samples to keep every thread busy; otherwise (N small, e.g. N == 1)
// each sample's H*W range is cut into blocks so that one large map is still spread over all
// threads, and the per-sample normalisation of those layers runs as a second (cheap, O(N*H*W))
// region.
//
// Inner loops are plain loops over contiguous memory written for the compiler's auto-vectoriser
// (-O3 -march=native -fno-trapping-math; reductions carry `omp simd reduction`). The power is a
// compile-time functor for p in {1, 2, 3, 4} and p in {1.5, 2.5, 3.5, 4.5}; any other p uses a
// vectorisable exp(p log|f|) evaluated in double for float32 accumulation (<= 1 ulp from powf)
// and std::pow for float64.
// Non-finite inputs are not special-cased: they propagate NaN/Inf like the PyTorch reference
// (including sign(NaN) == 0 for p == 1, as torch.sign).
//
// Gradient buffers of >= 8 MiB get madvise(MADV_HUGEPAGE) before they are first written (see
// advise_huge_pages): faulting in a fresh 50 MB buffer 4 KiB at a time otherwise costs several
// times the kernel itself. backward(..., huge_pages=False) skips the advice.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define DDF_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
// Lets the vectoriser reassociate a float sum (it may not without -ffast-math).
#define DDF_SIMD_REDUCE_ADD(var) DDF_PRAGMA(omp simd reduction(+ : var))
#else
#define DDF_SIMD_REDUCE_ADD(var)
#endif

namespace {

// The eps of a / max(||a||, eps): one value for every backend, passed by the build
// (datadam_fast/_constants.py: NORM_EPS -> -DDATADAM_FAST_NORM_EPS=...).
#ifndef DATADAM_FAST_NORM_EPS
#error "compile with -DDATADAM_FAST_NORM_EPS=<eps> (datadam_fast._constants.native_defines())"
#endif
constexpr double kNormEps = DATADAM_FAST_NORM_EPS;

// ------------------------------------------------------------------------------------------
// Element types: raw storage <-> accumulation type, written so that the vectoriser sees
// plain integer/float operations (no calls into c10 conversion helpers on the hot path).
// ------------------------------------------------------------------------------------------
struct ElemF32 {
  using raw = float;
  using acc = float;
  static inline acc load(raw x) { return x; }
  static inline raw store(acc x) { return x; }
};

struct ElemF64 {
  using raw = double;
  using acc = double;
  static inline acc load(raw x) { return x; }
  static inline raw store(acc x) { return x; }
};

struct ElemBF16 {
  using raw = uint16_t;
  using acc = float;
  static inline acc load(raw x) {
    const uint32_t w = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  }
  // Round to nearest even, NaN -> quiet NaN (same as c10::BFloat16's constructor).
  static inline raw store(acc f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? static_cast<raw>(0x7FC0u) : static_cast<raw>(r);
  }
};

// IEEE half <-> float with integer/float operations only (the branch-free algorithm of the FP16
// library that c10::Half also uses), so that loops over half data auto-vectorise; compilers do
// not vectorise _Float16 conversions without AVX512-FP16. Round to nearest even; NaN -> quiet NaN.
struct ElemF16 {
  using raw = uint16_t;
  using acc = float;
  static inline float from_bits(uint32_t w) {
    float f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  }
  static inline uint32_t to_bits(float f) {
    uint32_t w;
    std::memcpy(&w, &f, sizeof(w));
    return w;
  }
  static inline acc load(raw h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized);
    return from_bits(sign | r);
  }
  static inline raw store(acc f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<raw>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// ------------------------------------------------------------------------------------------
// Powers. fwd(x) = |x|^p, bwd(x) = |x|^(p-1) sign(x) (the factor p is folded into ga).
// ------------------------------------------------------------------------------------------
template <int K, class A>
inline A ipow(A ax) {
  if constexpr (K == 0) {
    return A(1);
  } else if constexpr (K == 1) {
    return ax;
  } else {
    const A h = ipow<K / 2>(ax);
    if constexpr (K % 2) {
      return h * h * ax;
    } else {
      return h * h;
    }
  }
}

template <class A>
inline A sign_torch(A x) {  // torch.sign: NaN -> 0
  return static_cast<A>(x > A(0)) - static_cast<A>(x < A(0));
}

template <int K>
struct PowInt {  // p = K
  template <class A>
  inline A fwd(A x) const {
    return ipow<K>(std::abs(x));
  }
  template <class A>
  inline A bwd(A x) const {
    if constexpr (K == 1) {
      return sign_torch(x);
    } else if constexpr (K == 2) {
      return x;
    } else {
      return std::copysign(ipow<K - 1>(std::abs(x)), x);
    }
  }
};

template <int K>
struct PowHalf {  // p = K + 1/2, K >= 1
  static_assert(K >= 1, "p must be >= 1");
  template <class A>
  inline A fwd(A x) const {
    const A ax = std::abs(x);
    return ipow<K>(ax) * std::sqrt(ax);
  }
  template <class A>
  inline A bwd(A x) const {
    const A ax = std::abs(x);
    return std::copysign(ipow<K - 1>(ax) * std::sqrt(ax), x);
  }
};

inline uint64_t dbl_bits(double d) {
  uint64_t b;
  std::memcpy(&b, &d, sizeof(b));
  return b;
}
inline double dbl_from(uint64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof(d));
  return d;
}

// |x|^e for float x, computed as exp(e * log|x|) in double with branch-free polynomials so that it
// auto-vectorises (-fno-trapping-math lets the compiler if-convert the selects): ~5x faster than
// scalar powf and within 1 ulp of glibc's powf. 0 -> 0 (e > 0), inf -> inf, NaN -> NaN.
inline float powf_vec(float x, double e) {
  const float ax = std::fabs(x);
  const bool regular = (ax > 0.0f) & (ax < INFINITY);  // false for 0, inf, NaN
  const double d = regular ? static_cast<double>(ax) : 1.0;
  // log(d) = k ln2 + log(m), m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh((m - 1) / (m + 1))
  const uint64_t b = dbl_bits(d);
  const double k0 = static_cast<double>(static_cast<int64_t>(b >> 52)) - 1023.0;
  const double m0 = dbl_from((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool big = m0 > 1.4142135623730951;
  const double m = big ? m0 * 0.5 : m0;
  const double k = big ? k0 + 1.0 : k0;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double q = 1.0 / 17;
  q = q * s2 + 1.0 / 15;
  q = q * s2 + 1.0 / 13;
  q = q * s2 + 1.0 / 11;
  q = q * s2 + 1.0 / 9;
  q = q * s2 + 1.0 / 7;
  q = q * s2 + 1.0 / 5;
  q = q * s2 + 1.0 / 3;
  q = q * s2 + 1.0;
  double y = e * (k * 0.6931471805599453 + 2.0 * s * q);
  y = y < -300.0 ? -300.0 : y;  // beyond float range either way: keeps 2^j a normal double
  y = y > 300.0 ? 300.0 : y;
  // exp(y) = 2^j exp(r), |r| <= ln2 / 2
  constexpr double shifter = 0x1.8p52;
  const double t = y * 1.4426950408889634 + shifter;
  const double j = t - shifter;
  const int64_t ji = static_cast<int64_t>(dbl_bits(t) - dbl_bits(shifter));
  const double r = (y - j * 0.6931471803691238) - j * 1.9082149292705877e-10;
  double z = 1.0 / 479001600;
  z = z * r + 1.0 / 39916800;
  z = z * r + 1.0 / 3628800;
  z = z * r + 1.0 / 362880;
  z = z * r + 1.0 / 40320;
  z = z * r + 1.0 / 5040;
  z = z * r + 1.0 / 720;
  z = z * r + 1.0 / 120;
  z = z * r + 1.0 / 24;
  z = z * r + 1.0 / 6;
  z = z * r + 0.5;
  z = z * r + 1.0;
  z = z * r + 1.0;
  const float res = static_cast<float>(z * dbl_from(static_cast<uint64_t>(ji + 1023) << 52));
  const float special = ax == 0.0f ? 0.0f : ax;
  return regular ? res : special;
}

struct PowGeneral {  // any p > 1 (p == 1 is PowInt<1>)
  double p;
  // exponents rounded to the accumulation type, as torch's pow does with a Python scalar
  template <class A>
  inline A fwd(A x) const {
    if constexpr (std::is_same_v<A, float>) {
      return powf_vec(x, static_cast<double>(static_cast<float>(p)));
    } else {
      return std::pow(std::abs(x), static_cast<A>(p));
    }
  }
  template <class A>
  inline A bwd(A x) const {
    if constexpr (std::is_same_v<A, float>) {
      return std::copysign(powf_vec(x, static_cast<double>(static_cast<float>(p - 1.0))), x);
    } else {
      return std::copysign(std::pow(std::abs(x), static_cast<A>(p - 1.0)), x);
    }
  }
};

template <class Fn>
void dispatch_power(double p, Fn&& fn) {
  if (p == 1.0) return fn(PowInt<1>{});
  if (p == 2.0) return fn(PowInt<2>{});
  if (p == 3.0) return fn(PowInt<3>{});
  if (p == 4.0) return fn(PowInt<4>{});
  if (p == 1.5) return fn(PowHalf<1>{});
  if (p == 2.5) return fn(PowHalf<2>{});
  if (p == 3.5) return fn(PowHalf<3>{});
  if (p == 4.5) return fn(PowHalf<4>{});
  return fn(PowGeneral{p});
}

template <class Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(ElemF32{});
    case at::kDouble: return fn(ElemF64{});
    case at::kBFloat16: return fn(ElemBF16{});
    case at::kHalf: return fn(ElemF16{});
    default: TORCH_CHECK(false, "datadam_fast cpu: unsupported dtype ", t,
                         " (expected float32, float64, bfloat16 or float16)");
  }
}

// ------------------------------------------------------------------------------------------
// Forward kernels: accumulate a[h0:h1) of one sample.
// ------------------------------------------------------------------------------------------

// NCHW: x points at f[n, 0, 0]; rows of length HW, C of them. Four channel rows per pass keep
// the accumulator traffic low; pixels are taken in chunks of kChunk so that the accumulator
// segment (<= 8 KB for float) stays in L1 whatever H*W is.
constexpr int64_t kChunk = 2048;

template <class E, class P>
inline void fwd_nchw_chunk(const typename E::raw* __restrict__ base, int64_t C, int64_t HW,
                           int64_t len, typename E::acc* __restrict__ a, const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  int64_t c = 0;
  if (C >= 4) {
    const raw* __restrict__ r0 = base;
    const raw* __restrict__ r1 = base + HW;
    const raw* __restrict__ r2 = base + 2 * HW;
    const raw* __restrict__ r3 = base + 3 * HW;
    for (int64_t i = 0; i < len; ++i) {
      a[i] = (pw.template fwd<A>(E::load(r0[i])) + pw.template fwd<A>(E::load(r1[i]))) +
             (pw.template fwd<A>(E::load(r2[i])) + pw.template fwd<A>(E::load(r3[i])));
    }
    c = 4;
  } else {
    const raw* __restrict__ r0 = base;
    for (int64_t i = 0; i < len; ++i) a[i] = pw.template fwd<A>(E::load(r0[i]));
    c = 1;
  }
  for (; c + 4 <= C; c += 4) {
    const raw* __restrict__ r0 = base + c * HW;
    const raw* __restrict__ r1 = r0 + HW;
    const raw* __restrict__ r2 = r0 + 2 * HW;
    const raw* __restrict__ r3 = r0 + 3 * HW;
    for (int64_t i = 0; i < len; ++i) {
      a[i] += (pw.template fwd<A>(E::load(r0[i])) + pw.template fwd<A>(E::load(r1[i]))) +
              (pw.template fwd<A>(E::load(r2[i])) + pw.template fwd<A>(E::load(r3[i])));
    }
  }
  for (; c < C; ++c) {
    const raw* __restrict__ r0 = base + c * HW;
    for (int64_t i = 0; i < len; ++i) a[i] += pw.template fwd<A>(E::load(r0[i]));
  }
}

template <class E, class P>
inline void fwd_nchw(const typename E::raw* x, int64_t C, int64_t HW, int64_t h0, int64_t h1,
                     typename E::acc* a, const P& pw) {
  for (int64_t j = h0; j < h1; j += kChunk) {
    fwd_nchw_chunk<E>(x + j, C, HW, std::min(kChunk, h1 - j), a + (j - h0), pw);
  }
}

// channels_last: x points at f[n, :, :, :] stored [HW, C]; reduce over contiguous C per pixel.
template <class E, class P>
inline void fwd_cl(const typename E::raw* __restrict__ x, int64_t C, int64_t h0, int64_t h1,
                   typename E::acc* __restrict__ a, const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  for (int64_t i = h0; i < h1; ++i) {
    const raw* __restrict__ px = x + i * C;
    A s = A(0);
    DDF_SIMD_REDUCE_ADD(s)
    for (int64_t c = 0; c < C; ++c) s += pw.template fwd<A>(E::load(px[c]));
    a[i - h0] = s;
  }
}

// In place: a -> a / max(||a||, eps); returns ||a||.
template <class A>
inline A normalise_row(A* __restrict__ a, int64_t HW) {
  double s = 0.0;
  DDF_SIMD_REDUCE_ADD(s)
  for (int64_t i = 0; i < HW; ++i) s += static_cast<double>(a[i]) * static_cast<double>(a[i]);
  const A n = static_cast<A>(std::sqrt(s));
  const A d = std::max(n, static_cast<A>(kNormEps));  // NaN n stays NaN (std::max keeps arg 0)
  for (int64_t i = 0; i < HW; ++i) a[i] = a[i] / d;
  return n;
}

// ------------------------------------------------------------------------------------------
// Backward kernels: grad[n, :, h0:h1) = bwd(f) * gp[h0:h1), gp = p * ga.
// ------------------------------------------------------------------------------------------
template <class E, class P>
inline void bwd_nchw(const typename E::raw* __restrict__ x, typename E::raw* __restrict__ out,
                     int64_t C, int64_t HW, int64_t h0, int64_t h1,
                     const typename E::acc* __restrict__ gp, const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  for (int64_t j = h0; j < h1; j += kChunk) {  // gp segment stays in L1 across the C rows
    const int64_t len = std::min(kChunk, h1 - j);
    const A* __restrict__ g = gp + (j - h0);
    for (int64_t c = 0; c < C; ++c) {
      const raw* __restrict__ r = x + c * HW + j;
      raw* __restrict__ o = out + c * HW + j;
      for (int64_t i = 0; i < len; ++i) o[i] = E::store(pw.template bwd<A>(E::load(r[i])) * g[i]);
    }
  }
}

template <class E, class P>
inline void bwd_cl(const typename E::raw* __restrict__ x, typename E::raw* __restrict__ out,
                   int64_t C, int64_t h0, int64_t h1, const typename E::acc* __restrict__ gp,
                   const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  for (int64_t i = h0; i < h1; ++i) {
    const raw* __restrict__ px = x + i * C;
    raw* __restrict__ o = out + i * C;
    const A g = gp[i - h0];
    for (int64_t c = 0; c < C; ++c) o[c] = E::store(pw.template bwd<A>(E::load(px[c])) * g);
  }
}

// ------------------------------------------------------------------------------------------
// Work decomposition.
//
// A work unit is (sample n, block k of H*W) of one layer. The units of all layers of a call are
// numbered consecutively and cut into chunks of equal element count that the threads claim, so
// each direction is a single parallel region for all layers (one fork/join; under CPU contention
// every extra region can cost a scheduler time slice waiting for a straggler).
// ------------------------------------------------------------------------------------------
struct Plan {
  int64_t nblk;   // blocks of H*W per sample
  int64_t bsize;  // pixels per block (last may be shorter)
};

Plan make_plan(int64_t N, int64_t HW, int64_t threads) {
  Plan pl{1, HW};
  const int64_t want_units = 4 * threads;
  if (threads > 1 && N < want_units) {
    // Few samples (e.g. N == 1): split each sample's pixels so that every thread gets work;
    // blocks >= 256 pixels and a multiple of 16 so that per-block overhead stays small.
    const int64_t per = (want_units + N - 1) / N;
    const int64_t nblk = std::min(per, std::max<int64_t>(1, HW / 256));
    if (nblk > 1) {
      int64_t bs = (HW + nblk - 1) / nblk;
      bs = (bs + 15) / 16 * 16;
      pl.bsize = bs;
      pl.nblk = (HW + bs - 1) / bs;
    }
  }
  return pl;
}

struct Schedule {
  std::vector<int64_t> first;   // first[l]: global index of layer l's first unit; first[L] = total
  std::vector<int64_t> bounds;  // chunk t is global units [bounds[t], bounds[t + 1])
  int64_t threads = 1;          // threads to wake (1: run inline)
};

// units[l] units of cost[l] elements each for layer l. The units are cut into contiguous chunks of
// equal cost, kChunksPerThread per thread, that the threads then claim dynamically: a thread that
// the OS deschedules (another process on the machine) delays the call by at most its current chunk.
constexpr int64_t kChunksPerThread = 8;

Schedule make_schedule(const std::vector<int64_t>& units, const std::vector<int64_t>& cost,
                       int64_t threads) {
  const size_t L = units.size();
  Schedule s;
  s.first.assign(L + 1, 0);
  std::vector<double> pre(L + 1, 0.0);  // cost before layer l
  for (size_t l = 0; l < L; ++l) {
    s.first[l + 1] = s.first[l] + units[l];
    pre[l + 1] = pre[l] + static_cast<double>(units[l]) * static_cast<double>(cost[l]);
  }
  const int64_t total = s.first[L];
  s.threads = std::max<int64_t>(1, std::min(threads, total));
  if (pre[L] < static_cast<double>(int64_t{1} << 16)) s.threads = 1;  // tiny: stay on this thread
  const int64_t K = s.threads == 1 ? 1 : std::min(total, s.threads * kChunksPerThread);
  s.bounds.assign(K + 1, total);
  s.bounds[0] = 0;
  size_t l = 0;
  for (int64_t t = 1; t < K; ++t) {
    const double x = pre[L] * static_cast<double>(t) / static_cast<double>(K);
    while (l + 1 < L && pre[l + 1] <= x) ++l;
    const double u = std::ceil((x - pre[l]) / static_cast<double>(std::max<int64_t>(1, cost[l])));
    const int64_t g = s.first[l] + std::min<int64_t>(units[l], static_cast<int64_t>(u));
    s.bounds[t] = std::max(s.bounds[t - 1], std::min(g, total));
  }
  return s;
}

// fn(layer, unit_begin, unit_end) with unit indices local to the layer.
template <class F>
void run_schedule(const Schedule& s, const F& fn) {
  const int64_t K = static_cast<int64_t>(s.bounds.size()) - 1;
  const int64_t L = static_cast<int64_t>(s.first.size()) - 1;
  auto chunk = [&](int64_t t) {
    const int64_t b = s.bounds[t], e = s.bounds[t + 1];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t lb = std::max(b, s.first[l]), le = std::min(e, s.first[l + 1]);
      if (lb < le) fn(l, lb - s.first[l], le - s.first[l]);
    }
  };
  if (s.threads <= 1) {
    for (int64_t t = 0; t < K; ++t) chunk(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, s.threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < K;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      chunk(t);
    }
  });
}

enum class Layout { NCHW, ChannelsLast };

// Returns the tensor to read (possibly a contiguous copy) and its layout.
std::pair<at::Tensor, Layout> prepare(const at::Tensor& f) {
  TORCH_CHECK(f.dim() == 4, "datadam_fast cpu: expected a 4-d [N, C, H, W] tensor, got ",
              f.sizes());
  TORCH_CHECK(f.device().is_cpu(), "datadam_fast cpu: tensor on ", f.device(),
              ", expected cpu");
  const auto t = f.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "datadam_fast cpu: unsupported dtype ", t,
              " (expected float32, float64, bfloat16 or float16)");
  if (f.is_contiguous()) return {f, Layout::NCHW};
  if (f.is_contiguous(at::MemoryFormat::ChannelsLast)) return {f, Layout::ChannelsLast};
  return {f.contiguous(), Layout::NCHW};  // arbitrary strides: one copy, then NCHW
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_power(double p) {
  TORCH_CHECK(std::isfinite(p) && p >= 1.0, "datadam_fast cpu: power must be finite and >= 1, got ", p);
}

// Fresh multi-MB allocations come straight from mmap, and faulting them in 4 KiB at a time costs
// more than the kernel that fills them (~1.6 us per fault in a VM: 20 ms for a 52 MB gradient).
// Before the first touch, ask for transparent huge pages on the 2 MiB-aligned interior of a large
// output buffer. Purely advisory: ignored where THP is off, harmless on memory already mapped.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (b + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

struct Layer {
  at::Tensor f;     // tensor read (NCHW-contiguous or channels_last)
  Layout layout;
  int64_t N, C, HW;
  Plan plan;
  at::Tensor maps, norms, grad_maps, out;  // float32/float64 [N, HW], [N]; out: the gradient
};

// ------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------
template <class E, class P>
void forward_units(const Layer& ly, int64_t ub, int64_t ue, const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  const raw* x = reinterpret_cast<const raw*>(ly.f.data_ptr());
  A* mp = ly.maps.data_ptr<A>();
  A* np = ly.norms.data_ptr<A>();
  const int64_t C = ly.C, HW = ly.HW, CHW = C * HW;
  const Plan& pl = ly.plan;
  for (int64_t u = ub; u < ue; ++u) {
    const int64_t n = u / pl.nblk, k = u % pl.nblk;
    const int64_t h0 = k * pl.bsize, h1 = std::min(HW, h0 + pl.bsize);
    const raw* xs = x + n * CHW;
    A* a = mp + n * HW;
    if (ly.layout == Layout::NCHW) {
      fwd_nchw<E>(xs, C, HW, h0, h1, a + h0, pw);
    } else {
      fwd_cl<E>(xs, C, h0, h1, a + h0, pw);
    }
    if (pl.nblk == 1) np[n] = normalise_row(a, HW);  // still in L1
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> forward(
    const std::vector<at::Tensor>& feats, double p) {
  check_power(p);
  at::NoGradGuard no_grad;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Layer> layers;
  layers.reserve(feats.size());
  std::vector<int64_t> units, cost;
  for (const auto& f0 : feats) {
    auto [f, layout] = prepare(f0);
    Layer ly;
    ly.N = f.size(0);
    ly.C = f.size(1);
    ly.HW = f.size(2) * f.size(3);
    ly.layout = layout;
    ly.plan = make_plan(ly.N, ly.HW, threads);
    const auto opts = f.options().dtype(acc_type(f.scalar_type()));
    ly.maps = at::empty({ly.N, ly.HW}, opts);
    ly.norms = at::empty({ly.N}, opts);
    if (f.numel() == 0) {  // C == 0 (or an empty map): a = 0
      ly.maps.zero_();
      ly.norms.zero_();
      units.push_back(0);
    } else {
      units.push_back(ly.N * ly.plan.nblk);
    }
    cost.push_back(std::max<int64_t>(1, ly.C * ly.plan.bsize));
    ly.f = std::move(f);
    layers.push_back(std::move(ly));
  }
  run_schedule(make_schedule(units, cost, threads), [&](int64_t l, int64_t ub, int64_t ue) {
    const Layer& ly = layers[l];
    dispatch_dtype(ly.f.scalar_type(), [&](auto e) {
      using E = decltype(e);
      dispatch_power(p, [&](auto pw) { forward_units<E>(ly, ub, ue, pw); });
    });
  });
  // Layers whose samples were split into blocks: normalise now that every block is summed.
  std::vector<int64_t> nunits, ncost;
  bool any = false;
  for (const auto& ly : layers) {
    const bool split = ly.plan.nblk > 1 && ly.f.numel() > 0;
    any = any || split;
    nunits.push_back(split ? ly.N : 0);
    ncost.push_back(std::max<int64_t>(1, ly.HW));
  }
  if (any) {
    run_schedule(make_schedule(nunits, ncost, threads), [&](int64_t l, int64_t ub, int64_t ue) {
      const Layer& ly = layers[l];
      if (ly.maps.scalar_type() == at::kDouble) {
        double* mp = ly.maps.data_ptr<double>();
        double* np = ly.norms.data_ptr<double>();
        for (int64_t n = ub; n < ue; ++n) np[n] = normalise_row(mp + n * ly.HW, ly.HW);
      } else {
        float* mp = ly.maps.data_ptr<float>();
        float* np = ly.norms.data_ptr<float>();
        for (int64_t n = ub; n < ue; ++n) np[n] = normalise_row(mp + n * ly.HW, ly.HW);
      }
    });
  }
  std::vector<at::Tensor> maps, norms;
  for (auto& ly : layers) {
    maps.push_back(std::move(ly.maps));
    norms.push_back(std::move(ly.norms));
  }
  return {std::move(maps), std::move(norms)};
}

// ------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------

// ga segment [h0, h1) of sample row (m, g, norm nn), times p, given dot = <m, g> in double.
template <class A>
inline void ga_segment(const A* __restrict__ m, const A* __restrict__ g, A nn, double dot,
                       double p, int64_t h0, int64_t h1, A* __restrict__ out) {
  if (nn > static_cast<A>(kNormEps)) {
    const A d = static_cast<A>(dot);
    const A coef = static_cast<A>(p / static_cast<double>(nn));
    for (int64_t i = h0; i < h1; ++i) out[i - h0] = (g[i] - m[i] * d) * coef;
  } else {  // the clamp is constant in a: dL/da = g / eps (also taken for NaN norms)
    const A coef = static_cast<A>(p / kNormEps);
    for (int64_t i = h0; i < h1; ++i) out[i - h0] = g[i] * coef;
  }
}

template <class A>
inline double row_dot(const A* __restrict__ m, const A* __restrict__ g, int64_t HW) {
  double dot = 0.0;
  DDF_SIMD_REDUCE_ADD(dot)
  for (int64_t i = 0; i < HW; ++i) dot += static_cast<double>(m[i]) * static_cast<double>(g[i]);
  return dot;
}

template <class E, class P>
void backward_units(const Layer& ly, int64_t ub, int64_t ue, double p, const P& pw) {
  using raw = typename E::raw;
  using A = typename E::acc;
  const raw* x = reinterpret_cast<const raw*>(ly.f.data_ptr());
  raw* o = reinterpret_cast<raw*>(ly.out.data_ptr());
  const A* mp = ly.maps.data_ptr<A>();
  const A* np = ly.norms.data_ptr<A>();
  const A* gp = ly.grad_maps.data_ptr<A>();
  const int64_t C = ly.C, HW = ly.HW, CHW = C * HW;
  const Plan& pl = ly.plan;
  std::vector<A> gbuf(static_cast<size_t>(std::min(pl.bsize, HW)));
  int64_t last_n = -1;
  double dot = 0.0;
  for (int64_t u = ub; u < ue; ++u) {
    const int64_t n = u / pl.nblk, k = u % pl.nblk;
    const int64_t h0 = k * pl.bsize, h1 = std::min(HW, h0 + pl.bsize);
    const A* m = mp + n * HW;
    const A* g = gp + n * HW;
    const A nn = np[n];
    if (n != last_n) {  // <m, g> needs the whole row; blocks of one sample share it
      dot = nn > static_cast<A>(kNormEps) ? row_dot(m, g, HW) : 0.0;
      last_n = n;
    }
    ga_segment(m, g, nn, dot, p, h0, h1, gbuf.data());
    if (ly.layout == Layout::NCHW) {
      bwd_nchw<E>(x + n * CHW, o + n * CHW, C, HW, h0, h1, gbuf.data(), pw);
    } else {
      bwd_cl<E>(x + n * CHW, o + n * CHW, C, h0, h1, gbuf.data(), pw);
    }
  }
}

std::vector<at::Tensor> backward(const std::vector<at::Tensor>& feats,
                                 const std::vector<at::Tensor>& maps,
                                 const std::vector<at::Tensor>& norms,
                                 const std::vector<at::Tensor>& grad_maps, double p,
                                 bool huge_pages) {
  check_power(p);
  const size_t L = feats.size();
  TORCH_CHECK(maps.size() == L && norms.size() == L && grad_maps.size() == L,
              "datadam_fast cpu backward: got ", L, " feature maps but ", maps.size(), " maps, ",
              norms.size(), " norms and ", grad_maps.size(), " gradients");
  at::NoGradGuard no_grad;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Layer> layers;
  layers.reserve(L);
  std::vector<int64_t> units, cost;
  for (size_t l = 0; l < L; ++l) {
    auto [f, layout] = prepare(feats[l]);
    Layer ly;
    ly.N = f.size(0);
    ly.C = f.size(1);
    ly.HW = f.size(2) * f.size(3);
    ly.layout = layout;
    ly.plan = make_plan(ly.N, ly.HW, threads);
    const auto acc = acc_type(f.scalar_type());
    ly.maps = maps[l].to(acc).contiguous();
    ly.norms = norms[l].to(acc).contiguous();
    ly.grad_maps = grad_maps[l].to(acc).contiguous();
    TORCH_CHECK(ly.maps.dim() == 2 && ly.maps.size(0) == ly.N && ly.maps.size(1) == ly.HW,
                "layer ", l, ": maps ", ly.maps.sizes(), " do not match features ", f.sizes());
    TORCH_CHECK(ly.grad_maps.sizes() == ly.maps.sizes(), "layer ", l, ": grad_maps ",
                ly.grad_maps.sizes(), " do not match maps ", ly.maps.sizes());
    TORCH_CHECK(ly.norms.numel() == ly.N, "layer ", l, ": norms ", ly.norms.sizes(),
                " do not match N=", ly.N);
    ly.out = at::empty_like(f, layout == Layout::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                             : at::MemoryFormat::Contiguous);
    if (huge_pages) advise_huge_pages(ly.out);
    units.push_back(f.numel() > 0 ? ly.N * ly.plan.nblk : 0);
    cost.push_back(std::max<int64_t>(1, ly.C * ly.plan.bsize));
    ly.f = std::move(f);
    layers.push_back(std::move(ly));
  }
  run_schedule(make_schedule(units, cost, threads), [&](int64_t l, int64_t ub, int64_t ue) {
    const Layer& ly = layers[l];
    dispatch_dtype(ly.f.scalar_type(), [&](auto e) {
      using E = decltype(e);
      dispatch_power(p, [&](auto pw) { backward_units<E>(ly, ub, ue, p, pw); });
    });
  });
  std::vector<at::Tensor> grads;
  for (auto& ly : layers) grads.push_back(std::move(ly.out));
  return grads;
}

}  // namespace

// Dispatcher registration: datadam_fast::cpu_fwd / cpu_bwd, CPU kernels. The schemas are defined
// here (a fragment: the namespace is shared with the ops datadam_fast/ops.py defines in Python);
// fake (meta) kernels and the autograd formula are registered in Python
// (datadam_fast/backends/cpu.py), so the ops trace under torch.compile / torch.export.
namespace {
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cpu_fwd(at::TensorList feats, double p) {
  return forward(feats.vec(), p);
}
std::vector<at::Tensor> cpu_bwd(at::TensorList feats, at::TensorList maps, at::TensorList norms,
                                at::TensorList grad_maps, double p, bool huge_pages) {
  return backward(feats.vec(), maps.vec(), norms.vec(), grad_maps.vec(), p, huge_pages);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(datadam_fast, m) {
  m.def("cpu_fwd(Tensor[] feats, float power) -> (Tensor[] maps, Tensor[] norms)");
  m.def("cpu_bwd(Tensor[] feats, Tensor[] maps, Tensor[] norms, Tensor[] grad_maps, float power, "
        "bool huge_pages=True) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(datadam_fast, CPU, m) {
  m.impl("cpu_fwd", &cpu_fwd);
  m.impl("cpu_bwd", &cpu_bwd);
}

// The Python module only carries build facts (the ops are reached through torch.ops).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "datadam_fast fused CPU spatial attention: torch.ops.datadam_fast.cpu_fwd / cpu_bwd";
  m.attr("NORM_EPS") = kNormEps;
#if defined(_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
