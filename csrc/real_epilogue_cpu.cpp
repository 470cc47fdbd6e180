// Fused real-side epilogue of a ConvNet block on CPU (the C++ twin of kernels/real_epilogue.py).
//
// cpu_real_epilogue(y, scale?, shift?, weight?, bias?, groups, eps, act, slope, pool, power, attention)
//   -> (out, att)
//
// For the conv output y [N, C, H, W] of a block conv -> norm -> act -> pool, under no_grad:
//   v        = act(y * scale[n, c] + shift[n, c])          (float accumulation type)
//   out      = pool2x2(v)  (or v itself for pool == none)   y's dtype, channels_last
//   att[n,p] = sum_c |v[n, c, p]|^power                     float32 [N, H*W] (not normalised)
//
// scale / shift: either given ([N, C], e.g. train-mode BatchNorm whose statistics span the batch,
// combined in Python from this file's own moments), or computed here per sample from `groups`
// (C = instance norm, 1 < groups < C = group norm) with the optional affine weight / bias.
//
// Why: eager PyTorch (and inductor, which keeps separate loops for the two statistics, the
// normalise + ReLU written back, the pooling and the attention map) reads a 335 MB first-layer
// activation of an MNIST IPC-10 real batch five or six times from DRAM. Here one sample's map
// (C*H*W, 512 KB at 128 x 32 x 32) is read once from DRAM for its statistics and once more while it
// is still in the core's L2 for everything else; only the pooled quarter is written.
//
// Layout: NHWC (channels_last) natively: every inner loop runs over the contiguous C of one pixel
// and auto-vectorises (-O3 -march=native; reductions carry `omp simd reduction`). Other layouts are
// converted to channels_last first (one copy). Parallel over samples (at::parallel_for).
// Statistics: float accumulation around a per-(n, c) pivot (the first pixel), so a mean far from
// zero does not cancel the variance; group combination in double (Chan et al.).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

enum Act { kRelu = 0, kLeaky = 1, kSigmoid = 2, kSwish = 3 };
enum Pool { kNone = 0, kAvg = 1, kMax = 2 };

// NaN in, NaN out, as eager PyTorch: torch.relu(NaN) and max_pool2d over a NaN are NaN. Written
// so that a NaN operand fails the comparison and is the value returned (`x > 0 ? x : 0` and
// std::max(a, NaN) would drop it); both forms still vectorise (compare + blend).
template <typename T>
inline T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <int ACT, typename T>
inline T activate(T x, T slope) {
  if constexpr (ACT == kRelu) {
    return x < T(0) ? T(0) : x;
  } else if constexpr (ACT == kLeaky) {
    return x > T(0) ? x : x * slope;
  } else if constexpr (ACT == kSigmoid) {
    return T(1) / (T(1) + std::exp(-x));
  } else {
    return x / (T(1) + std::exp(-x));
  }
}

// |x|^p; PMODE 1/2/4 by multiplication, 0 = general exp(p log|x|) with 0 -> 0
template <int PMODE, typename T>
inline T abs_pow(T x, T p) {
  T a = std::abs(x);
  if constexpr (PMODE == 1) {
    return a;
  } else if constexpr (PMODE == 2) {
    return a * a;
  } else if constexpr (PMODE == 4) {
    T s = a * a;
    return s * s;
  } else {
    return a == T(0) ? T(0) : std::exp(p * std::log(a));
  }
}

struct Geometry {
  int64_t N, C, H, W, PH, PW;
};

// A stride-1 convolution with few input channels (a first layer: 1 or 3), computed per sample into
// an L2-resident [H*W, C] buffer instead of being read back from a DRAM-sized output. With C_in = 1
// oneDNN writes a 335 MB output at memory speed for 9 MACs per element; here that output never
// exists. Weights are transposed to [C_in*kH*kW, C] so the inner loop runs over contiguous C.
struct DirectConv {
  const float* x = nullptr;  // the conv input [N, C_in, H_in, W_in], any strides
  int64_t sN = 0, sC = 0, sH = 0, sW = 0;
  int64_t Cin = 0, Hin = 0, Win = 0, kH = 0, kW = 0, padH = 0, padW = 0;
  const float* wt = nullptr;    // [C_in*kH*kW, C]
  const float* bias = nullptr;  // [C] or null
};

