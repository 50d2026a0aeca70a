// CPU inference kernels of SSIU for channels-last float32 maps, registered as torch.ops.ssiu.*.
//
// Each replaces a chain of eager PyTorch passes over full-size maps by one pass; on CPU the cost of those
// maps is memory traffic, not arithmetic. They have no autograd formula: training, tracing and ONNX export
// compose the same results from standard operators (see ssiu_arch/kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kMaxKernel = 7;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SSIU_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SSIU_TARGETS
#endif

// 16 float lanes; GCC and Clang lower it to one AVX-512 register, two AVX2 registers, or four SSE ones.
typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

// Row or column j of a side of n after reflection at both ends (|overshoot| < n).
inline int64_t reflect(int64_t j, int64_t n) { return j < 0 ? -j : (j >= n ? 2 * (n - 1) - j : j); }

// One output row of a K x K depthwise convolution, columns reflect padded.
//   rows: the K input rows it reads, each (width, c); taps: (K * K, c); bias: (c); out: (width, c).
// Channels go in blocks of 16 lanes whose K * K taps stay in registers along the row.
template <int64_t K>
SSIU_TARGETS void depthwise_row(const float* const* rows, int64_t width, int64_t c, const float* taps,
                                const float* bias, float* out) {
  constexpr int64_t p = K / 2;
  int64_t ch = 0;
  for (; ch + 16 <= c; ch += 16) {
    Vec16 w[K * K];
    for (int64_t t = 0; t < K * K; ++t) w[t] = load16(taps + t * c + ch);
    const Vec16 b = load16(bias + ch);
    for (int64_t x = 0; x < width; ++x) {
      Vec16 acc = b;
      if (x >= p && x + p < width) {
        for (int64_t ky = 0; ky < K; ++ky) {
          const float* src = rows[ky] + (x - p) * c + ch;
          for (int64_t kx = 0; kx < K; ++kx) acc += w[ky * K + kx] * load16(src + kx * c);
        }
      } else {
        for (int64_t ky = 0; ky < K; ++ky) {
          for (int64_t kx = 0; kx < K; ++kx) acc += w[ky * K + kx] * load16(rows[ky] + reflect(x + kx - p, width) * c + ch);
        }
      }
      store16(out + x * c + ch, acc);
    }
  }
  for (; ch < c; ++ch) {
    for (int64_t x = 0; x < width; ++x) {
      float acc = bias[ch];
      for (int64_t ky = 0; ky < K; ++ky) {
        for (int64_t kx = 0; kx < K; ++kx) acc += taps[(ky * K + kx) * c + ch] * rows[ky][reflect(x + kx - p, width) * c + ch];
      }
      out[x * c + ch] = acc;
    }
  }
}

using RowKernel = void (*)(const float* const*, int64_t, int64_t, const float*, const float*, float*);

RowKernel row_kernel(int64_t k) {
  switch (k) {
    case 1: return depthwise_row<1>;
    case 3: return depthwise_row<3>;
    case 5: return depthwise_row<5>;
    case 7: return depthwise_row<7>;
    default: return nullptr;
  }
}

// Reflect-padded k x k depthwise convolution of a channels-last (B, N, W, C) map.
//
// Output row i is centred on input row `offset + i`; rows beyond the first or last input row are reflected
// (so the input is a band of a larger map whose border rows, where it has them, are its own). weight is
// (C, 1, k, k) as in nn.Conv2d(groups=C). Returns (B, rows, W, C).
at::Tensor depthwise_reflect(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             int64_t offset, int64_t rows) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "depthwise_reflect: x must be a float32 (B, N, W, C) CPU map");
  const at::Tensor input = x.contiguous();
  const int64_t batch = input.size(0), n = input.size(1), width = input.size(2), c = input.size(3);
  const int64_t k = weight.size(-1), p = k / 2;
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == k,
              "depthwise_reflect: weight must be (C, 1, k, k) for C = ", c, " channels, got ", weight.sizes());
  const RowKernel kernel = row_kernel(k);
  TORCH_CHECK(kernel != nullptr, "depthwise_reflect: kernel size must be 1, 3, 5 or 7, got ", k);
  TORCH_CHECK(p < n && p < width, "depthwise_reflect: a ", n, "x", width, " map is too small to reflect-pad by ", p);
  TORCH_CHECK(offset >= 0 && rows >= 0 && offset + rows <= n, "depthwise_reflect: rows ", offset, "..",
              offset + rows, " outside the ", n, " input rows");
  const at::Tensor taps = weight.reshape({c, k * k}).t().contiguous().to(at::kFloat);
  const at::Tensor shift = bias ? bias->contiguous().to(at::kFloat) : at::zeros({c}, input.options());
  at::Tensor out = at::empty({batch, rows, width, c}, input.options());
  const float* in_data = input.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float* tap_data = taps.data_ptr<float>();
  const float* bias_data = shift.data_ptr<float>();
  const int64_t row_size = width * c;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1));
  at::parallel_for(0, batch * rows, grain, [&](int64_t begin, int64_t end) {
    std::array<const float*, kMaxKernel> src{};
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / rows, r = offset + index % rows;
      for (int64_t ky = 0; ky < k; ++ky) src[ky] = in_data + (b * n + reflect(r + ky - p, n)) * row_size;
      kernel(src.data(), width, c, tap_data, bias_data, out_data + index * row_size);
    }
  });
  return out;
}

