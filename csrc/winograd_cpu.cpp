// Winograd F(2x2, 3x3) convolution for the no-grad real-side forward on CPU.
//
// cpu_winograd_conv3x3(x, u, bias?) -> y
//   x    [N, Cin, H, W] float32 (any layout; channels_last is read in place)
//   u    [16, Cin, Cout] float32: the transformed filters G g G^T (winograd_filters() in Python)
//   bias [Cout] or None
//   y    [N, Cout, H, W] float32, channels_last: the 3x3 convolution, stride 1, padding 1
//
// Why: the real side of every distribution-matching method runs a large batch (256-1024 images per
// class) through the network with no gradient, and on CPU its 3x3 convolutions with 128 input
// channels are most of an iteration. oneDNN runs them as direct convolutions at the FMA peak, so
// the only way to go faster is fewer multiplications: F(2x2, 3x3) computes each 2x2 output tile
// with 16 products per (input, output) channel pair instead of 36, as 16 GEMMs [tiles, Cin] x
// [Cin, Cout] (2.25x fewer flops; cuDNN picks the same algorithm for fp32). The transforms use only
// 0, +-1 (input, output) and +-1/2 (filters, applied in Python): exact in binary, and the result
// differs from the direct convolution by float rounding only (a few ulp of the sum's magnitude;
// tests/loss/test_winograd.py).
//
// Memory: images are processed in blocks of about TILES_PER_BLOCK tiles so that the transformed
// input V [16, tiles, Cin] and the GEMM output M [16, tiles, Cout] of one block stay in cache; the
// input is read once and the output written once (NHWC, every inner loop runs over contiguous
// channels and auto-vectorises). Parallel over blocks (at::parallel_for); each block's 16 GEMMs run
// single-threaded inside it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

constexpr int64_t TILES_PER_BLOCK = 256;