// The taps of output pixel (oh, ow): its receptive field, zero outside the input.
inline void gather_taps(const DirectConv& cv, const float* xn, int64_t oh, int64_t ow, float* taps) {
  int64_t k = 0;
  for (int64_t ci = 0; ci < cv.Cin; ++ci) {
    for (int64_t kh = 0; kh < cv.kH; ++kh) {
      const int64_t ih = oh + kh - cv.padH;
      for (int64_t kw = 0; kw < cv.kW; ++kw, ++k) {
        const int64_t iw = ow + kw - cv.padW;
        taps[k] = (ih >= 0 && ih < cv.Hin && iw >= 0 && iw < cv.Win) ? xn[ci * cv.sC + ih * cv.sH + iw * cv.sW]
                                                                      : 0.0f;
      }
    }
  }
}

// Register blocking: kPix pixels x kBlock channels of accumulators. One pixel's sum over the K
// taps is a chain of K dependent FMAs (4-cycle latency each); kPix independent chains keep the FMA
// units busy instead of waiting on one chain (1 pixel at a time ran at about a quarter of the FMA
// rate). Every output is still bias + sum over taps in tap order, so the result is the same bits
// for any blocking.
constexpr int64_t kConvPix = 8;
constexpr int64_t kConvBlock = 16;

// P pixels (taps [P, K]) x the channel block [c0, c0 + kConvBlock) into rows [P, C].
template <int64_t P>
inline void conv_block(const DirectConv& cv, const float* taps, int64_t K, int64_t C, int64_t c0, float* rows) {
  float acc[P][kConvBlock];
  for (int64_t q = 0; q < P; ++q) {
#pragma omp simd
    for (int64_t cc = 0; cc < kConvBlock; ++cc) acc[q][cc] = cv.bias ? cv.bias[c0 + cc] : 0.0f;
  }
  for (int64_t j = 0; j < K; ++j) {
    const float* w = cv.wt + j * C + c0;
#pragma GCC unroll 8
    for (int64_t q = 0; q < P; ++q) {
      const float t = taps[q * K + j];
#pragma omp simd
      for (int64_t cc = 0; cc < kConvBlock; ++cc) acc[q][cc] += t * w[cc];
    }
  }
  for (int64_t q = 0; q < P; ++q) {
#pragma omp simd
    for (int64_t cc = 0; cc < kConvBlock; ++cc) rows[q * C + c0 + cc] = acc[q][cc];
  }
}

inline void conv_sample(const DirectConv& cv, int64_t n, int64_t C, int64_t H, int64_t W, float* out,
                        float* taps /* [kConvPix * C_in*kH*kW] scratch */) {
  const float* xn = cv.x + n * cv.sN;
  const int64_t K = cv.Cin * cv.kH * cv.kW, HW = H * W;
  for (int64_t p0 = 0; p0 < HW; p0 += kConvPix) {
    const int64_t np = std::min(kConvPix, HW - p0);
    for (int64_t q = 0; q < np; ++q) gather_taps(cv, xn, (p0 + q) / W, (p0 + q) % W, taps + q * K);
    float* rows = out + p0 * C;
    int64_t c0 = 0;
    for (; c0 + kConvBlock <= C; c0 += kConvBlock) {
      if (np == kConvPix) {
        conv_block<kConvPix>(cv, taps, K, C, c0, rows);
      } else {  // the sample's last pixels
        for (int64_t q = 0; q < np; ++q) conv_block<1>(cv, taps + q * K, K, C, c0, rows + q * C);
      }
    }
    for (int64_t q = 0; q < np; ++q) {  // channels past the last full block
      for (int64_t c = c0; c < C; ++c) {
        float acc = cv.bias ? cv.bias[c] : 0.0f;
        for (int64_t j = 0; j < K; ++j) acc += taps[q * K + j] * cv.wt[j * C + c];
        rows[q * C + c] = acc;
      }
    }
  }
}