// Source index and weight of the second neighbour of each output position of a bilinear resize with aligned
// corners, computed in float32 as PyTorch's upsample_bilinear2d does: position = (in - 1) / (out - 1) * i.
struct Linear {
  int64_t first, second;
  float weight;
};

Linear aligned_linear(int64_t i, int64_t in, int64_t out) {
  const float scale = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f;
  const float position = scale * static_cast<float>(i);
  const int64_t first = std::min(static_cast<int64_t>(position), in - 1);
  return {first, std::min(first + 1, in - 1), position - static_cast<float>(first)};
}

SSIU_TARGETS void combine_row(const float* top, const float* bottom, float wy, const Linear* cols, const float* v,
                              const float* b, int64_t width, int64_t c, float* out) {
  for (int64_t x = 0; x < width; ++x) {
    const Linear& col = cols[x];
    const float* t0 = top + col.first * c;
    const float* t1 = top + col.second * c;
    const float* b0 = bottom + col.first * c;
    const float* b1 = bottom + col.second * c;
    const float wx = col.weight, wx0 = 1.f - wx, wy0 = 1.f - wy;
    const int64_t at = x * c;
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) {
      const Vec16 up = wy0 * (wx0 * load16(t0 + ch) + wx * load16(t1 + ch)) +
                       wy * (wx0 * load16(b0 + ch) + wx * load16(b1 + ch));
      store16(out + at + ch, up + load16(v + at + ch) - load16(b + at + ch));
    }
    for (; ch < c; ++ch) {
      const float up = wy0 * (wx0 * t0[ch] + wx * t1[ch]) + wy * (wx0 * b0[ch] + wx * b1[ch]);
      out[at + ch] = up + v[at + ch] - b[at + ch];
    }
  }
}

// Rows [r0, r0 + N) of bilinear_resize(low) + v - b, where the resize (aligned corners) takes the (B, h, w, C)
// map `low` to (height, W) and v, b are those rows (B, N, W, C) of full-size maps: ESAM's upsampling and the
// update that consumes it in one pass.
at::Tensor upsample_combine(const at::Tensor& low, const at::Tensor& v, const at::Tensor& b, int64_t r0,
                            int64_t height) {
  TORCH_CHECK(low.dim() == 4 && v.dim() == 4 && low.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              b.scalar_type() == at::kFloat && low.device().is_cpu() && v.device().is_cpu() && b.device().is_cpu(),
              "upsample_combine: float32 CPU (B, H, W, C) maps expected");
  TORCH_CHECK(v.sizes() == b.sizes(), "upsample_combine: v ", v.sizes(), " and b ", b.sizes(), " differ in shape");
  TORCH_CHECK(low.size(0) == v.size(0) && low.size(3) == v.size(3), "upsample_combine: low ", low.sizes(),
              " does not match ", v.sizes());
  TORCH_CHECK(r0 >= 0 && r0 + v.size(1) <= height, "upsample_combine: rows ", r0, "..", r0 + v.size(1),
              " outside the ", height, " output rows");
  const at::Tensor src = low.contiguous(), vc = v.contiguous(), bc = b.contiguous();
  const int64_t batch = v.size(0), rows = v.size(1), width = v.size(2), c = v.size(3);
  const int64_t h = src.size(1), w = src.size(2);
  std::vector<Linear> cols(width);
  for (int64_t x = 0; x < width; ++x) cols[x] = aligned_linear(x, w, width);
  at::Tensor out = at::empty_like(vc);
  const float* low_data = src.data_ptr<float>();
  const float* v_data = vc.data_ptr<float>();
  const float* b_data = bc.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t row_size = width * c;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1));
  at::parallel_for(0, batch * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / rows;
      const Linear row = aligned_linear(r0 + index % rows, h, height);
      const float* plane = low_data + image * h * w * c;
      combine_row(plane + row.first * w * c, plane + row.second * w * c, row.weight, cols.data(),
                  v_data + index * row_size, b_data + index * row_size, width, c, out_data + index * row_size);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ssiu, m) {
  m.def("depthwise_reflect(Tensor x, Tensor weight, Tensor? bias, int offset, int rows) -> Tensor");
  m.def("upsample_combine(Tensor low, Tensor v, Tensor b, int r0, int height) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssiu, CPU, m) {
  m.impl("depthwise_reflect", depthwise_reflect);
  m.impl("upsample_combine", upsample_combine);
}