// V[k][t][c] = (B^T d B)[k] for the 4x4 input patch d of tile t; B^T = [[1,0,-1,0],[0,1,1,0],
// [0,-1,1,0],[0,1,0,-1]]. `rows[i][j]` point at the Cin channels of patch pixel (i, j), or at
// zeros outside the image (the padding).
inline void input_tile(const float* const rows[4][4], int64_t Cin, int64_t stride_k, float* v) {
#pragma omp simd
  for (int64_t c = 0; c < Cin; ++c) {
    float d[4][4], t[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = rows[i][j][c];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = d[0][j] - d[2][j];
      t[1][j] = d[1][j] + d[2][j];
      t[2][j] = d[2][j] - d[1][j];
      t[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {
      v[(i * 4 + 0) * stride_k + c] = t[i][0] - t[i][2];
      v[(i * 4 + 1) * stride_k + c] = t[i][1] + t[i][2];
      v[(i * 4 + 2) * stride_k + c] = t[i][2] - t[i][1];
      v[(i * 4 + 3) * stride_k + c] = t[i][1] - t[i][3];
    }
  }
}

// y (2x2 tile) = A^T m A + bias, A^T = [[1,1,1,0],[0,1,-1,-1]]; `out[a][b]` is null for an output
// pixel outside the image (odd H or W).
inline void output_tile(const float* m, int64_t stride_k, int64_t Cout, const float* bias, float* const out[2][2]) {
#pragma omp simd
  for (int64_t c = 0; c < Cout; ++c) {
    float t[2][4];
    for (int j = 0; j < 4; ++j) {
      const float m0 = m[(0 * 4 + j) * stride_k + c], m1 = m[(1 * 4 + j) * stride_k + c];
      const float m2 = m[(2 * 4 + j) * stride_k + c], m3 = m[(3 * 4 + j) * stride_k + c];
      t[0][j] = m0 + m1 + m2;
      t[1][j] = m1 - m2 - m3;
    }
    const float b = bias ? bias[c] : 0.f;
    for (int a = 0; a < 2; ++a) {
      const float y0 = t[a][0] + t[a][1] + t[a][2] + b;
      const float y1 = t[a][1] - t[a][2] - t[a][3] + b;
      if (out[a][0]) out[a][0][c] = y0;
      if (out[a][1]) out[a][1][c] = y1;
    }
  }
}

at::Tensor cpu_winograd_conv3x3(const at::Tensor& x_in, const at::Tensor& u_in, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 4, "cpu_winograd_conv3x3: expected x [N, Cin, H, W], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && u_in.scalar_type() == at::kFloat,
              "cpu_winograd_conv3x3: expected float32 x and filters, got ", x_in.scalar_type(), " and ",
              u_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu() && u_in.device().is_cpu(), "cpu_winograd_conv3x3: expected CPU tensors");
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(u_in.dim() == 3 && u_in.size(0) == 16 && u_in.size(1) == Cin,
              "cpu_winograd_conv3x3: expected filters [16, ", Cin, ", Cout], got ", u_in.sizes());
  const int64_t Cout = u_in.size(2);
  const float* bias = nullptr;
  at::Tensor bias_c;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == Cout && bias_in->scalar_type() == at::kFloat,
                "cpu_winograd_conv3x3: expected a float32 bias of ", Cout, " values, got ", bias_in->sizes());
    bias_c = bias_in->contiguous();
    bias = bias_c.data_ptr<float>();
  }
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = u_in.contiguous();
  at::Tensor y = at::empty({N, Cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0 || H == 0 || W == 0) return y;
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = TH * TW;
  const int64_t per_block = std::max<int64_t>(1, TILES_PER_BLOCK / T);
  const int64_t blocks = (N + per_block - 1) / per_block;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> zeros(Cin, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t rows_max = per_block * T;
    at::Tensor V = at::empty({16, rows_max, Cin}, x.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor M = at::empty({16, rows_max, Cout}, x.options().memory_format(at::MemoryFormat::Contiguous));
    float* vp = V.data_ptr<float>();
    float* mp = M.data_ptr<float>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * per_block, n1 = std::min(N, n0 + per_block), rows = (n1 - n0) * T;
      const float* patch[4][4];
      for (int64_t n = n0; n < n1; ++n) {
        const float* xn = xp + n * H * W * Cin;
        for (int64_t ty = 0; ty < TH; ++ty)
          for (int64_t tx = 0; tx < TW; ++tx) {
            for (int i = 0; i < 4; ++i)
              for (int j = 0; j < 4; ++j) {
                const int64_t yy = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
                patch[i][j] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? xn + (yy * W + xx) * Cin : zeros.data();
              }
            const int64_t r = (n - n0) * T + ty * TW + tx;
            input_tile(patch, Cin, rows_max * Cin, vp + r * Cin);
          }
      }
      at::Tensor Vb = V.narrow(1, 0, rows), Mb = M.narrow(1, 0, rows);
      at::bmm_out(Mb, Vb, u);
      for (int64_t n = n0; n < n1; ++n) {
        float* yn = yp + n * H * W * Cout;
        for (int64_t ty = 0; ty < TH; ++ty)
          for (int64_t tx = 0; tx < TW; ++tx) {
            float* out[2][2];
            for (int a = 0; a < 2; ++a)
              for (int b = 0; b < 2; ++b) {
                const int64_t yy = 2 * ty + a, xx = 2 * tx + b;
                out[a][b] = (yy < H && xx < W) ? yn + (yy * W + xx) * Cout : nullptr;
              }
            const int64_t r = (n - n0) * T + ty * TW + tx;
            output_tile(mp + r * Cout, rows_max * Cout, Cout, bias, out);
          }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(datadam_fast, m) {
  m.def("cpu_winograd_conv3x3(Tensor x, Tensor u, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(datadam_fast, CPU, m) {
  m.impl("cpu_winograd_conv3x3", &cpu_winograd_conv3x3);
}