// One sample's NHWC conv output: a view into y, or (fused first layer) computed into a per-thread
// buffer that stays in L2 while the sample is processed.
template <typename scalar_t>
struct SampleSource {
  const scalar_t* y;
  const DirectConv* conv;
  int64_t C, H, W;
  std::vector<scalar_t> buf;
  std::vector<float> taps;
  SampleSource(const scalar_t* y_, const DirectConv* conv_, int64_t C_, int64_t H_, int64_t W_)
      : y(y_), conv(conv_), C(C_), H(H_), W(W_), buf(conv_ ? C_ * H_ * W_ : 0),
        taps(conv_ ? kConvPix * conv_->Cin * conv_->kH * conv_->kW : 0) {}
  const scalar_t* get(int64_t n) {
    if (!conv) return y + n * H * W * C;
    if constexpr (std::is_same_v<scalar_t, float>) conv_sample(*conv, n, C, H, W, buf.data(), taps.data());
    return buf.data();  // (prepare_conv admits float32 only)
  }
};

// Per-channel sums of (y - pivot) and (y - pivot)^2 over one sample's HW pixels (NHWC), pivot =
// the first pixel: no cancellation when a channel's mean is far from zero.
template <typename scalar_t, typename acc_t>
void pivoted_sums(const scalar_t* yn, int64_t HW, int64_t C, acc_t* piv, acc_t* s1, acc_t* s2) {
  for (int64_t c = 0; c < C; ++c) {
    piv[c] = static_cast<acc_t>(yn[c]);
    s1[c] = acc_t(0);
    s2[c] = acc_t(0);
  }
  for (int64_t p = 0; p < HW; ++p) {
    const scalar_t* row = yn + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc_t d = static_cast<acc_t>(row[c]) - piv[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// Per-sample scale / shift from the sample's own moments (instance / group norm).
template <typename scalar_t, typename acc_t>
void sample_norm(const scalar_t* yn, const Geometry& g, int64_t groups, double eps, const scalar_t* weight,
                 const scalar_t* bias, acc_t* piv, acc_t* s1, acc_t* s2, acc_t* sc, acc_t* sh) {
  const int64_t C = g.C, HW = g.H * g.W;
  pivoted_sums(yn, HW, C, piv, s1, s2);
  const int64_t cg = C / groups;
  for (int64_t gi = 0; gi < groups; ++gi) {
    // exact combination of the group's channel moments (equal counts HW)
    double mu = 0.0;
    for (int64_t c = gi * cg; c < (gi + 1) * cg; ++c) mu += double(piv[c]) + double(s1[c]) / double(HW);
    mu /= double(cg);
    double m2 = 0.0;
    for (int64_t c = gi * cg; c < (gi + 1) * cg; ++c) {
      double mc = double(piv[c]) + double(s1[c]) / double(HW);
      double m2c = std::max(double(s2[c]) - double(s1[c]) * double(s1[c]) / double(HW), 0.0);
      m2 += m2c + double(HW) * (mc - mu) * (mc - mu);
    }
    double rstd = 1.0 / std::sqrt(m2 / double(HW * cg) + eps);
    for (int64_t c = gi * cg; c < (gi + 1) * cg; ++c) {
      double w = weight ? double(weight[c]) : 1.0;
      double b = bias ? double(bias[c]) : 0.0;
      sc[c] = static_cast<acc_t>(w * rstd);
      sh[c] = static_cast<acc_t>(b - mu * w * rstd);
    }
  }
}

template <typename scalar_t, int ACT, int PMODE>
void run(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, const scalar_t* weight,
         const scalar_t* bias, int64_t groups, double eps, double slope_d, int64_t pool, double power_d,
         bool attention, at::Tensor& out, at::Tensor& att, const Geometry& g, const DirectConv* conv) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const scalar_t* yp = conv ? nullptr : y.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* ap = attention ? att.data_ptr<float>() : nullptr;
  const float* scp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float* shp = shift.defined() ? shift.data_ptr<float>() : nullptr;
  const int64_t C = g.C, H = g.H, W = g.W, HW = H * W, QH = (H + 1) / 2, QW = (W + 1) / 2;
  const acc_t slope = static_cast<acc_t>(slope_d), power = static_cast<acc_t>(power_d);
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(9 * C);
    acc_t *piv = buf.data(), *s1 = piv + C, *s2 = s1 + C, *sc = s2 + C, *sh = sc + C;
    acc_t* v[4] = {sh + C, sh + 2 * C, sh + 3 * C, sh + 4 * C};
    SampleSource<scalar_t> src(yp, conv, C, H, W);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* yn = src.get(n);
      if (scp) {
        for (int64_t c = 0; c < C; ++c) {
          sc[c] = static_cast<acc_t>(scp[n * C + c]);
          sh[c] = static_cast<acc_t>(shp[n * C + c]);
        }
      } else {
        sample_norm<scalar_t, acc_t>(yn, g, groups, eps, weight, bias, piv, s1, s2, sc, sh);
      }
      for (int64_t qi = 0; qi < QH; ++qi) {
        for (int64_t qj = 0; qj < QW; ++qj) {
          bool ok[4];
          for (int d = 0; d < 4; ++d) {
            const int64_t h = 2 * qi + (d >> 1), w = 2 * qj + (d & 1);
            ok[d] = h < H && w < W;
            if (!ok[d]) continue;
            const scalar_t* row = yn + (h * W + w) * C;
            acc_t* vd = v[d];
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) vd[c] = activate<ACT, acc_t>(static_cast<acc_t>(row[c]) * sc[c] + sh[c], slope);
            if (attention) {
              acc_t a = acc_t(0);
#pragma omp simd reduction(+ : a)
              for (int64_t c = 0; c < C; ++c) a += abs_pow<PMODE, acc_t>(vd[c], power);
              ap[n * HW + h * W + w] = static_cast<float>(a);
            }
            if (pool == kNone) {
              scalar_t* orow = op + (n * HW + h * W + w) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(vd[c]);
            }
          }
          if (pool != kNone && qi < g.PH && qj < g.PW) {
            scalar_t* orow = op + ((n * g.PH + qi) * g.PW + qj) * C;
            const acc_t *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
            if (pool == kAvg) {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>((v0[c] + v1[c] + v2[c] + v3[c]) * acc_t(0.25));
            } else {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c)
                orow[c] = static_cast<scalar_t>(max_nan(max_nan(v0[c], v1[c]), max_nan(v2[c], v3[c])));
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, int ACT>
void run_power(int pmode, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
               const scalar_t* weight, const scalar_t* bias, int64_t groups, double eps, double slope, int64_t pool,
               double power, bool attention, at::Tensor& out, at::Tensor& att, const Geometry& g,
               const DirectConv* conv) {
  switch (pmode) {
    case 1: return run<scalar_t, ACT, 1>(y, scale, shift, weight, bias, groups, eps, slope, pool, power, attention, out, att, g, conv);
    case 2: return run<scalar_t, ACT, 2>(y, scale, shift, weight, bias, groups, eps, slope, pool, power, attention, out, att, g, conv);
    case 4: return run<scalar_t, ACT, 4>(y, scale, shift, weight, bias, groups, eps, slope, pool, power, attention, out, att, g, conv);
    default: return run<scalar_t, ACT, 0>(y, scale, shift, weight, bias, groups, eps, slope, pool, power, attention, out, att, g, conv);
  }
}

// The conv of a fused first layer: validates and prepares a DirectConv over `x` (kept alive by
// the caller's tensors `xc` / `wt`). Returns the conv output's C, H, W.
std::tuple<int64_t, int64_t, int64_t> prepare_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                                                   at::Tensor& wt, at::Tensor& bt, DirectConv& cv) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": the fused convolution takes float32 input and weight, got ", x.scalar_type(), " / ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), op, ": conv weight must be [C, ", x.size(1),
              ", kH, kW], got ", weight.sizes());
  TORCH_CHECK(padding.size() == 2, op, ": padding must be [padH, padW], got ", padding);
  const int64_t C = weight.size(0), kH = weight.size(2), kW = weight.size(3);
  const int64_t H = x.size(2) + 2 * padding[0] - kH + 1, W = x.size(3) + 2 * padding[1] - kW + 1;
  TORCH_CHECK(H > 0 && W > 0, op, ": the convolution output would be empty (", H, " x ", W, ")");
  wt = weight.reshape({C, -1}).t().contiguous();  // [C_in*kH*kW, C]
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == C, op, ": conv bias must have ", C, " elements, got ", bias->numel());
    bt = bias->to(at::kFloat).contiguous();
  }
  cv.x = x.data_ptr<float>();
  cv.sN = x.stride(0); cv.sC = x.stride(1); cv.sH = x.stride(2); cv.sW = x.stride(3);
  cv.Cin = x.size(1); cv.Hin = x.size(2); cv.Win = x.size(3);
  cv.kH = kH; cv.kW = kW; cv.padH = padding[0]; cv.padW = padding[1];
  cv.wt = wt.data_ptr<float>();
  cv.bias = bt.defined() ? bt.data_ptr<float>() : nullptr;
  return {C, H, W};
}

// The tensor the kernels read: the conv output as channels_last, or (with conv_weight) the input
// of a fused first layer, unchanged. Returns the conv output's C, H, W.
std::tuple<int64_t, int64_t, int64_t> prepare_input(const char* op, const at::Tensor& y_in,
                                                    const std::optional<at::Tensor>& conv_weight,
                                                    const std::optional<at::Tensor>& conv_bias,
                                                    at::IntArrayRef conv_padding, at::Tensor& y, at::Tensor& wt,
                                                    at::Tensor& bt, DirectConv& conv) {
  TORCH_CHECK(y_in.dim() == 4, op, ": expected [N, C, H, W], got ", y_in.sizes());
  TORCH_CHECK(y_in.device().is_cpu(), op, ": expected a CPU tensor, got ", y_in.device());
  if (conv_weight.has_value() && conv_weight->defined()) {
    y = y_in;
    return prepare_conv(op, y, *conv_weight, conv_bias, conv_padding, wt, bt, conv);
  }
  y = y_in.contiguous(at::MemoryFormat::ChannelsLast);
  return {y.size(1), y.size(2), y.size(3)};
}

// y: the conv output, or (with conv_weight) the conv input of a fused stride-1 first layer.
std::tuple<at::Tensor, at::Tensor> cpu_real_epilogue(const at::Tensor& y_in, const std::optional<at::Tensor>& scale_in,
                                                     const std::optional<at::Tensor>& shift_in,
                                                     const std::optional<at::Tensor>& weight_in,
                                                     const std::optional<at::Tensor>& bias_in, int64_t groups,
                                                     double eps, int64_t act, double slope, int64_t pool, double power,
                                                     bool attention, const std::optional<at::Tensor>& conv_weight,
                                                     const std::optional<at::Tensor>& conv_bias,
                                                     at::IntArrayRef conv_padding) {
  const char* op = "cpu_real_epilogue";
  TORCH_CHECK(act >= 0 && act <= 3, op, ": act must be 0..3 (relu, leakyrelu, sigmoid, swish), got ", act);
  TORCH_CHECK(pool >= 0 && pool <= 2, op, ": pool must be 0..2 (none, avg, max), got ", pool);
  at::Tensor y, wt, bt;
  DirectConv conv;
  const bool fused = conv_weight.has_value() && conv_weight->defined();
  const auto [C, H, W] = prepare_input(op, y_in, conv_weight, conv_bias, conv_padding, y, wt, bt, conv);
  const int64_t N = y.size(0);
  const bool given = scale_in.has_value() && scale_in->defined();
  at::Tensor scale, shift;
  if (given) {
    TORCH_CHECK(shift_in.has_value() && shift_in->defined(), op, ": scale given without shift");
    TORCH_CHECK(scale_in->sizes() == at::IntArrayRef({N, C}) && shift_in->sizes() == at::IntArrayRef({N, C}), op,
                ": scale and shift must be [N, C] = [", N, ", ", C, "], got ", scale_in->sizes(), " / ",
                shift_in->sizes());
    scale = scale_in->to(at::kFloat).contiguous();
    shift = shift_in->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": groups must divide C = ", C, ", got ", groups);
  }
  const Geometry g{N, C, H, W, pool == kNone ? H : H / 2, pool == kNone ? W : W / 2};
  at::Tensor out = at::empty({N, C, g.PH, g.PW}, y.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor att = at::empty({attention ? N : 0, H * W}, y.options().dtype(at::kFloat));
  if (N == 0 || C == 0 || H == 0 || W == 0) return {out, att};
  const double p = power;
  const int pmode = (p == 1.0) ? 1 : (p == 2.0) ? 2 : (p == 4.0) ? 4 : 0;
  const DirectConv* cv = fused ? &conv : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cpu_real_epilogue", [&] {
    at::Tensor w = (weight_in.has_value() && weight_in->defined()) ? weight_in->to(y.scalar_type()).contiguous() : at::Tensor();
    at::Tensor b = (bias_in.has_value() && bias_in->defined()) ? bias_in->to(y.scalar_type()).contiguous() : at::Tensor();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    switch (act) {
      case kRelu: run_power<scalar_t, kRelu>(pmode, y, scale, shift, wp, bp, groups, eps, slope, pool, p, attention, out, att, g, cv); break;
      case kLeaky: run_power<scalar_t, kLeaky>(pmode, y, scale, shift, wp, bp, groups, eps, slope, pool, p, attention, out, att, g, cv); break;
      case kSigmoid: run_power<scalar_t, kSigmoid>(pmode, y, scale, shift, wp, bp, groups, eps, slope, pool, p, attention, out, att, g, cv); break;
      default: run_power<scalar_t, kSwish>(pmode, y, scale, shift, wp, bp, groups, eps, slope, pool, p, attention, out, att, g, cv); break;
    }
  });
  return {out, att};
}

// Per-(n, c) mean and M2 over H*W (float32 [N, C]): the inputs of a batch-norm combination.
// (A template, not a lambda: `#pragma omp simd` cannot sit inside the dispatch macro's argument.)
template <typename scalar_t>
void plane_moments(const at::Tensor& y, int64_t C, int64_t HW, at::Tensor& mean, at::Tensor& m2,
                   const DirectConv* conv, int64_t H, int64_t W) {
  using acc_t = at::acc_type<scalar_t, false>;
  const int64_t N = y.size(0);
  const scalar_t* yp = conv ? nullptr : y.data_ptr<scalar_t>();
  float* mp = mean.data_ptr<float>();
  float* qp = m2.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * C);
    acc_t *piv = buf.data(), *s1 = piv + C, *s2 = s1 + C;
    SampleSource<scalar_t> src(yp, conv, C, H, W);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* yn = src.get(n);
      pivoted_sums(yn, HW, C, piv, s1, s2);
      for (int64_t c = 0; c < C; ++c) {
        mp[n * C + c] = static_cast<float>(piv[c] + s1[c] / acc_t(HW));
        qp[n * C + c] = static_cast<float>(std::max(s2[c] - s1[c] * s1[c] / acc_t(HW), acc_t(0)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cpu_plane_moments(const at::Tensor& y_in, const std::optional<at::Tensor>& conv_weight,
                                                     const std::optional<at::Tensor>& conv_bias,
                                                     at::IntArrayRef conv_padding) {
  const char* op = "cpu_plane_moments";
  at::Tensor y, wt, bt;
  DirectConv conv;
  const bool fused = conv_weight.has_value() && conv_weight->defined();
  const auto [C, H, W] = prepare_input(op, y_in, conv_weight, conv_bias, conv_padding, y, wt, bt, conv);
  const int64_t N = y.size(0), HW = H * W;
  at::Tensor mean = at::empty({N, C}, y.options().dtype(at::kFloat));
  at::Tensor m2 = at::empty({N, C}, y.options().dtype(at::kFloat));
  if (N == 0 || C == 0 || HW == 0) return {mean, m2};
  const DirectConv* cv = fused ? &conv : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cpu_plane_moments",
                                  [&] { plane_moments<scalar_t>(y, C, HW, mean, m2, cv, H, W); });
  return {mean, m2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(datadam_fast, m) {
  m.def("cpu_real_epilogue(Tensor y, Tensor? scale, Tensor? shift, Tensor? weight, Tensor? bias, int groups, "
        "float eps, int act, float slope, int pool, float power, bool attention, Tensor? conv_weight=None, "
        "Tensor? conv_bias=None, int[] conv_padding=[0, 0]) -> (Tensor out, Tensor att)");
  m.def("cpu_plane_moments(Tensor y, Tensor? conv_weight=None, Tensor? conv_bias=None, "
        "int[] conv_padding=[0, 0]) -> (Tensor mean, Tensor m2)");
}

TORCH_LIBRARY_IMPL(datadam_fast, CPU, m) {
  m.impl("cpu_real_epilogue", &cpu_real_epilogue);
  m.impl("cpu_plane_moments", &cpu_plane_moments);
}
