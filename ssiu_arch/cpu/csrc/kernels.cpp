// CPU kernels of SSIU for channels-last float32 maps, registered as torch.ops.ssiu.*.
//
// Each replaces a chain of eager PyTorch passes over full-size maps by one pass; on CPU the cost of those
// maps is memory traffic, not arithmetic. Tracing and ONNX export compose the same results from standard
// operators (see ssiu_arch/cpu/kernels.py and ssiu_arch/cpu/engine.py). The engine's training path
// (ssiu_arch/cpu/training.py) uses the backward kernels: halo_attention_backward, gelu_gate_backward,
// depthwise_reflect_backward, moe_combine_backward, layer_norm_rows_backward, linear_backward (a 1x1 convolution's),
// linear_backward_shared (1x1 convolutions of one input) and gated_linear_backward (a 1x1 convolution of MSGM's
// gate).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>
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
typedef int32_t Int16 __attribute__((vector_size(64)));

inline __attribute__((always_inline)) Int16 float_to_bits(Vec16 v) {
  Int16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline __attribute__((always_inline)) Vec16 bits_to_float(Int16 bits) {
  Vec16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline __attribute__((always_inline)) Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline __attribute__((always_inline)) void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

inline __attribute__((always_inline)) Vec16 max16(Vec16 a, Vec16 b) { return a > b ? a : b; }

// Largest lane and sum of lanes, by halving.
inline __attribute__((always_inline)) float lanes_max(Vec16 v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec8 m8 = a > b ? a : b;
  const Vec4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const Vec4 m4 = c > d ? c : d;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}

inline __attribute__((always_inline)) float lanes_sum(Vec16 v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

// exp of 16 lanes of non-positive values (every use here: softmax and erf arguments): 2^n e^r with
// n = round(x / ln 2) and a degree-6 polynomial on |r| <= ln(2) / 2 (Cephes' coefficients, within 2 ulp of expf).
// Below -87.3 it returns 0, not a value near the smallest normal float (exp(-87.3) ~ 1.6e-38): scaled by a
// softmax's normalizer that would be a denormal, and every product that reads a denormal takes a microcode assist
// (the attention backward's padded keys ran it several times slower).
inline __attribute__((always_inline)) Vec16 exp16(Vec16 x) {
  const Int16 under = x < -87.3f;
  x = under ? Vec16{} - 87.3f : x;
  const Vec16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  Vec16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec16 poly = Vec16{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.f;
  const Vec16 e = poly * bits_to_float((__builtin_convertvector(n, Int16) + 127) << 23);
  return under ? Vec16{} : e;
}

// Row or column j of a side of n after reflection at both ends (|overshoot| < n).
inline int64_t reflect(int64_t j, int64_t n) { return j < 0 ? -j : (j >= n ? 2 * (n - 1) - j : j); }

// One output row of a K x K depthwise convolution, columns reflect padded.
//   rows: the K input rows it reads, each (width, c); taps: (K * K, c); bias: (c); out: (width, c).
// Channels go in blocks of 16 lanes whose K * K taps stay in registers along the row.
template <int64_t K>
SSIU_TARGETS void depthwise_row(const float* const* rows, int64_t width, int64_t c, const float* taps,
                                const float* bias, float* out) {
  constexpr int64_t p = K / 2, kTile = 16;
  const int64_t vector_channels = c / 16 * 16;
  // Tiles of 16 pixels, each passing every block of 16 channels: the K input rows of a tile stay in L1 (walking the
  // whole row per channel block read them from L2 once per block).
  for (int64_t x0 = 0; x0 < width; x0 += kTile) {
    const int64_t x1 = std::min(width, x0 + kTile);
    for (int64_t ch = 0; ch < vector_channels; ch += 16) {
      Vec16 w[K * K];
      for (int64_t t = 0; t < K * K; ++t) w[t] = load16(taps + t * c + ch);
      const Vec16 b = load16(bias + ch);
      for (int64_t x = x0; x < x1; ++x) {
        Vec16 acc = b;
        if (x >= p && x + p < width) {
          for (int64_t ky = 0; ky < K; ++ky) {
            const float* src = rows[ky] + (x - p) * c + ch;
            for (int64_t kx = 0; kx < K; ++kx) acc += w[ky * K + kx] * load16(src + kx * c);
          }
        } else {
          for (int64_t ky = 0; ky < K; ++ky) {
            for (int64_t kx = 0; kx < K; ++kx) {
              acc += w[ky * K + kx] * load16(rows[ky] + reflect(x + kx - p, width) * c + ch);
            }
          }
        }
        store16(out + x * c + ch, acc);
      }
    }
  }
  for (int64_t ch = vector_channels; ch < c; ++ch) {
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

// erf of 16 lanes by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the approximation PyTorch's
// vectorized CPU erf uses), and GELU(x) = x / 2 (1 + erf(x / sqrt 2)).
// erf16_from takes exp(-x^2) as computed by the caller, who may need it too.
inline __attribute__((always_inline)) Vec16 erf16_from(Vec16 x, Vec16 exp_minus_square) {
  const Int16 sign = float_to_bits(x) & INT32_MIN;
  const Vec16 a = bits_to_float(float_to_bits(x) ^ sign);
  const Vec16 t = 1.f / (1.f + 0.3275911f * a);
  Vec16 poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const Vec16 r = 1.f - poly * t * exp_minus_square;  // >= 0: erf(|x|)
  return bits_to_float(float_to_bits(r) | sign);
}

inline __attribute__((always_inline)) Vec16 erf16(Vec16 x) { return erf16_from(x, exp16(-x * x)); }

// Phi(x) and phi(x), the standard normal's distribution and density, of 16 lanes, with one exp.
inline __attribute__((always_inline)) void normal_cdf_pdf(Vec16 x, Vec16& cdf, Vec16& pdf) {
  const Vec16 e = exp16(-0.5f * x * x);
  cdf = 0.5f * (1.f + erf16_from(x * 0.70710678118654752f, e));
  pdf = 0.39894228040143268f * e;
}

inline __attribute__((always_inline)) Vec16 gelu16(Vec16 x) { return 0.5f * x * (1.f + erf16(x * 0.70710678118654752f)); }

// GELU in place over n values (n a multiple of 16). Separate from the products: its constants would take the
// registers their accumulators need.
SSIU_TARGETS void gelu_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) store16(x + i, gelu16(load16(x + i)));
}

// kGeluMul and kBiasRound exist only in the bfloat16 GEMM (see there).
enum class Epilogue { kBias, kMul, kAdd, kGeluMul, kBiasRound };

// out[i] = epilogue(x[i] @ wt + bias) for m rows: x (m, k) with row stride ldx, wt (k, 16 NV) with row stride ldw.
// Epilogues: kMul multiplies by e1[i], kAdd adds e1[i] and, if given, e2[i] (rows of stride
// lde). Blocks of P rows keep P x NV accumulators in registers and load each weight vector once per block.
template <int64_t NV, int64_t P, Epilogue E>
SSIU_TARGETS void gemm_rows(int64_t m, int64_t k, const float* x, int64_t ldx, const float* wt, int64_t ldw,
                            const float* bias, const float* e1, const float* e2, int64_t lde, float* out,
                            int64_t ldo) {
  for (int64_t i = 0; i + P <= m; i += P) {
    Vec16 acc[P][NV];
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = load16(bias + 16 * v);
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      Vec16 w[NV];
      for (int64_t v = 0; v < NV; ++v) w[v] = load16(wt + kk * ldw + 16 * v);
      for (int64_t r = 0; r < P; ++r) {
        const float xv = x[(i + r) * ldx + kk];
        for (int64_t v = 0; v < NV; ++v) acc[r][v] += xv * w[v];
      }
    }
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t v = 0; v < NV; ++v) store16(out + (i + r) * ldo + 16 * v, acc[r][v]);
    }
    // The epilogue re-reads the block from L1 once the accumulators are stored, which keeps them in registers.
    if constexpr (E != Epilogue::kBias) {
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t v = 0; v < NV; ++v) {
          float* o = out + (i + r) * ldo + 16 * v;
          const int64_t at = (i + r) * lde + 16 * v;
          Vec16 y = load16(o);
          if constexpr (E == Epilogue::kMul) y *= load16(e1 + at);
          if constexpr (E == Epilogue::kAdd) {
            y += load16(e1 + at);
            if (e2) y += load16(e2 + at);
          }
          store16(o, y);
        }
      }
    }
  }
}

// gemm_rows over any number of rows and any output width that is a multiple of 16.
template <Epilogue E>
void gemm(int64_t m, int64_t k, int64_t n, const float* x, int64_t ldx, const float* wt, const float* bias,
          const float* e1, const float* e2, int64_t lde, float* out, int64_t ldo) {
  constexpr int64_t P = 6;
  const int64_t body = m / P * P;
  for (int64_t col = 0; col < n; col += 64) {
    const int64_t nv = std::min<int64_t>(4, (n - col) / 16);
    const float* c1 = e1 ? e1 + col : nullptr;
    const float* c2 = e2 ? e2 + col : nullptr;
    const float* rx = x + body * ldx;
    const float* r1 = c1 ? c1 + body * lde : nullptr;
    const float* r2 = c2 ? c2 + body * lde : nullptr;
    float* o = out + col;
    float* ro = o + body * ldo;
#define SSIU_GEMM(NVV)                                                                               \
  gemm_rows<NVV, P, E>(body, k, x, ldx, wt + col, n, bias + col, c1, c2, lde, o, ldo);              \
  gemm_rows<NVV, 1, E>(m - body, k, rx, ldx, wt + col, n, bias + col, r1, r2, lde, ro, ldo);
    switch (nv) {
      case 1: SSIU_GEMM(1) break;
      case 2: SSIU_GEMM(2) break;
      case 3: SSIU_GEMM(3) break;
      default: SSIU_GEMM(4) break;
    }
#undef SSIU_GEMM
  }
}

// Weight gradient of a linear map of pixels (a 1x1 convolution), one P x 16 NV tile of it over `rows` pixels:
//   dw[r][j] += sum_n g[n][r] x[n][j] for r < P, j < 16 NV; g rows of stride ldg, x rows of stride ldx, dw of lddw.
// The tile stays in registers (P x NV accumulators) while the rows stream past: one load of x per NV vectors and
// one broadcast of g per row of the tile. The rows' sum starts from zero and is added to dw at the end, so that a
// gradient over many chunks of rows is a sum of chunk sums: summed row after row into dw, a thread's thousands of
// rows made one float32 chain, 2-5e-6 from float64 (relative norm) where chunk sums stay within 1e-6.
template <int64_t P, int64_t NV>
SSIU_TARGETS void weight_grad_tile(int64_t rows, const float* g, int64_t ldg, const float* x, int64_t ldx, float* dw,
                                   int64_t lddw) {
  Vec16 acc[P][NV] = {};
  for (int64_t n = 0; n < rows; ++n) {
    Vec16 xv[NV];
    for (int64_t v = 0; v < NV; ++v) xv[v] = load16(x + n * ldx + 16 * v);
    for (int64_t r = 0; r < P; ++r) {
      const float gr = g[n * ldg + r];
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += gr * xv[v];
    }
  }
  for (int64_t r = 0; r < P; ++r) {
    for (int64_t v = 0; v < NV; ++v) store16(dw + r * lddw + 16 * v, load16(dw + r * lddw + 16 * v) + acc[r][v]);
  }
}

// weight_grad_tile over every row tile (6 at a time) of 16 NV columns of dw (o, ldx-wide rows).
template <int64_t NV>
void weight_grad_columns(int64_t rows, int64_t o, const float* g, const float* x, int64_t ldx, float* dw) {
  constexpr int64_t P = 6;
  int64_t r0 = 0;
  for (; r0 + P <= o; r0 += P) weight_grad_tile<P, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx);
  switch (o - r0) {
    case 1: weight_grad_tile<1, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx); break;
    case 2: weight_grad_tile<2, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx); break;
    case 3: weight_grad_tile<3, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx); break;
    case 4: weight_grad_tile<4, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx); break;
    case 5: weight_grad_tile<5, NV>(rows, g + r0, o, x, ldx, dw + r0 * ldx, ldx); break;
    default: break;
  }
}

// db[j] += the sum of column j of g (rows x o), summed apart first like weight_grad_tile's rows (o <= kMaxColumns
// at a time).
SSIU_TARGETS void add_rows(const float* g, int64_t rows, int64_t o, float* db) {
  constexpr int64_t kMaxColumns = 256;
  for (int64_t j0 = 0; j0 < o; j0 += kMaxColumns) {
    const int64_t width = std::min(kMaxColumns, o - j0);
    float sums[kMaxColumns] = {};
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t j = 0; j < width; ++j) sums[j] += g[n * o + j0 + j];
    }
    for (int64_t j = 0; j < width; ++j) db[j0 + j] += sums[j];
  }
}

// Adds the weight gradient (o, i) of `rows` rows of g (rows, o) and x (rows, i) to dw, and their bias gradient to the
// o values after it.
void weight_bias_grad_chunk(int64_t rows, int64_t o, int64_t i, const float* g, const float* x, float* dw) {
  for (int64_t col = 0; col < i; col += 64) {
    switch (std::min<int64_t>(4, (i - col) / 16)) {
      case 1: weight_grad_columns<1>(rows, o, g, x + col, i, dw + col); break;
      case 2: weight_grad_columns<2>(rows, o, g, x + col, i, dw + col); break;
      case 3: weight_grad_columns<3>(rows, o, g, x + col, i, dw + col); break;
      default: weight_grad_columns<4>(rows, o, g, x + col, i, dw + col); break;
    }
  }
  add_rows(g, rows, o, dw + o * i);
}

// MSGM's gate for training, over n values (a multiple of 16): out = GELU(h) * u, and its gradients from the
// output's gradient g: dh = g u GELU'(h), du = g GELU(h), with GELU'(h) = Phi(h) + h phi(h). One pass each,
// where eager PyTorch makes two forward and three backward passes over the maps.
SSIU_TARGETS void gelu_gate_values(const float* h, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) store16(out + i, gelu16(load16(h + i)) * load16(u + i));
}

SSIU_TARGETS void gelu_gate_gradients(const float* g, const float* h, const float* u, int64_t n, float* dh,
                                      float* du) {
  for (int64_t i = 0; i < n; i += 16) {
    const Vec16 x = load16(h + i), gi = load16(g + i);
    Vec16 cdf, pdf;
    normal_cdf_pdf(x, cdf, pdf);
    store16(dh + i, gi * load16(u + i) * (cdf + x * pdf));
    store16(du + i, gi * (x * cdf));
  }
}

// Gradients of a 1x1 convolution (a linear map of pixels, y = x W^T + b) from its output's gradient g (m, o) and
// its input x (m, i), both channels-last rows, i a multiple of 16: dw (o, i) = g^T x, db (o) = column sums of g and,
// given the weight (o, i), dx (m, i) = g W. oneDNN's backward computes the weight
// gradient at about 60% of its forward rate on a 64-channel map and reads g once for dx and again for dw; here
// chunks of 64 rows (both operands in L1) pass every tile of dw once and give their rows of dx, and each thread sums
// its own run of rows into a partial weight gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0) && grad.scalar_type() == at::kFloat &&
                  x.scalar_type() == at::kFloat && grad.device().is_cpu() && x.device().is_cpu(),
              "linear_backward: grad (m, o) and x (m, i) must be float32 CPU matrices of the same rows, got ",
              grad.sizes(), " and ", x.sizes());
  const int64_t m = x.size(0), i = x.size(1), o = grad.size(1);
  TORCH_CHECK(i % 16 == 0, "linear_backward: input channels must be a multiple of 16, got ", i);
  TORCH_CHECK(!weight || (weight->sizes() == at::IntArrayRef({o, i}) && weight->scalar_type() == at::kFloat),
              "linear_backward: weight must be float32 (", o, ", ", i, ")");
  const at::Tensor g = grad.contiguous(), input = x.contiguous();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  at::Tensor dx = weight ? at::empty({m, i}, input.options()) : at::Tensor();
  const std::vector<float> zeros(i, 0.f);
  constexpr int64_t kChunk = 64;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / (16 * kChunk)));
  at::Tensor partial = at::zeros({tasks, o * i + o}, input.options());
  const float* g_data = g.data_ptr<float>();
  const float* x_data = input.data_ptr<float>();
  const float* w_data = weight ? w.data_ptr<float>() : nullptr;
  float* dx_data = weight ? dx.data_ptr<float>() : nullptr;
  float* p_data = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* dw = p_data + t * (o * i + o);
      for (int64_t n0 = m * t / tasks, stop = m * (t + 1) / tasks; n0 < stop; n0 += kChunk) {
        const int64_t rows = std::min(kChunk, stop - n0);
        const float* gc = g_data + n0 * o;
        weight_bias_grad_chunk(rows, o, i, gc, x_data + n0 * i, dw);
        if (w_data) {
          gemm<Epilogue::kBias>(rows, o, i, gc, o, w_data, zeros.data(), nullptr, nullptr, 0, dx_data + n0 * i, i);
        }
      }
    }
  });
  const at::Tensor total = tasks > 1 ? partial.sum(0) : partial[0];
  return {dx, total.slice(0, 0, o * i).view({o, i}), total.slice(0, o * i)};
}

// Gradients of MSGM's output projection of its gate, y = x W^T + b for x = GELU(h) u, from y's gradient g (m, o),
// the gate x and its inputs h and u (m, i): dw (o, i), db (o), dh and du (m, i). linear_backward and
// gelu_gate_backward in one pass: each chunk's rows of the gate's gradient g W stay in L1 and become dh and du, where
// the two passes wrote that gradient out and read it back. (Recomputing the gate here instead of keeping it from the
// forward pass measured 15% slower: its erf costs more than reading it.)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(const at::Tensor& grad,
                                                                                 const at::Tensor& gate,
                                                                                 const at::Tensor& h,
                                                                                 const at::Tensor& u,
                                                                                 const at::Tensor& weight) {
  TORCH_CHECK(grad.dim() == 2 && gate.dim() == 2 && grad.size(0) == gate.size(0) && grad.scalar_type() == at::kFloat &&
                  grad.device().is_cpu(),
              "gated_linear_backward: grad (m, o) must be a float32 CPU matrix of the gate's rows, got ", grad.sizes(),
              " and ", gate.sizes());
  for (const at::Tensor* t : {&gate, &h, &u}) {
    TORCH_CHECK(t->sizes() == gate.sizes() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "gated_linear_backward: the gate, h and u must be float32 CPU matrices of one shape, got ",
                gate.sizes(), ", ", h.sizes(), " and ", u.sizes());
  }
  const int64_t m = gate.size(0), i = gate.size(1), o = grad.size(1);
  TORCH_CHECK(i % 16 == 0, "gated_linear_backward: input channels must be a multiple of 16, got ", i);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({o, i}) && weight.scalar_type() == at::kFloat,
              "gated_linear_backward: weight must be float32 (", o, ", ", i, ")");
  const at::Tensor g = grad.contiguous(), x = gate.contiguous(), hc = h.contiguous(), uc = u.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor dh = at::empty({m, i}, x.options()), du = at::empty({m, i}, x.options());
  const std::vector<float> zeros(i, 0.f);
  constexpr int64_t kChunk = 64;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / (16 * kChunk)));
  at::Tensor partial = at::zeros({tasks, o * i + o}, x.options());
  const float* g_data = g.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  const float* h_data = hc.data_ptr<float>();
  const float* u_data = uc.data_ptr<float>();
  const float* w_data = w.data_ptr<float>();
  float* dh_data = dh.data_ptr<float>();
  float* du_data = du.data_ptr<float>();
  float* p_data = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dgate(kChunk * i);
    for (int64_t t = begin; t < end; ++t) {
      float* dw = p_data + t * (o * i + o);
      for (int64_t n0 = m * t / tasks, stop = m * (t + 1) / tasks; n0 < stop; n0 += kChunk) {
        const int64_t rows = std::min(kChunk, stop - n0), at = n0 * i;
        const float* gc = g_data + n0 * o;
        weight_bias_grad_chunk(rows, o, i, gc, x_data + at, dw);
        gemm<Epilogue::kBias>(rows, o, i, gc, o, w_data, zeros.data(), nullptr, nullptr, 0, dgate.data(), i);
        gelu_gate_gradients(dgate.data(), h_data + at, u_data + at, rows * i, dh_data + at, du_data + at);
      }
    }
  });
  const at::Tensor total = tasks > 1 ? partial.sum(0) : partial[0];
  return {dh, du, total.slice(0, 0, o * i).view({o, i}), total.slice(0, o * i)};
}

// LayerNorm over the c channels of each of `pixels` pixels: (x - mean) / sqrt(var + eps) * weight + bias, with
// the two-pass variance (c a multiple of 16); each pixel's mean and 1 / std go to `mean` and `rstd` if given (for
// a backward pass).
SSIU_TARGETS void layer_norm_rows(const float* x, int64_t pixels, int64_t c, const float* weight, const float* bias,
                                  float eps, float* out, float* mean = nullptr, float* rstd = nullptr) {
  for (int64_t px = 0; px < pixels; ++px) {
    const float* row = x + px * c;
    Vec16 sum{};
    for (int64_t ch = 0; ch < c; ch += 16) sum += load16(row + ch);
    const float mu = lanes_sum(sum) / static_cast<float>(c);
    Vec16 squares{};
    for (int64_t ch = 0; ch < c; ch += 16) {
      const Vec16 d = load16(row + ch) - mu;
      squares += d * d;
    }
    const float r = 1.f / std::sqrt(lanes_sum(squares) / static_cast<float>(c) + eps);
    for (int64_t ch = 0; ch < c; ch += 16) {
      store16(out + px * c + ch, (load16(row + ch) - mu) * r * load16(weight + ch) + load16(bias + ch));
    }
    if (mean) mean[px] = mu, rstd[px] = r;
  }
}

// ---- bfloat16 GEMMs (AVX512_BF16) ----
//
// With `vdpbf16ps` each 32-bit lane multiplies a pair of bfloat16 values by another pair and adds both products
// to a float32 accumulator: twice the multiply-adds of a float32 FMA per instruction. Operands are bfloat16 (the
// activations rounded to nearest even once per tile, weights packed once per call as (K / 2, N, 2) pairs);
// accumulators, biases and epilogues stay float32, and so does every map a kernel returns. The code is compiled
// for that instruction set by a function attribute and runs only where the CPU reports it (bf16_supported), so the
// library builds and runs everywhere; compilers without the intrinsics leave it out.
#if defined(__x86_64__) && __has_include(<immintrin.h>) && \
    ((defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define SSIU_HAVE_BF16 1
#include <immintrin.h>
#else
#define SSIU_HAVE_BF16 0
#endif

// linear_backward for n 1x1 convolutions of one input x (m, i): grads[k] (m, o_k) and weights[k] (o_k, i). Returns
// dx = sum_k grads[k] W_k (plus `add` if given), and each weight's and bias's gradient. Each chunk of x is read once
// for all n weight gradients, and its rows of dx are summed in L1 over the n products, where n linear_backward
// calls read x n times and write and read dx back n - 1 times.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> linear_backward_shared(
    at::TensorList grads, const at::Tensor& x, at::TensorList weights, const std::optional<at::Tensor>& add) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(weights.size()) == n,
              "linear_backward_shared: one weight for each of one or more gradients");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) % 16 == 0,
              "linear_backward_shared: x must be a float32 CPU matrix (m, i), i a multiple of 16, got ", x.sizes());
  const int64_t m = x.size(0), i = x.size(1);
  std::vector<at::Tensor> g, w;
  std::vector<int64_t> offsets{0};  // of each convolution's weight and bias gradients in a partial sum
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK(grads[k].dim() == 2 && grads[k].size(0) == m && grads[k].scalar_type() == at::kFloat &&
                    grads[k].device().is_cpu(),
                "linear_backward_shared: every gradient must be a float32 CPU matrix of x's ", m, " rows, got ",
                grads[k].sizes());
    const int64_t o = grads[k].size(1);
    TORCH_CHECK(weights[k].sizes() == at::IntArrayRef({o, i}) && weights[k].scalar_type() == at::kFloat,
                "linear_backward_shared: weight ", k, " must be float32 (", o, ", ", i, ")");
    g.push_back(grads[k].contiguous());
    w.push_back(weights[k].contiguous());
    offsets.push_back(offsets.back() + o * i + o);
  }
  TORCH_CHECK(!add || (add->sizes() == x.sizes() && add->scalar_type() == at::kFloat),
              "linear_backward_shared: add must be float32 and shaped as x");
  const at::Tensor input = x.contiguous(), extra = add ? add->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({m, i}, input.options());
  const std::vector<float> zeros(i, 0.f);
  constexpr int64_t kChunk = 64;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / (16 * kChunk)));
  at::Tensor partial = at::zeros({tasks, offsets.back()}, input.options());
  const float* x_data = input.data_ptr<float>();
  const float* add_data = add ? extra.data_ptr<float>() : nullptr;
  float* dx_data = dx.data_ptr<float>();
  float* p_data = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * kChunk * i);  // the chunk's dx as it sums, in two buffers taken in turn
    for (int64_t t = begin; t < end; ++t) {
      float* dw = p_data + t * offsets.back();
      for (int64_t n0 = m * t / tasks, stop = m * (t + 1) / tasks; n0 < stop; n0 += kChunk) {
        const int64_t rows = std::min(kChunk, stop - n0);
        const float* xc = x_data + n0 * i;
        const float* sum = add_data ? add_data + n0 * i : nullptr;
        for (int64_t k = 0; k < n; ++k) {
          const int64_t o = g[k].size(1);
          const float* gc = g[k].data_ptr<float>() + n0 * o;
          weight_bias_grad_chunk(rows, o, i, gc, xc, dw + offsets[k]);
          float* out = k == n - 1 ? dx_data + n0 * i : scratch.data() + (k % 2) * kChunk * i;
          if (sum) {
            gemm<Epilogue::kAdd>(rows, o, i, gc, o, w[k].data_ptr<float>(), zeros.data(), sum, nullptr, i, out, i);
          } else {
            gemm<Epilogue::kBias>(rows, o, i, gc, o, w[k].data_ptr<float>(), zeros.data(), nullptr, nullptr, 0, out,
                                  i);
          }
          sum = out;
        }
      }
    }
  });
  const at::Tensor total = tasks > 1 ? partial.sum(0) : partial[0];
  std::vector<at::Tensor> dweights, dbiases;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t o = g[k].size(1);
    dweights.push_back(total.slice(0, offsets[k], offsets[k] + o * i).view({o, i}));
    dbiases.push_back(total.slice(0, offsets[k] + o * i, offsets[k + 1]));
  }
  return {dx, dweights, dbiases};
}

// One pooled row of max_pool2 from the first of its two input rows (`width` pixels of c channels each).
SSIU_TARGETS void max_pool2_row(const float* top, int64_t width, int64_t c, int64_t w, int64_t stride, float* out,
                                int32_t* argmax) {
  for (int64_t xo = 0; xo < w; ++xo) {
    const float* window[4];
    for (int64_t k = 0; k < 4; ++k) window[k] = top + ((k / 2) * width + xo * stride + k % 2) * c;
    for (int64_t ch = 0; ch < c; ch += 16) {
      Vec16 best = load16(window[0] + ch);
      Int16 index{};
      for (int64_t k = 1; k < 4; ++k) {  // one comparison per ?: (GCC 12 splits a combined mask into lanes)
        const Vec16 v = load16(window[k] + ch);
        index = v > best ? Int16{} + static_cast<int32_t>(k) : index;
        best = v > best ? v : best;
      }
      store16(out + xo * c + ch, best);
      std::memcpy(argmax + xo * c + ch, &index, sizeof index);
    }
  }
}

// Adds a pooled row's gradient g (w pixels of c channels) at its maxima (argmax) to the two input rows from `top`.
SSIU_TARGETS void max_pool2_scatter_row(const float* g, const int32_t* argmax, int64_t width, int64_t c, int64_t w,
                                        int64_t stride, float* top) {
  for (int64_t xo = 0; xo < w; ++xo) {
    for (int64_t ch = 0; ch < c; ch += 16) {
      const Vec16 gv = load16(g + xo * c + ch);
      Int16 k;
      std::memcpy(&k, argmax + xo * c + ch, sizeof k);
      for (int64_t pos = 0; pos < 4; ++pos) {
        float* d = top + ((pos / 2) * width + xo * stride + pos % 2) * c + ch;
        store16(d, load16(d) + (k == static_cast<int32_t>(pos) ? gv : Vec16{}));
      }
    }
  }
}

// ESAM's max-pooling for training: 2x2 windows at stride `stride` over a (B, H, W, C) map, C a multiple of 16.
// Returns the pooled map (B, h, w, C), h = (H - 2) / stride + 1, and for each of its values the window position of
// the maximum (0-3, row-major; the first of equal values, as ATen's max_pool2d, which also lets a NaN win: here a NaN
// wins only from the window's first position, and a NaN in training features propagates through the step anyway).
std::tuple<at::Tensor, at::Tensor> max_pool2(const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(3) % 16 == 0 &&
                  x.size(1) >= 2 && x.size(2) >= 2,
              "max_pool2: x must be a float32 CPU (B, H, W, C) map, H, W >= 2, C a multiple of 16, got ", x.sizes());
  TORCH_CHECK(stride >= 2, "max_pool2: windows at a stride of 2 or more, got ", stride);
  const at::Tensor in = x.contiguous();
  const int64_t batch = in.size(0), height = in.size(1), width = in.size(2), c = in.size(3);
  const int64_t h = (height - 2) / stride + 1, w = (width - 2) / stride + 1;
  at::Tensor out = at::empty({batch, h, w, c}, in.options());
  at::Tensor argmax = at::empty({batch, h, w, c}, in.options().dtype(at::kInt));
  const float* xp = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int32_t* ap = argmax.data_ptr<int32_t>();
  at::parallel_for(0, batch * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h, y = row % h;
      max_pool2_row(xp + (b * height + y * stride) * width * c, width, c, w, stride, op + row * w * c,
                    ap + row * w * c);
    }
  });
  return {out, argmax};
}

// The input gradient of max_pool2: (B, H, W, C) from the pooled map's gradient `grad` (B, h, w, C) and its `argmax`,
// plus `add` (B, H, W, C) if given (another use's gradient of the same map, summed here instead of in a pass of its
// own, and no zero-filled map).
at::Tensor max_pool2_backward(const at::Tensor& grad, const at::Tensor& argmax, const std::optional<at::Tensor>& add,
                              int64_t height, int64_t width, int64_t stride) {
  TORCH_CHECK(grad.dim() == 4 && grad.scalar_type() == at::kFloat && grad.device().is_cpu() &&
                  argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt && grad.size(3) % 16 == 0,
              "max_pool2_backward: grad (B, h, w, C) float32 and argmax int32 of its shape expected, got ",
              grad.sizes(), " and ", argmax.sizes());
  const int64_t batch = grad.size(0), h = grad.size(1), w = grad.size(2), c = grad.size(3);
  TORCH_CHECK(stride >= 2 && height >= 2 && width >= 2 && (height - 2) / stride + 1 == h &&
                  (width - 2) / stride + 1 == w,
              "max_pool2_backward: a ", h, "x", w, " pooled map does not come from ", height, "x", width,
              " at stride ", stride);
  TORCH_CHECK(!add || (add->sizes() == at::IntArrayRef({batch, height, width, c}) &&
                       add->scalar_type() == at::kFloat),
              "max_pool2_backward: add must be float32 (B, H, W, C) = (", batch, ", ", height, ", ", width, ", ", c,
              ")");
  const at::Tensor g = grad.contiguous(), index = argmax.contiguous(), extra = add ? add->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({batch, height, width, c}, g.options());
  const float* gp = g.data_ptr<float>();
  const int32_t* ip = index.data_ptr<int32_t>();
  const float* ep = add ? extra.data_ptr<float>() : nullptr;
  float* dp = dx.data_ptr<float>();
  const int64_t row_size = width * c;
  at::parallel_for(0, batch * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / h, y = row % h;
      // the input rows this pooled row owns: its window's two, the ones the stride skips, and the last rows
      const int64_t r0 = y * stride, r1 = y == h - 1 ? height : r0 + stride;
      float* first = dp + (b * height + r0) * row_size;
      if (ep) {
        std::memcpy(first, ep + (b * height + r0) * row_size, (r1 - r0) * row_size * sizeof(float));
      } else {
        std::memset(first, 0, (r1 - r0) * row_size * sizeof(float));
      }
      max_pool2_scatter_row(gp + row * w * c, ip + row * w * c, width, c, w, stride, first);
    }
  });
  return dx;
}

// The input gradient of `pixels` rows of layer_norm_rows (see layer_norm_rows_backward), and the rows' sums of
// g xhat and of g added to sums (2 c values).
SSIU_TARGETS void layer_norm_backward_rows(const float* g, const float* x, const float* mean, const float* rstd,
                                           int64_t pixels, int64_t c, const float* weight, float* dx, float* sums) {
  for (int64_t px = 0; px < pixels; ++px) {
    const float* gr = g + px * c;
    const float* xr = x + px * c;
    const float mu = mean[px], r = rstd[px];
    Vec16 sum_gw{}, sum_gwx{};
    for (int64_t ch = 0; ch < c; ch += 16) {
      const Vec16 gv = load16(gr + ch), xhat = (load16(xr + ch) - mu) * r, gw = gv * load16(weight + ch);
      sum_gw += gw;
      sum_gwx += gw * xhat;
      store16(sums + ch, load16(sums + ch) + gv * xhat);
      store16(sums + c + ch, load16(sums + c + ch) + gv);
    }
    const float a = lanes_sum(sum_gw) / static_cast<float>(c), b = lanes_sum(sum_gwx) / static_cast<float>(c);
    for (int64_t ch = 0; ch < c; ch += 16) {
      const Vec16 xhat = (load16(xr + ch) - mu) * r;
      store16(dx + px * c + ch, (load16(gr + ch) * load16(weight + ch) - a - xhat * b) * r);
    }
  }
}

// LayerNorm for training over the c channels (a multiple of 16) of the rows of x (m, c): out as layer_norm_rows,
// with each row's mean and 1 / std kept for the backward pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) % 16 == 0,
              "layer_norm_rows_forward: x must be a float32 CPU matrix (m, c), c a multiple of 16, got ", x.sizes());
  const int64_t m = x.size(0), c = x.size(1);
  TORCH_CHECK(weight.numel() == c && bias.numel() == c && weight.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "layer_norm_rows_forward: weight and bias must be float32 of ", c, " values");
  const at::Tensor xc = x.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  at::Tensor out = at::empty_like(xc), mean = at::empty({m}, xc.options()), rstd = at::empty({m}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    layer_norm_rows(xp + begin * c, end - begin, c, wp, bp, static_cast<float>(eps), op + begin * c, mp + begin,
                    rp + begin);
  });
  return {out, mean, rstd};
}

// Backward of layer_norm_rows_forward from out's gradient g (m, c): with xhat = (x - mean) / std and gw = g weight,
// dx = (gw - mean_c(gw) - xhat mean_c(gw xhat)) / std; dweight = column sums of g xhat, dbias = column sums of g, as
// sums of 64-row chunk sums per thread (see weight_grad_tile).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                                       const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && grad.sizes() == x.sizes() && x.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat && x.device().is_cpu() && grad.device().is_cpu() &&
                  x.size(1) % 16 == 0,
              "layer_norm_rows_backward: grad and x must be float32 CPU matrices (m, c) of one shape, c a multiple of "
              "16, got ", grad.sizes(), " and ", x.sizes());
  const int64_t m = x.size(0), c = x.size(1);
  TORCH_CHECK(mean.numel() == m && rstd.numel() == m && weight.numel() == c && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "layer_norm_rows_backward: mean and rstd must be float32 of ", m, " values, weight of ", c);
  const at::Tensor g = grad.contiguous(), xc = x.contiguous(), w = weight.contiguous();
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  constexpr int64_t kChunk = 64;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / (16 * kChunk)));
  at::Tensor partial = at::zeros({tasks, 2 * c}, xc.options());
  const float* gp = g.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* mp = mu.data_ptr<float>();
  const float* rp = rs.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> chunk(2 * c);
    for (int64_t t = begin; t < end; ++t) {
      float* sums = pp + t * 2 * c;  // dweight, then dbias
      for (int64_t n0 = m * t / tasks, stop = m * (t + 1) / tasks; n0 < stop; n0 += kChunk) {
        std::fill(chunk.begin(), chunk.end(), 0.f);
        const int64_t rows = std::min(stop, n0 + kChunk) - n0;
        layer_norm_backward_rows(gp + n0 * c, xp + n0 * c, mp + n0, rp + n0, rows, c, wp, dxp + n0 * c, chunk.data());
        for (int64_t k = 0; k < 2 * c; k += 16) store16(sums + k, load16(sums + k) + load16(chunk.data() + k));
      }
    }
  });
  const at::Tensor total = tasks > 1 ? partial.sum(0) : partial[0];
  return {dx, total.slice(0, 0, c), total.slice(0, c)};
}

bool bf16_supported() {
#if SSIU_HAVE_BF16
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

#if SSIU_HAVE_BF16
#define SSIU_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// GELU(x) = x Phi(x) for the bfloat16 path, whose products round GELU's output to 8 significant bits: Phi by
// cubic Hermite interpolation of its values and slopes at 33 knots spaced 5/16 apart over [-5, 5], looked up
// from registers; 0 below and x above (Phi(-5) = 3e-7). Its error, below 1.4e-5 in Phi (h^4 / 384 max |Phi''''|),
// is a hundredth of that rounding, and it costs a third of erf16's instructions.
struct GeluTable {
  static constexpr int kIntervals = 32;
  static constexpr float kLow = -5.f, kStep = 10.f / kIntervals;
  __m512 c0[2], c1[2], c2[2], c3[2];  // coefficients of u^0..u^3, u in [0, 1) across each interval
  SSIU_BF16_TARGET GeluTable() {
    alignas(64) float coef[4][kIntervals];
    const auto phi = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
    const auto slope = [](double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI) * kStep; };
    for (int i = 0; i < kIntervals; ++i) {
      const double x0 = kLow + i * kStep, x1 = x0 + kStep;
      const double f0 = phi(x0), f1 = phi(x1), d0 = slope(x0), d1 = slope(x1);
      coef[0][i] = static_cast<float>(f0);
      coef[1][i] = static_cast<float>(d0);
      coef[2][i] = static_cast<float>(3 * (f1 - f0) - 2 * d0 - d1);
      coef[3][i] = static_cast<float>(2 * (f0 - f1) + d0 + d1);
    }
    __m512* tables[4] = {c0, c1, c2, c3};
    for (int j = 0; j < 4; ++j) {
      tables[j][0] = _mm512_load_ps(coef[j]);
      tables[j][1] = _mm512_load_ps(coef[j] + 16);
    }
  }
};

inline const GeluTable& gelu_table() {
  static const GeluTable table;
  return table;
}

SSIU_BF16_TARGET inline __m512 gelu_fast(__m512 x, const GeluTable& g) {
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_set1_ps(GeluTable::kLow)), _mm512_set1_ps(1.f / GeluTable::kStep));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(GeluTable::kIntervals - 0.001f));
  const __m512i i = _mm512_cvttps_epi32(t);
  const __m512 u = _mm512_sub_ps(t, _mm512_cvtepi32_ps(i));
  __m512 p = _mm512_permutex2var_ps(g.c3[0], i, g.c3[1]);
  p = _mm512_fmadd_ps(p, u, _mm512_permutex2var_ps(g.c2[0], i, g.c2[1]));
  p = _mm512_fmadd_ps(p, u, _mm512_permutex2var_ps(g.c1[0], i, g.c1[1]));
  p = _mm512_fmadd_ps(p, u, _mm512_permutex2var_ps(g.c0[0], i, g.c0[1]));
  const __m512 y = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(GeluTable::kLow), _CMP_GE_OQ), x, p);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-GeluTable::kLow), _CMP_GT_OQ), y, x);
}

// 16 bfloat16 values widened to float32 (exact), and 16 float32 values rounded to bfloat16 (nearest even).
SSIU_BF16_TARGET inline __m512 load_bf16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

SSIU_BF16_TARGET inline void store_bf16(uint16_t* p, __m512 v) {
  const __m256bh half = _mm512_cvtneps_pbh(v);
  std::memcpy(p, &half, sizeof half);
}

// depthwise_row for the bfloat16 path: input rows and output in bfloat16, taps, bias and sums in float32 (c a
// multiple of 16). Its input is a product's output that is rounded once instead of its output alone: half the
// bytes for the nine reads of every value, which is what this L2-bound convolution spends its time on. It mirrors
// depthwise_row rather than sharing a template with it: a shared body needs portable rounding in place of
// vcvtneps2bf16, which made the whole bfloat16 pass about 5% slower.
template <int64_t K>
SSIU_BF16_TARGET void depthwise_row_bf16(const uint16_t* const* rows, int64_t width, int64_t c, const float* taps,
                                         const float* bias, uint16_t* out) {
  constexpr int64_t p = K / 2, kTile = 16;  // tiles of pixels passing every channel block, as in depthwise_row
  for (int64_t x0 = 0; x0 < width; x0 += kTile) {
    const int64_t x1 = std::min(width, x0 + kTile);
    for (int64_t ch = 0; ch < c; ch += 16) {
      __m512 w[K * K];
      for (int64_t t = 0; t < K * K; ++t) w[t] = _mm512_loadu_ps(taps + t * c + ch);
      const __m512 b = _mm512_loadu_ps(bias + ch);
      for (int64_t x = x0; x < x1; ++x) {
        __m512 acc = b;
        if (x >= p && x + p < width) {
          for (int64_t ky = 0; ky < K; ++ky) {
            const uint16_t* src = rows[ky] + (x - p) * c + ch;
            for (int64_t kx = 0; kx < K; ++kx) acc = _mm512_fmadd_ps(w[ky * K + kx], load_bf16(src + kx * c), acc);
          }
        } else {
          for (int64_t ky = 0; ky < K; ++ky) {
            for (int64_t kx = 0; kx < K; ++kx) {
              acc = _mm512_fmadd_ps(w[ky * K + kx], load_bf16(rows[ky] + reflect(x + kx - p, width) * c + ch), acc);
            }
          }
        }
        store_bf16(out + x * c + ch, acc);
      }
    }
  }
}

// GELU (gelu_fast) of n float32 values (a multiple of 16): into bfloat16 `rounded` if given, else in place.
SSIU_BF16_TARGET void gelu_fast_rows(float* x, int64_t n, uint16_t* rounded) {
  const GeluTable& g = gelu_table();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 y = gelu_fast(_mm512_loadu_ps(x + i), g);
    if (rounded) {
      store_bf16(rounded + i, y);
    } else {
      _mm512_storeu_ps(x + i, y);
    }
  }
}

// n float32 values (n a multiple of 16) rounded to bfloat16, nearest even.
SSIU_BF16_TARGET void to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) store_bf16(out + i, _mm512_loadu_ps(x + i));
}

// gemm_rows with bfloat16 operands: x (m, k) bfloat16 with row stride ldx (k even), wp the (k / 2, n, 2) pairs
// of the weights with n = 16 NV columns from `wp` on and a pair-row stride of ldw values. Epilogue kGeluMul
// writes (x @ w + bias) * GELU(e1[i]) (gelu_fast) rounded to bfloat16 into outb instead of out: a gated product
// whose only reader is the next bfloat16 product; kBiasRound writes x @ w + bias rounded to bfloat16 into outb.
template <int64_t NV, int64_t P, Epilogue E>
SSIU_BF16_TARGET void gemm_rows_bf16(int64_t m, int64_t k, const uint16_t* x, int64_t ldx, const uint16_t* wp,
                                     int64_t ldw, const float* bias, const float* e1, const float* e2, int64_t lde,
                                     float* out, int64_t ldo, uint16_t* outb) {
  for (int64_t i = 0; i + P <= m; i += P) {
    __m512 acc[P][NV];
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(bias + 16 * v);
    }
    for (int64_t kk = 0; kk < k; kk += 2) {
      __m512bh w[NV];
      for (int64_t v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wp + kk / 2 * ldw + 32 * v);
      for (int64_t r = 0; r < P; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + (i + r) * ldx + kk, sizeof pair);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        for (int64_t v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, w[v]);
      }
    }
    if constexpr (E == Epilogue::kGeluMul) {
      // GELU's tables need the registers: the block waits in L1 meanwhile.
      alignas(64) float block[P][16 * NV];
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t v = 0; v < NV; ++v) _mm512_store_ps(block[r] + 16 * v, acc[r][v]);
      }
      const GeluTable& g = gelu_table();
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t v = 0; v < NV; ++v) {
          const __m512 y = _mm512_mul_ps(_mm512_load_ps(block[r] + 16 * v),
                                         gelu_fast(_mm512_loadu_ps(e1 + (i + r) * lde + 16 * v), g));
          store_bf16(outb + (i + r) * ldo + 16 * v, y);
        }
      }
      continue;
    }
    if constexpr (E == Epilogue::kBiasRound) {
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t v = 0; v < NV; ++v) store_bf16(outb + (i + r) * ldo + 16 * v, acc[r][v]);
      }
      continue;
    }
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t v = 0; v < NV; ++v) _mm512_storeu_ps(out + (i + r) * ldo + 16 * v, acc[r][v]);
    }
    if constexpr (E != Epilogue::kBias) {
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t v = 0; v < NV; ++v) {
          float* o = out + (i + r) * ldo + 16 * v;
          const int64_t at = (i + r) * lde + 16 * v;
          __m512 y = _mm512_loadu_ps(o);
          if constexpr (E == Epilogue::kMul) y = _mm512_mul_ps(y, _mm512_loadu_ps(e1 + at));
          if constexpr (E == Epilogue::kAdd) {
            y = _mm512_add_ps(y, _mm512_loadu_ps(e1 + at));
            if (e2) y = _mm512_add_ps(y, _mm512_loadu_ps(e2 + at));
          }
          _mm512_storeu_ps(o, y);
        }
      }
    }
  }
}
// gemm_rows_bf16 over any number of rows and any output width n that is a multiple of 16; wp holds (k / 2, n, 2).
template <Epilogue E>
SSIU_BF16_TARGET void gemm_bf16(int64_t m, int64_t k, int64_t n, const uint16_t* x, int64_t ldx, const uint16_t* wp,
                                const float* bias, const float* e1, const float* e2, int64_t lde, float* out,
                                int64_t ldo, uint16_t* outb = nullptr) {
  constexpr int64_t P = 6;
  const int64_t body = m / P * P;
  for (int64_t col = 0; col < n; col += 64) {
    const int64_t nv = std::min<int64_t>(4, (n - col) / 16);
    const float* c1 = e1 ? e1 + col : nullptr;
    const float* c2 = e2 ? e2 + col : nullptr;
    const uint16_t* rx = x + body * ldx;
    const float* r1 = c1 ? c1 + body * lde : nullptr;
    const float* r2 = c2 ? c2 + body * lde : nullptr;
    float* o = out ? out + col : nullptr;
    float* ro = o ? o + body * ldo : nullptr;
    uint16_t* ob = outb ? outb + col : nullptr;
    uint16_t* rob = ob ? ob + body * ldo : nullptr;
    const uint16_t* w = wp + 2 * col;
#define SSIU_GEMM(NVV)                                                                            \
  gemm_rows_bf16<NVV, P, E>(body, k, x, ldx, w, 2 * n, bias + col, c1, c2, lde, o, ldo, ob);     \
  gemm_rows_bf16<NVV, 1, E>(m - body, k, rx, ldx, w, 2 * n, bias + col, r1, r2, lde, ro, ldo, rob);
    switch (nv) {
      case 1: SSIU_GEMM(1) break;
      case 2: SSIU_GEMM(2) break;
      case 3: SSIU_GEMM(3) break;
      default: SSIU_GEMM(4) break;
    }
#undef SSIU_GEMM
  }
}
#endif

// A (C_out, C_in) float32 weight matrix as the (C_in / 2, C_out, 2) bfloat16 pairs gemm_bf16 reads.
at::Tensor pack_bf16(const at::Tensor& w) {
  const at::Tensor f32 = w.to(at::kFloat).contiguous();
  const int64_t n = f32.size(0), k = f32.size(1);
  at::Tensor packed = at::empty({k / 2, n, 2}, f32.options().dtype(at::kBFloat16));
  const float* src = f32.data_ptr<float>();
  at::BFloat16* dst = packed.data_ptr<at::BFloat16>();
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t kk = 0; kk < k; ++kk) dst[(kk / 2 * n + j) * 2 + kk % 2] = at::BFloat16(src[j * k + kk]);
  }
  return packed;
}

const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

// A weight matrix as gemm reads it, (k, n) float32, and as gemm_bf16 does, (k / 2, n, 2) bfloat16 pairs (null
// unless the bfloat16 path runs).
struct Weight {
  const float* f32;
  const uint16_t* bf16;
};

// gemm, or gemm_bf16 where the bfloat16 operand xb is given (x then goes unread).
template <Epilogue E>
void product(int64_t m, int64_t k, int64_t n, const float* x, const uint16_t* xb, int64_t ldx, const Weight& w,
             const float* bias, const float* e1, const float* e2, int64_t lde, float* out, int64_t ldo) {
#if SSIU_HAVE_BF16
  if (xb) {
    gemm_bf16<E>(m, k, n, xb, ldx, w.bf16, bias, e1, e2, lde, out, ldo);
    return;
  }
#endif
  gemm<E>(m, k, n, x, ldx, w.f32, bias, e1, e2, lde, out, ldo);
}

// (x @ w + bias) * GELU(gate) rounded to bfloat16 into out, for m rows of k bfloat16 inputs and n outputs (rows
// of gate and out n wide), where the bfloat16 path is compiled in.
void gated_product_bf16(int64_t m, int64_t k, int64_t n, const uint16_t* x, const Weight& w, const float* bias,
                        const float* gate, uint16_t* out) {
#if SSIU_HAVE_BF16
  gemm_bf16<Epilogue::kGeluMul>(m, k, n, x, k, w.bf16, bias, gate, nullptr, n, nullptr, n, out);
#else
  (void)m, (void)k, (void)n, (void)x, (void)w, (void)bias, (void)gate, (void)out;
  TORCH_CHECK(false, "bfloat16 kernels are not compiled in");
#endif
}

// gelu_fast_rows where the bfloat16 path is compiled in: GELU for outputs that only bfloat16 products read.
void gelu_for_bf16(float* x, int64_t n, uint16_t* rounded) {
#if SSIU_HAVE_BF16
  gelu_fast_rows(x, n, rounded);
#else
  (void)x, (void)n, (void)rounded;
  TORCH_CHECK(false, "bfloat16 kernels are not compiled in");
#endif
}

// Rounds n float32 values (a multiple of 16) to bfloat16 where the bfloat16 path is compiled in.
void round_bf16(const float* x, int64_t n, uint16_t* out) {
#if SSIU_HAVE_BF16
  to_bf16(x, n, out);
#else
  (void)x, (void)n, (void)out;
  TORCH_CHECK(false, "bfloat16 kernels are not compiled in");
#endif
}

// x @ w + bias rounded to bfloat16 into out (rows n wide), for m rows of k bfloat16 inputs, where the bfloat16
// path is compiled in.
void rounded_product_bf16(int64_t m, int64_t k, int64_t n, const uint16_t* x, const Weight& w, const float* bias,
                          uint16_t* out) {
#if SSIU_HAVE_BF16
  gemm_bf16<Epilogue::kBiasRound>(m, k, n, x, k, w.bf16, bias, nullptr, nullptr, 0, nullptr, n, out);
#else
  (void)m, (void)k, (void)n, (void)x, (void)w, (void)bias, (void)out;
  TORCH_CHECK(false, "bfloat16 kernels are not compiled in");
#endif
}

using RowKernelBf16 = void (*)(const uint16_t* const*, int64_t, int64_t, const float*, const float*, uint16_t*);

// depthwise_row_bf16 for a k x k kernel; null for other sizes or where the bfloat16 path is not compiled in.
RowKernelBf16 row_kernel_bf16(int64_t k) {
#if SSIU_HAVE_BF16
  switch (k) {
    case 1: return depthwise_row_bf16<1>;
    case 3: return depthwise_row_bf16<3>;
    case 5: return depthwise_row_bf16<5>;
    case 7: return depthwise_row_bf16<7>;
    default: return nullptr;
  }
#else
  (void)k;
  return nullptr;
#endif
}

// Fused Mixed-Scale Gating Module at inference on a channels-last (B, N, W, C) map:
//
//   out = W_o (GELU(W_1 x + b_1) * (W_3 DW_k(W_2 x + b_2) + b_3)) + b_o [+ add] [+ x]
//
// with x the input or, given ln_weight and ln_bias, its LayerNorm over channels (computed in the tiles, so the
// normalized map never exists), for output rows [offset, offset + rows) of x; the depthwise convolution reflects rows beyond x's first or last
// row and columns at both sides. Eager PyTorch makes seven passes over full-size maps for this; here each thread
// walks its own run of row tiles whose intermediates stay in its L2 cache, keeping the value rows that
// consecutive tiles share. Weights are (C_out, C_in) matrices, wd (mid, 1, k, k); widths multiples of 16.
at::Tensor msgm(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                const at::Tensor& b2, const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& w3,
                const at::Tensor& b3, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
                const std::optional<at::Tensor>& add, bool residual, const std::optional<at::Tensor>& ln_weight,
                const std::optional<at::Tensor>& ln_bias, double ln_eps, int64_t offset, int64_t rows,
                int64_t tile_pixels, bool bf16) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "msgm: x must be a float32 (B, N, W, C) CPU map");
  const bool normalize = ln_weight.has_value();
  TORCH_CHECK(normalize == ln_bias.has_value(), "msgm: give both LayerNorm weight and bias, or neither");
  const at::Tensor input = x.contiguous();
  const int64_t batch = input.size(0), n = input.size(1), width = input.size(2), c = input.size(3);
  const int64_t hidden = w1.size(0), mid = w2.size(0), c_out = wo.size(0), k = wd.size(-1), p = k / 2;
  TORCH_CHECK(w1.size(1) == c && w2.size(1) == c && w3.size(0) == hidden && w3.size(1) == mid &&
              wo.size(1) == hidden && wd.size(0) == mid && wd.size(1) == 1 && wd.size(2) == k,
              "msgm: weight shapes do not fit a ", c, "-channel input");
  TORCH_CHECK(hidden % 16 == 0 && mid % 16 == 0 && c_out % 16 == 0 && (!normalize || c % 16 == 0),
              "msgm: widths must be multiples of 16");
  TORCH_CHECK(!normalize || (ln_weight->numel() == c && ln_bias->numel() == c), "msgm: LayerNorm parameters must have ",
              c, " elements");
  const RowKernel depthwise = row_kernel(k);
  const RowKernelBf16 depthwise_bf16 = bf16 ? row_kernel_bf16(k) : nullptr;
  TORCH_CHECK(depthwise != nullptr, "msgm: kernel size must be 1, 3, 5 or 7, got ", k);
  TORCH_CHECK(p < n && p < width, "msgm: a ", n, "x", width, " map is too small to reflect-pad by ", p);
  TORCH_CHECK(offset >= 0 && rows >= 1 && offset + rows <= n, "msgm: rows ", offset, "..", offset + rows,
              " outside the ", n, " input rows");
  TORCH_CHECK(!residual || c_out == c, "msgm: a residual needs as many output as input channels");
  TORCH_CHECK(!bf16 || bf16_supported(), "msgm: bfloat16 products need a CPU with AVX512_BF16");
  TORCH_CHECK(!bf16 || c % 16 == 0, "msgm: bfloat16 products need a multiple of 16 input channels");
  at::Tensor addend;
  if (add) {
    TORCH_CHECK(add->sizes() == at::IntArrayRef({batch, rows, width, c_out}) && add->scalar_type() == at::kFloat,
                "msgm: add must be a float32 (B, rows, W, C_out) map, got ", add->sizes());
    addend = add->contiguous();
  }
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor w1t = f32(w1.t()), w2t = f32(w2.t()), w3t = f32(w3.t()), wot = f32(wo.t());
  const at::Tensor taps = f32(wd.reshape({mid, k * k}).t()), bias1 = f32(b1), bias2 = f32(b2), bias_d = f32(bd);
  const at::Tensor bias3 = f32(b3), bias_o = bo ? f32(*bo) : at::zeros({c_out}, input.options());
  const at::Tensor norm_w = normalize ? f32(*ln_weight) : at::Tensor(), norm_b = normalize ? f32(*ln_bias) : at::Tensor();
  const float eps = static_cast<float>(ln_eps);
  // Operands of the bfloat16 products: the weights packed once, the activations rounded once per tile.
  const at::Tensor w1p = bf16 ? pack_bf16(w1) : at::Tensor(), w2p = bf16 ? pack_bf16(w2) : at::Tensor();
  const at::Tensor w3p = bf16 ? pack_bf16(w3) : at::Tensor(), wop = bf16 ? pack_bf16(wo) : at::Tensor();
  const auto weight = [bf16](const at::Tensor& f32, const at::Tensor& packed) {
    return Weight{f32.data_ptr<float>(), bf16 ? bf16_data(packed) : nullptr};
  };
  const Weight weight1 = weight(w1t, w1p), weight2 = weight(w2t, w2p), weight3 = weight(w3t, w3p);
  const Weight weight_o = weight(wot, wop);
  at::Tensor out = at::empty({batch, rows, width, c_out}, input.options());

  const int64_t tile_rows = std::max<int64_t>(1, std::min(rows, tile_pixels / width));
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const float* in = input.data_ptr<float>();
  const float* add_data = add ? addend.data_ptr<float>() : nullptr;
  float* out_data = out.data_ptr<float>();
  // bfloat16 products read only rounded inputs: without a residual the LayerNorm goes row by row straight to them.
  const bool rounded_norm_only = normalize && bf16 && !residual;
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    // float32 maps, and the bfloat16 ones that replace them in bfloat16 products: the input rows, the value rows
    // W_2 x + b_2 (bfloat16 path: the depthwise convolution reads them rounded), DW and the gated product.
    std::vector<float> value(bf16 ? 0 : (tile_rows + 2 * p) * width * mid), gate(tile_rows * width * hidden),
        dw(bf16 ? 0 : tile_rows * width * mid), expanded(mid == hidden || bf16 ? 0 : tile_rows * width * hidden),
        normed(normalize && !rounded_norm_only ? (tile_rows + 2 * p) * width * c : 0),
        norm_row(rounded_norm_only ? width * c : 0);
    std::vector<uint16_t> x_bf16(bf16 ? (tile_rows + 2 * p) * width * c : 0),
        value_bf16(bf16 ? (tile_rows + 2 * p) * width * mid : 0), dw_bf16(bf16 ? tile_rows * width * mid : 0),
        expanded_bf16(bf16 ? tile_rows * width * hidden : 0);
    uint16_t* const xb = bf16 ? x_bf16.data() : nullptr;
    uint16_t* const vb = value_bf16.data();
    uint16_t* const dwb = dw_bf16.data();
    uint16_t* const eb = bf16 ? expanded_bf16.data() : nullptr;
    // W_3 (DW) + b_3 goes over DW where the widths agree: each block of rows is read before it is stored.
    float* const expand_out = mid == hidden ? dw.data() : expanded.data();
    std::array<const float*, kMaxKernel> src{};
    std::array<const uint16_t*, kMaxKernel> src_bf16{};
    // Input rows whose values `value` holds, and from which row on `normed` and `x_bf16` hold them prepared.
    int64_t held_image = -1, held_lo = 0, held_hi = 0, held_first = 0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / tiles;
      const int64_t r0 = offset + (t % tiles) * tile_rows, r1 = std::min(r0 + tile_rows, offset + rows);
      const int64_t m = (r1 - r0) * width;
      const float* xi = in + image * n * width * c;
      // Value rows the tile reads; reflected rows beyond the input are rows it holds.
      const int64_t lo = std::max<int64_t>(r0 - p, 0), hi = std::min(r1 + p, n);
      const bool held = held_image == image && held_lo <= lo && lo < held_hi;
      const int64_t start = held ? held_hi : lo;  // first row without a value
      if (held) {
        const int64_t from = (lo - held_lo) * width * mid, count = (held_hi - lo) * width * mid;
        if (bf16) {
          std::memmove(vb, vb + from, count * sizeof(uint16_t));
        } else {
          std::memmove(value.data(), value.data() + from, count * sizeof(float));
        }
      }
      // The input rows [first, hi) that the products read, normalized into `normed` if asked for and rounded
      // into `x_bf16` for bfloat16 products, all indexed from row lo; the rows the last tile prepared move.
      const int64_t first = std::min(start, r0);
      int64_t ready = first;
      if (held && held_first <= first) {
        const int64_t from = (first - held_lo) * width * c, to = (first - lo) * width * c;
        const int64_t count = (held_hi - first) * width * c;
        if (!normed.empty()) std::memmove(normed.data() + to, normed.data() + from, count * sizeof(float));
        if (xb) std::memmove(xb + to, xb + from, count * sizeof(uint16_t));
        ready = held_hi;
      }
      // float32 input rows from lo on (unread where the products take bfloat16 and there is no residual)
      const float* x_lo = normed.empty() ? xi + lo * width * c : normed.data();
      if (rounded_norm_only) {
        for (int64_t row = ready; row < hi; ++row) {
          layer_norm_rows(xi + row * width * c, width, c, norm_w.data_ptr<float>(), norm_b.data_ptr<float>(), eps,
                          norm_row.data());
          round_bf16(norm_row.data(), width * c, xb + (row - lo) * width * c);
        }
      } else {
        if (normalize && ready < hi) {
          layer_norm_rows(xi + ready * width * c, (hi - ready) * width, c, norm_w.data_ptr<float>(),
                          norm_b.data_ptr<float>(), eps, normed.data() + (ready - lo) * width * c);
        }
        if (xb && ready < hi) {
          round_bf16(x_lo + (ready - lo) * width * c, (hi - ready) * width * c, xb + (ready - lo) * width * c);
        }
      }
      if (start < hi && bf16) {
        rounded_product_bf16((hi - start) * width, c, mid, xb + (start - lo) * width * c, weight2,
                             bias2.data_ptr<float>(), vb + (start - lo) * width * mid);
      } else if (start < hi) {
        product<Epilogue::kBias>((hi - start) * width, c, mid, x_lo + (start - lo) * width * c, nullptr, c, weight2,
                                 bias2.data_ptr<float>(), nullptr, nullptr, 0,
                                 value.data() + (start - lo) * width * mid, mid);
      }
      held_image = image, held_lo = lo, held_hi = hi, held_first = first;
      for (int64_t r = r0; r < r1; ++r) {
        if (bf16) {
          for (int64_t ky = 0; ky < k; ++ky) src_bf16[ky] = vb + (reflect(r + ky - p, n) - lo) * width * mid;
          depthwise_bf16(src_bf16.data(), width, mid, taps.data_ptr<float>(), bias_d.data_ptr<float>(),
                         dwb + (r - r0) * width * mid);
        } else {
          for (int64_t ky = 0; ky < k; ++ky) src[ky] = value.data() + (reflect(r + ky - p, n) - lo) * width * mid;
          depthwise(src.data(), width, mid, taps.data_ptr<float>(), bias_d.data_ptr<float>(),
                    dw.data() + (r - r0) * width * mid);
        }
      }
      const float* x_rows = x_lo + (r0 - lo) * width * c;
      product<Epilogue::kBias>(m, c, hidden, x_rows, xb ? xb + (r0 - lo) * width * c : nullptr, c, weight1,
                               bias1.data_ptr<float>(), nullptr, nullptr, 0, gate.data(), hidden);
      if (bf16) {  // the gated product straight to bfloat16, GELU in its epilogue
        gated_product_bf16(m, mid, hidden, dwb, weight3, bias3.data_ptr<float>(), gate.data(), eb);
      } else {
        gelu_inplace(gate.data(), m * hidden);
        product<Epilogue::kMul>(m, mid, hidden, dw.data(), nullptr, mid, weight3, bias3.data_ptr<float>(),
                                gate.data(), nullptr, hidden, expand_out, hidden);
      }
      float* o = out_data + ((image * rows) + (r0 - offset)) * width * c_out;
      const float* a = add ? add_data + ((image * rows) + (r0 - offset)) * width * c_out : nullptr;
      const float* res = residual ? x_rows : nullptr;
      if (a || res) {
        product<Epilogue::kAdd>(m, hidden, c_out, expand_out, eb, hidden, weight_o, bias_o.data_ptr<float>(),
                                a ? a : res, a ? res : nullptr, c_out, o, c_out);
      } else {
        product<Epilogue::kBias>(m, hidden, c_out, expand_out, eb, hidden, weight_o, bias_o.data_ptr<float>(), nullptr,
                                 nullptr, 0, o, c_out);
      }
    }
  });
  return out;
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

// Gradients of a K x K reflect-padded depthwise convolution of one image, channels [c0, c1) (blocks of 16), from
// the output's gradient g (n, width, c). Each input pixel gathers the output gradients its taps reach without
// padding (no read-modify-write of dx); then the taps that the reflection sent back into the map add their part at
// the border. Rows go in tiles of 16 pixels, and each tile passes every channel block before the next tile: the
// K input and K gradient rows of a tile then stay in L1 and every cache line read is used whole (walking a whole
// row per channel block used a quarter of each line and ran several times slower). The taps' and bias's gradients
// accumulate in registers over a tile (dtaps: (K * K, c), dbias: (c), both summed into). cols: the reflected
// column of each (output column, kx).
template <int64_t K>
SSIU_TARGETS void depthwise_backward_channels(const float* x, const float* g, int64_t n, int64_t width, int64_t c,
                                              int64_t c0, int64_t c1, const float* taps, const int64_t* cols,
                                              float* dx, float* dtaps, float* dbias) {
  constexpr int64_t p = K / 2, kTile = 16;
  const int64_t row = width * c;
  for (int64_t y = 0; y < n; ++y) {
    const float* src[K];   // input rows the taps of output row y read (reflected)
    const float* grad[K];  // output rows whose taps reach input row y (nullptr: outside the map)
    for (int64_t k = 0; k < K; ++k) {
      src[k] = x + reflect(y + k - p, n) * row;
      const int64_t yo = y - k + p;
      grad[k] = yo >= 0 && yo < n ? g + yo * row : nullptr;
    }
    for (int64_t x0 = 0; x0 < width; x0 += kTile) {
      const int64_t x1 = std::min(width, x0 + kTile);
      for (int64_t ch = c0; ch < c1; ch += 16) {
        Vec16 w[K * K], dw[K * K], db = load16(dbias + ch);
        for (int64_t t = 0; t < K * K; ++t) w[t] = load16(taps + t * c + ch), dw[t] = load16(dtaps + t * c + ch);
        for (int64_t xi = x0; xi < x1; ++xi) {
          const Vec16 gv = load16(g + y * row + xi * c + ch);
          db += gv;
          Vec16 acc{};
          if (xi >= p && xi + p < width) {
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t kx = 0; kx < K; ++kx) dw[k * K + kx] += gv * load16(src[k] + (xi - p + kx) * c + ch);
              if (grad[k] == nullptr) continue;
              for (int64_t kx = 0; kx < K; ++kx) acc += w[k * K + kx] * load16(grad[k] + (xi + p - kx) * c + ch);
            }
          } else {
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t kx = 0; kx < K; ++kx) {
                dw[k * K + kx] += gv * load16(src[k] + cols[xi * K + kx] * c + ch);
                const int64_t xo = xi + p - kx;
                if (grad[k] != nullptr && xo >= 0 && xo < width) acc += w[k * K + kx] * load16(grad[k] + xo * c + ch);
              }
            }
          }
          store16(dx + y * row + xi * c + ch, acc);
        }
        for (int64_t t = 0; t < K * K; ++t) store16(dtaps + t * c + ch, dw[t]);
        store16(dbias + ch, db);
      }
    }
  }
  for (int64_t yo = 0; yo < n; ++yo) {  // the border's reflected taps
    const bool edge_row = yo < p || yo + p >= n;
    for (int64_t xo = 0; xo < width; ++xo) {
      if (!edge_row && xo >= p && xo + p < width) {
        xo = width - p - 1;  // skip to the right border
        continue;
      }
      for (int64_t ch = c0; ch < c1; ch += 16) {
        const Vec16 gv = load16(g + yo * row + xo * c + ch);
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t ys = yo + ky - p;
          for (int64_t kx = 0; kx < K; ++kx) {
            const int64_t xs = xo + kx - p;
            if (ys >= 0 && ys < n && xs >= 0 && xs < width) continue;
            float* d = dx + reflect(ys, n) * row + reflect(xs, width) * c + ch;
            store16(d, load16(d) + load16(taps + (ky * K + kx) * c + ch) * gv);
          }
        }
      }
    }
  }
}

using DepthwiseBackward = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   const float*, const int64_t*, float*, float*, float*);

DepthwiseBackward depthwise_backward_kernel(int64_t k) {
  switch (k) {
    case 1: return depthwise_backward_channels<1>;
    case 3: return depthwise_backward_channels<3>;
    case 5: return depthwise_backward_channels<5>;
    case 7: return depthwise_backward_channels<7>;
    default: return nullptr;
  }
}

// Gradients of depthwise_reflect over whole maps (offset 0, all rows) with respect to x (B, N, W, C), the weight
// (C, 1, k, k) and the bias (C), from the output's gradient (B, N, W, C); C a multiple of 16.
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_reflect_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                          const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(3) % 16 == 0,
              "depthwise_reflect_backward: x must be a float32 (B, N, W, C) CPU map, C a multiple of 16");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat,
              "depthwise_reflect_backward: grad must be float32 and shaped as x");
  const at::Tensor input = x.contiguous(), g = grad.contiguous();
  const int64_t batch = input.size(0), n = input.size(1), width = input.size(2), c = input.size(3);
  const int64_t k = weight.size(-1), p = k / 2;
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == k,
              "depthwise_reflect_backward: weight must be (C, 1, k, k) for C = ", c, " channels, got ",
              weight.sizes());
  const DepthwiseBackward kernel = depthwise_backward_kernel(k);
  TORCH_CHECK(kernel != nullptr, "depthwise_reflect_backward: kernel size must be 1, 3, 5 or 7, got ", k);
  TORCH_CHECK(p < n && p < width, "depthwise_reflect_backward: a ", n, "x", width,
              " map is too small to reflect-pad by ", p);
  const at::Tensor taps = weight.reshape({c, k * k}).t().contiguous().to(at::kFloat);
  std::vector<int64_t> cols(width * k);
  for (int64_t xo = 0; xo < width; ++xo) {
    for (int64_t kx = 0; kx < k; ++kx) cols[xo * k + kx] = reflect(xo + kx - p, width);
  }
  at::Tensor dx = at::empty_like(input);
  at::Tensor dtaps = at::zeros({batch, k * k, c}, input.options()), dbias = at::zeros({batch, c}, input.options());
  const float* x_data = input.data_ptr<float>();
  const float* g_data = g.data_ptr<float>();
  const float* tap_data = taps.data_ptr<float>();
  float* dx_data = dx.data_ptr<float>();
  float* dtap_data = dtaps.data_ptr<float>();
  float* dbias_data = dbias.data_ptr<float>();
  // One task per image, or per (image, run of channel blocks) where there are fewer images than threads; tasks
  // write disjoint channels of an image.
  const int64_t image = n * width * c, blocks = c / 16;
  const int64_t groups = std::min(blocks, std::max<int64_t>(1, (at::get_num_threads() + batch - 1) / batch));
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / groups, group = index % groups;
      const int64_t c0 = blocks * group / groups * 16, c1 = blocks * (group + 1) / groups * 16;
      kernel(x_data + b * image, g_data + b * image, n, width, c, c0, c1, tap_data, cols.data(),
             dx_data + b * image, dtap_data + b * k * k * c, dbias_data + b * c);
    }
  });
  return {dx, dtaps.sum(0).t().reshape({c, 1, k, k}), dbias.sum(0)};
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


// x @ weight.T + bias, then GELU (gelu) or plus `add`, on a channels-last float32 map (..., C_in) with bfloat16
// operands and float32 accumulators and output (bf16_supported CPUs only): the engine's 1x1 convolutions in its
// bfloat16 path. weight is (C_out, C_in); C_in and C_out multiples of 16.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& add, bool gelu) {
  TORCH_CHECK(bf16_supported(), "linear_bf16: needs a CPU with AVX512_BF16");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear_bf16: x must be a float32 CPU map with channels last");
  const at::Tensor input = x.contiguous();
  const int64_t k = input.size(-1), n = weight.size(0), pixels = input.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k && k % 16 == 0 && n % 16 == 0,
              "linear_bf16: weight must be (C_out, ", k, ") with both widths multiples of 16, got ", weight.sizes());
  TORCH_CHECK(!(gelu && add), "linear_bf16: GELU or an addend, not both");
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = n;
  at::Tensor addend;
  if (add) {
    TORCH_CHECK(add->sizes() == at::IntArrayRef(shape) && add->scalar_type() == at::kFloat,
                "linear_bf16: add must be a float32 map shaped like the output");
    addend = add->contiguous();
  }
  const at::Tensor packed = pack_bf16(weight);
  const at::Tensor shift = bias ? bias->to(at::kFloat).contiguous() : at::zeros({n}, input.options());
  at::Tensor out = at::empty(shape, input.options());
  const Weight w{nullptr, bf16_data(packed)};
  const float* in = input.data_ptr<float>();
  const float* b = shift.data_ptr<float>();
  const float* a = add ? addend.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  constexpr int64_t chunk = 240;  // pixels per block: a multiple of the kernel's 6 rows
  at::parallel_for(0, (pixels + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> xb(chunk * k);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t p0 = block * chunk, m = std::min(chunk, pixels - p0);
      round_bf16(in + p0 * k, m * k, xb.data());
      if (a) {
        product<Epilogue::kAdd>(m, k, n, nullptr, xb.data(), k, w, b, a + p0 * n, nullptr, n, o + p0 * n, n);
      } else {
        product<Epilogue::kBias>(m, k, n, nullptr, xb.data(), k, w, b, nullptr, nullptr, 0, o + p0 * n, n);
        if (gelu) gelu_for_bf16(o + p0 * n, m * n, nullptr);
      }
    }
  });
  return out;
}

// GELU(x @ w1.T + b1) with its rows of C_1 values split into rows of w2's C_2 inputs, times w2.T: a 1x1
// convolution with GELU followed by a second one on its channels taken C_2 at a time (the tail's last stage and
// its tap product, before pixel shuffle), from bfloat16 operands with float32 accumulators, GELU and output, the
// intermediate map held in cache-sized blocks only. x (..., C_in) channels-last float32, w1 (C_1, C_in), w2
// (N, C_2), C_1 a multiple of C_2, every width a multiple of 16. Returns (pixels C_1 / C_2, N).
at::Tensor gelu_product_bf16(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2) {
  TORCH_CHECK(bf16_supported(), "gelu_product_bf16: needs a CPU with AVX512_BF16");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "gelu_product_bf16: x must be a float32 CPU map with channels last");
  const at::Tensor input = x.contiguous();
  const int64_t k = input.size(-1), pixels = input.numel() / std::max<int64_t>(k, 1);
  const int64_t c1 = w1.size(0), c2 = w2.size(1), n = w2.size(0);
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2 && w1.size(1) == k && b1.numel() == c1 && k % 16 == 0 &&
              c1 % 16 == 0 && c2 % 16 == 0 && c1 % c2 == 0 && n % 16 == 0,
              "gelu_product_bf16: weights ", w1.sizes(), " and ", w2.sizes(), " do not fit ", k,
              " input channels with widths multiples of 16");
  const int64_t split = c1 / c2;
  const at::Tensor p1 = pack_bf16(w1), p2 = pack_bf16(w2);
  const at::Tensor bias1 = b1.to(at::kFloat).contiguous(), zero = at::zeros({n}, input.options());
  at::Tensor out = at::empty({pixels * split, n}, input.options());
  const Weight first{nullptr, bf16_data(p1)}, second{nullptr, bf16_data(p2)};
  const float* in = input.data_ptr<float>();
  float* o = out.data_ptr<float>();
  constexpr int64_t chunk = 60;  // pixels per block: a multiple of the kernel's 6 rows
  at::parallel_for(0, (pixels + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> xb(chunk * k), hb(chunk * c1);
    std::vector<float> h(chunk * c1);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t p0 = block * chunk, m = std::min(chunk, pixels - p0);
      round_bf16(in + p0 * k, m * k, xb.data());
      product<Epilogue::kBias>(m, k, c1, nullptr, xb.data(), k, first, bias1.data_ptr<float>(), nullptr, nullptr, 0,
                               h.data(), c1);
      gelu_for_bf16(h.data(), m * c1, hb.data());
      product<Epilogue::kBias>(m * split, c2, n, nullptr, hb.data(), c2, second, zero.data_ptr<float>(), nullptr,
                               nullptr, 0, o + p0 * split * n, n);
    }
  });
  return out;
}

constexpr int64_t kMaxExperts = 8;

// moe_combine on pixels [begin, end): see there.
SSIU_TARGETS void moe_pixels(const float* const* logits, const float* const* experts, const float* residual,
                             int64_t n, int64_t c, int64_t begin, int64_t end, float* out, float* skip,
                             float* gates) {
  for (int64_t px = begin; px < end; ++px) {
    const int64_t at = px * c;
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) {
      Vec16 g[kMaxExperts];
      Vec16 top = load16(logits[0] + at + ch);
      for (int64_t i = 1; i < n; ++i) top = max16(top, load16(logits[i] + at + ch));
      Vec16 total{};
      for (int64_t i = 0; i < n; ++i) {
        g[i] = exp16(load16(logits[i] + at + ch) - top);
        total += g[i];
      }
      Vec16 sum{};
      for (int64_t i = 0; i < n; ++i) {
        g[i] /= total;
        sum += g[i] * load16(experts[i] + at + ch);
        if (gates) store16(gates + (px * n + i) * c + ch, g[i]);
      }
      store16(out + at + ch, sum);
      store16(skip + at + ch, residual ? sum + load16(residual + at + ch) : sum);
    }
    for (; ch < c; ++ch) {
      float g[kMaxExperts];
      float top = logits[0][at + ch];
      for (int64_t i = 1; i < n; ++i) top = std::max(top, logits[i][at + ch]);
      float total = 0.f;
      for (int64_t i = 0; i < n; ++i) total += (g[i] = std::exp(logits[i][at + ch] - top));
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        g[i] /= total;
        sum += g[i] * experts[i][at + ch];
        if (gates) gates[(px * n + i) * c + ch] = g[i];
      }
      out[at + ch] = sum;
      skip[at + ch] = residual ? sum + residual[at + ch] : sum;
    }
  }
}

constexpr int64_t kGroup = 4;  // queries computed together, sharing every key and value they load

// Scaled scores of a group of queries against NV vectors of 16 keys: scores[g * padded + j] = scale q_g . k_j.
// keys_t is (dim, padded); the group's accumulators stay in registers.
template <int64_t NV>
SSIU_TARGETS void group_scores(const float* const* q, const float* keys_t, int64_t padded, int64_t dim, float scale,
                               float* scores) {
  if constexpr (NV > 4) {  // in two passes: kGroup x 4 accumulators and 4 key vectors fit the registers, x NV spill
    group_scores<4>(q, keys_t, padded, dim, scale, scores);
    group_scores<NV - 4>(q, keys_t + 64, padded, dim, scale, scores + 64);
    return;
  }
  Vec16 acc[kGroup][NV];
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t jv = 0; jv < NV; ++jv) acc[g][jv] = Vec16{};
  }
  for (int64_t d = 0; d < dim; ++d) {
    Vec16 keys[NV];
    for (int64_t jv = 0; jv < NV; ++jv) keys[jv] = load16(keys_t + d * padded + jv * 16);
    for (int64_t g = 0; g < kGroup; ++g) {
      const float qd = q[g][d];
      for (int64_t jv = 0; jv < NV; ++jv) acc[g][jv] += qd * keys[jv];
    }
  }
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t jv = 0; jv < NV; ++jv) store16(scores + g * padded + jv * 16, acc[g][jv] * scale);
  }
}

// The same for any number of key vectors, eight at a time.
SSIU_TARGETS void group_scores_any(const float* const* q, const float* keys_t, int64_t padded, int64_t dim,
                                   float scale, float* scores) {
  for (int64_t j0 = 0; j0 < padded; j0 += 8 * 16) {
    const int64_t nv = std::min<int64_t>(8, (padded - j0) / 16);
    Vec16 acc[kGroup][8] = {};
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t g = 0; g < kGroup; ++g) {
        const float qd = q[g][d];
        for (int64_t jv = 0; jv < nv; ++jv) acc[g][jv] += qd * load16(keys_t + d * padded + j0 + jv * 16);
      }
    }
    for (int64_t g = 0; g < kGroup; ++g) {
      for (int64_t jv = 0; jv < nv; ++jv) store16(scores + g * padded + j0 + jv * 16, acc[g][jv] * scale);
    }
  }
}

using ScoreKernel = void (*)(const float* const*, const float*, int64_t, int64_t, float, float*);

ScoreKernel score_kernel(int64_t vectors) {
  switch (vectors) {
    case 1: return group_scores<1>;
    case 2: return group_scores<2>;
    case 3: return group_scores<3>;
    case 4: return group_scores<4>;
    case 5: return group_scores<5>;
    case 6: return group_scores<6>;
    case 7: return group_scores<7>;
    default: return group_scores_any;
  }
}

// Softmax of a row of `padded` scores in place, its last vector first offset by `tail` (0 on keys, -3e38 on the
// padding past the last key); returns 1 / sum of exps.
SSIU_TARGETS float softmax_row(float* scores, int64_t padded, const float* tail) {
  float* last = scores + padded - 16;
  store16(last, load16(last) + load16(tail));
  Vec16 best = load16(scores);
  for (int64_t j = 16; j < padded; j += 16) best = max16(best, load16(scores + j));
  const float top = lanes_max(best);
  Vec16 total{};
  for (int64_t j = 0; j < padded; j += 16) {
    const Vec16 e = exp16(load16(scores + j) - top);
    store16(scores + j, e);
    total += e;
  }
  return 1.f / lanes_sum(total);
}

// out_g = inv_g * sum_j p_g[j] v_j for a group of queries; values is (n_keys, dim), p rows of `padded`.
SSIU_TARGETS void group_weighted_sum(const float* p, const float* inv, const float* values, int64_t n_keys,
                                     int64_t padded, int64_t dim, float* const* out) {
  int64_t d0 = 0;
  for (; d0 + 16 <= dim; d0 += 16) {
    Vec16 acc[kGroup] = {};
    for (int64_t j = 0; j < n_keys; ++j) {
      const Vec16 v = load16(values + j * dim + d0);
      for (int64_t g = 0; g < kGroup; ++g) acc[g] += p[g * padded + j] * v;
    }
    for (int64_t g = 0; g < kGroup; ++g) store16(out[g] + d0, acc[g] * inv[g]);
  }
  for (; d0 < dim; ++d0) {
    for (int64_t g = 0; g < kGroup; ++g) {
      float weighted = 0.f;
      for (int64_t j = 0; j < n_keys; ++j) weighted += p[g * padded + j] * values[j * dim + d0];
      out[g][d0] = weighted * inv[g];
    }
  }
}

// rows[r][c] -> rows[c][r] for 16 rows of 16 lanes, in four rounds, each of which swaps one bit of the row index
// with that bit of the lane index (two-source shuffles of row pairs), where scalar stores take 256.
inline __attribute__((always_inline)) void transpose16(Vec16* rows) {
  static constexpr Int16 kLow[4] = {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                                    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
  static constexpr Int16 kHigh[4] = {{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
                                     {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                                     {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                                     {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
  for (int b = 0; b < 4; ++b) {
    const int m = 1 << b;
    for (int r = 0; r < 16; ++r) {
      if (r & m) continue;
      const Vec16 lo = rows[r], hi = rows[r | m];
      rows[r] = __builtin_shuffle(lo, hi, kLow[b]);
      rows[r | m] = __builtin_shuffle(lo, hi, kHigh[b]);
    }
  }
}

// One head's keys (plus the embedding) or values of the window around block (by, bx), transposed: out (dim, padded)
// with out[d][j] for window pixel j, zero outside the map and for j >= window^2; `rows` (window^2, dim) gets them
// untransposed if given. `channel` is the head's first channel within a qkv pixel: C + head dim for keys, 2 C + head
// dim for values; `embedding` may be null.
SSIU_TARGETS void window_transposed(const float* qkv, const float* embedding, int64_t h, int64_t w, int64_t c,
                                    int64_t dim, int64_t channel, int64_t block, int64_t halo, int64_t by,
                                    int64_t bx, float* out, float* rows) {
  const int64_t window = block + 2 * halo, n_keys = window * window, padded = (n_keys + 15) / 16 * 16;
  for (int64_t j0 = 0; j0 < padded; j0 += 16) {
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
      Vec16 tile[16];
      for (int64_t jj = 0; jj < 16; ++jj) {
        const int64_t j = j0 + jj, y = by * block - halo + j / window, x = bx * block - halo + j % window;
        Vec16 v{};
        if (j < n_keys) {
          if (y >= 0 && y < h && x >= 0 && x < w) v = load16(qkv + (y * w + x) * 3 * c + channel + d0);
          if (embedding) v += load16(embedding + j * dim + d0);
          if (rows) store16(rows + j * dim + d0, v);
        }
        tile[jj] = v;
      }
      transpose16(tile);
      for (int64_t dd = 0; dd < 16; ++dd) store16(out + (d0 + dd) * padded + j0, tile[dd]);
    }
  }
}

// Halo block attention of ESAM on its qkv map, for one (image, block row, block column).
//   qkv: (h, w, 3 C) with queries, keys, values in channel thirds, each split into `heads` heads of `dim`;
//   embedding: (window, window, dim) added to every key window; keys and values outside the map are zero.
//   The block x block tile of queries attends to the (block + 2 halo)^2 window around it (softmax of scores
//   scaled by 1 / sqrt(dim), SDPA's default); out: (h, w, C). Scratch: keys_t (dim, padded), values
//   (window^2, dim), scores (kGroup, padded), with padded = window^2 rounded up to 16.
void attend_block(const float* qkv, const float* embedding, int64_t h, int64_t w, int64_t c, int64_t heads,
                  int64_t block, int64_t halo, int64_t by, int64_t bx, float* keys_t, float* values, float* scores,
                  float* out) {
  const int64_t dim = c / heads, window = block + 2 * halo, n_keys = window * window;
  const int64_t padded = (n_keys + 15) / 16 * 16, queries = block * block;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const ScoreKernel score = score_kernel(padded / 16);
  float tail[16] = {};  // passed by address: a vector argument's ABI differs between the target clones
  for (int64_t lane = n_keys - (padded - 16); lane < 16; ++lane) tail[lane] = -3.0e38f;
  for (int64_t head = 0; head < heads; ++head) {
    for (int64_t u = 0; u < window; ++u) {
      const int64_t y = by * block - halo + u;
      for (int64_t t = 0; t < window; ++t) {
        const int64_t x = bx * block - halo + t, j = u * window + t;
        const bool inside = y >= 0 && y < h && x >= 0 && x < w;
        const float* key = qkv + (y * w + x) * 3 * c + c + head * dim;
        const float* emb = embedding + j * dim;
        for (int64_t d = 0; d < dim; ++d) {
          keys_t[d * padded + j] = (inside ? key[d] : 0.f) + emb[d];
          values[j * dim + d] = inside ? key[c + d] : 0.f;
        }
      }
    }
    for (int64_t d = 0; d < dim; ++d) std::fill(keys_t + d * padded + n_keys, keys_t + (d + 1) * padded, 0.f);
    for (int64_t i0 = 0; i0 < queries; i0 += kGroup) {
      const float* q[kGroup];
      float* o[kGroup];
      float inv[kGroup];
      for (int64_t g = 0; g < kGroup; ++g) {
        const int64_t i = std::min(i0 + g, queries - 1);  // a short last group repeats its last query
        const int64_t pixel = (by * block + i / block) * w + bx * block + i % block;
        q[g] = qkv + pixel * 3 * c + head * dim;
        o[g] = out + pixel * c + head * dim;
      }
      score(q, keys_t, padded, dim, scale, scores);
      for (int64_t g = 0; g < kGroup; ++g) inv[g] = softmax_row(scores + g * padded, padded, tail);
      group_weighted_sum(scores, inv, values, n_keys, padded, dim, o);
    }
  }
}

// ESAM's halo block attention (see attend_block) over a (B, h, w, 3 C) qkv map; h and w multiples of block.
#if SSIU_HAVE_BF16

// group_scores with bfloat16 operands: keys_p holds (dim / 2, padded, 2) pairs of key channels, qb the group's
// queries rounded to bfloat16 (dim each, dim even); float32 accumulators and scores.
template <int64_t NV>
SSIU_BF16_TARGET void group_scores_bf16(const uint16_t* qb, const uint16_t* keys_p, int64_t padded, int64_t dim,
                                        float scale, float* scores) {
  __m512 acc[kGroup][NV];
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t jv = 0; jv < NV; ++jv) acc[g][jv] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < dim; d += 2) {
    __m512bh keys[NV];
    for (int64_t jv = 0; jv < NV; ++jv) keys[jv] = (__m512bh)_mm512_loadu_si512(keys_p + d * padded + jv * 32);
    for (int64_t g = 0; g < kGroup; ++g) {
      int32_t pair;
      std::memcpy(&pair, qb + g * dim + d, sizeof pair);
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
      for (int64_t jv = 0; jv < NV; ++jv) acc[g][jv] = _mm512_dpbf16_ps(acc[g][jv], qv, keys[jv]);
    }
  }
  for (int64_t g = 0; g < kGroup; ++g) {
    for (int64_t jv = 0; jv < NV; ++jv) {
      _mm512_storeu_ps(scores + g * padded + jv * 16, _mm512_mul_ps(acc[g][jv], _mm512_set1_ps(scale)));
    }
  }
}

using ScoreKernelBf16 = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, float, float*);

ScoreKernelBf16 score_kernel_bf16(int64_t vectors) {
  switch (vectors) {
    case 1: return group_scores_bf16<1>;
    case 2: return group_scores_bf16<2>;
    case 3: return group_scores_bf16<3>;
    case 4: return group_scores_bf16<4>;
    case 5: return group_scores_bf16<5>;
    case 6: return group_scores_bf16<6>;
    case 7: return group_scores_bf16<7>;
    case 8: return group_scores_bf16<8>;
    default: return nullptr;
  }
}

// attend_block with bfloat16 operands in its two products (scores, and the exps times the values), float32
// accumulators, softmax and output; for dim a multiple of 16 and at most 128 keys (attention_bf16_fits).
// Scratch: keys_p (dim / 2, padded, 2) and values_p (padded / 2, dim, 2) bfloat16 pairs, scores (kGroup, padded),
// probs (kGroup, padded) bfloat16, qb (kGroup, dim) bfloat16.
SSIU_BF16_TARGET void attend_block_bf16(const float* qkv, const float* embedding, int64_t h, int64_t w, int64_t c,
                                        int64_t heads, int64_t block, int64_t halo, int64_t by, int64_t bx,
                                        uint16_t* keys_p, uint16_t* values_p, float* scores, uint16_t* probs,
                                        uint16_t* qb, float* out) {
  const int64_t dim = c / heads, window = block + 2 * halo, n_keys = window * window;
  const int64_t padded = (n_keys + 15) / 16 * 16, queries = block * block;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const ScoreKernelBf16 score = score_kernel_bf16(padded / 16);
  float tail[16] = {};
  for (int64_t lane = n_keys - (padded - 16); lane < 16; ++lane) tail[lane] = -3.0e38f;
  std::fill(values_p + (n_keys + 1) / 2 * 2 * dim, values_p + padded * dim, uint16_t{0});
  // Lane order of a key pair's values: channel e of the first key, then of the second, for e = 0..15.
  alignas(64) int16_t order[32];
  for (int16_t e = 0; e < 16; ++e) order[2 * e] = e, order[2 * e + 1] = static_cast<int16_t>(16 + e);
  const __m512i pair_order = _mm512_load_si512(order);
  for (int64_t head = 0; head < heads; ++head) {
    // The window's pixels in raster order, two at a time: keys go to their pairs of channels one by one, the
    // values of both pixels interleave into one row of pairs.
    for (int64_t j0 = 0; j0 < n_keys; j0 += 2) {
      const float* pixel[2] = {nullptr, nullptr};
      for (int64_t side = 0; side < 2 && j0 + side < n_keys; ++side) {
        const int64_t j = j0 + side, y = by * block - halo + j / window, x = bx * block - halo + j % window;
        if (y >= 0 && y < h && x >= 0 && x < w) pixel[side] = qkv + (y * w + x) * 3 * c + c + head * dim;
      }
      for (int64_t d = 0; d < dim; d += 16) {
        __m256i halves[2];
        for (int64_t side = 0; side < 2; ++side) {
          const int64_t j = j0 + side;
          if (j >= n_keys) {
            halves[side] = _mm256_setzero_si256();
            continue;
          }
          const __m512 key = pixel[side] ? _mm512_loadu_ps(pixel[side] + d) : _mm512_setzero_ps();
          alignas(64) uint16_t k16[16];
          store_bf16(k16, _mm512_add_ps(key, _mm512_loadu_ps(embedding + j * dim + d)));
          for (int64_t e = 0; e < 16; ++e) keys_p[((d + e) / 2 * padded + j) * 2 + e % 2] = k16[e];
          const __m256bh value = _mm512_cvtneps_pbh(pixel[side] ? _mm512_loadu_ps(pixel[side] + c + d)
                                                                : _mm512_setzero_ps());
          std::memcpy(&halves[side], &value, sizeof value);
        }
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(halves[0]), halves[1], 1);
        _mm512_storeu_si512(values_p + (j0 / 2 * dim + d) * 2, _mm512_permutexvar_epi16(pair_order, both));
      }
    }
    for (int64_t d = 0; d < dim; d += 2) {
      std::fill(keys_p + (d / 2 * padded + n_keys) * 2, keys_p + (d / 2 + 1) * padded * 2, uint16_t{0});
    }
    for (int64_t i0 = 0; i0 < queries; i0 += kGroup) {
      float* o[kGroup];
      float inv[kGroup];
      for (int64_t g = 0; g < kGroup; ++g) {
        const int64_t i = std::min(i0 + g, queries - 1);  // a short last group repeats its last query
        const int64_t pixel = (by * block + i / block) * w + bx * block + i % block;
        const float* q = qkv + pixel * 3 * c + head * dim;
        for (int64_t d = 0; d < dim; d += 16) store_bf16(qb + g * dim + d, _mm512_loadu_ps(q + d));
        o[g] = out + pixel * c + head * dim;
      }
      score(qb, keys_p, padded, dim, scale, scores);
      for (int64_t g = 0; g < kGroup; ++g) {
        inv[g] = softmax_row(scores + g * padded, padded, tail);
        for (int64_t j = 0; j < padded; j += 16) {
          store_bf16(probs + g * padded + j, _mm512_loadu_ps(scores + g * padded + j));
        }
      }
      for (int64_t d0 = 0; d0 < dim; d0 += 16) {
        __m512 acc[kGroup];
        for (int64_t g = 0; g < kGroup; ++g) acc[g] = _mm512_setzero_ps();
        for (int64_t j = 0; j < padded; j += 2) {
          const __m512bh v = (__m512bh)_mm512_loadu_si512(values_p + (j / 2 * dim + d0) * 2);
          for (int64_t g = 0; g < kGroup; ++g) {
            int32_t pair;
            std::memcpy(&pair, probs + g * padded + j, sizeof pair);
            acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_set1_epi32(pair), v);
          }
        }
        for (int64_t g = 0; g < kGroup; ++g) _mm512_storeu_ps(o[g] + d0, _mm512_mul_ps(acc[g], _mm512_set1_ps(inv[g])));
      }
    }
  }
}
#endif

// Whether halo_attention's bfloat16 path computes heads of `dim` channels over windows of `n_keys` keys.
bool attention_bf16_fits(int64_t dim, int64_t n_keys) { return dim % 16 == 0 && n_keys <= 128; }

// bf16: both products take bfloat16 operands where the CPU and the shapes allow (attend_block_bf16); the
// softmax, the accumulators and the output stay float32.
at::Tensor halo_attention(const at::Tensor& qkv, const at::Tensor& embedding, int64_t heads, int64_t block,
                          int64_t halo, bool bf16) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.size(3) % 3 == 0,
              "halo_attention: qkv must be a float32 (B, h, w, 3 C) CPU map, got ", qkv.sizes());
  const at::Tensor input = qkv.contiguous();
  const int64_t batch = input.size(0), h = input.size(1), w = input.size(2), c = input.size(3) / 3;
  TORCH_CHECK(heads > 0 && c % heads == 0, "halo_attention: ", c, " channels do not split into ", heads, " heads");
  TORCH_CHECK(block > 0 && halo >= 0 && h % block == 0 && w % block == 0, "halo_attention: a ", h, "x", w,
              " map is not made of ", block, "x", block, " blocks");
  const int64_t dim = c / heads, window = block + 2 * halo;
  TORCH_CHECK(embedding.sizes() == at::IntArrayRef({window, window, dim}), "halo_attention: embedding must be (",
              window, ", ", window, ", ", dim, "), got ", embedding.sizes());
  const at::Tensor emb = embedding.contiguous().to(at::kFloat);
  at::Tensor out = at::empty({batch, h, w, c}, input.options());
  const int64_t nh = h / block, nw = w / block, padded = (window * window + 15) / 16 * 16;
  const float* in_data = input.data_ptr<float>();
  const float* emb_data = emb.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
#if SSIU_HAVE_BF16
  if (bf16 && bf16_supported() && attention_bf16_fits(dim, window * window)) {
    at::parallel_for(0, batch * nh * nw, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint16_t> keys_p(dim * padded), values_p(padded * dim), probs(kGroup * padded), qb(kGroup * dim);
      std::vector<float> scores(kGroup * padded);
      for (int64_t index = begin; index < end; ++index) {
        const int64_t image = index / (nh * nw), by = index % (nh * nw) / nw, bx = index % nw;
        attend_block_bf16(in_data + image * h * w * 3 * c, emb_data, h, w, c, heads, block, halo, by, bx,
                          keys_p.data(), values_p.data(), scores.data(), probs.data(), qb.data(),
                          out_data + image * h * w * c);
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, batch * nh * nw, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys_t(dim * padded), values(window * window * dim), scores(kGroup * padded);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / (nh * nw), by = index % (nh * nw) / nw, bx = index % nw;
      attend_block(in_data + image * h * w * 3 * c, emb_data, h, w, c, heads, block, halo, by, bx, keys_t.data(),
                   values.data(), scores.data(), out_data + image * h * w * c);
    }
  });
  return out;
}

// Gradients of one (image, head) of halo_attention, block after block; the forward pass is recomputed per block
// (scores, softmax) instead of stored. With P the probabilities, dO the output's gradient and S = scale q k^T:
//   dP = dO v^T, dS = P * (dP - rowsum(P * dP)), dq = scale dS k, dk = scale dS^T q, dv = P^T dO,
// k including the embedding. dq is written, dk and dv are added into the window's pixels of dqkv (windows overlap
// by their halos; keys outside the map are dropped) and dk of every window position into demb (window^2, dim).
struct AttentionScratch {
  std::vector<float> keys_t, values_t, keys, probs, dprobs;  // (dim, padded) x 2, (window^2, dim), (queries, padded) x 2
  std::vector<const float*> q, dout;                        // each query's q and dO
  AttentionScratch(int64_t dim, int64_t n_keys, int64_t padded, int64_t queries)
      : keys_t(dim * padded), values_t(dim * padded), keys(n_keys * dim), probs(queries * padded),
        dprobs(queries * padded), q(queries), dout(queries) {}
};

constexpr int64_t kKeyGroup = 8;  // keys whose dk and dv accumulate together over all queries

// The sums run in local accumulators, stored once at the end: accumulating through the dk and dv pointers
// kept them in memory (the compiler cannot rule out aliasing), a store-to-load chain per multiply-add.
SSIU_TARGETS void key_gradients(const AttentionScratch& s, int64_t queries, int64_t padded, int64_t j0, int64_t d0,
                                Vec16* dk, Vec16* dv) {
  Vec16 sk[kKeyGroup] = {}, sv[kKeyGroup] = {};
  for (int64_t i = 0; i < queries; ++i) {
    const Vec16 q = load16(s.q[i] + d0), o = load16(s.dout[i] + d0);
    const float* ds = s.dprobs.data() + i * padded + j0;
    const float* p = s.probs.data() + i * padded + j0;
    for (int64_t jj = 0; jj < kKeyGroup; ++jj) {
      sk[jj] += ds[jj] * q;
      sv[jj] += p[jj] * o;
    }
  }
  for (int64_t jj = 0; jj < kKeyGroup; ++jj) {
    dk[jj] = sk[jj];
    dv[jj] = sv[jj];
  }
}

SSIU_TARGETS void attend_head_backward(const float* qkv, const float* grad, const float* embedding, int64_t h,
                                       int64_t w, int64_t c, int64_t heads, int64_t block, int64_t halo,
                                       int64_t head, AttentionScratch& s, float* dqkv, float* demb) {
  const int64_t dim = c / heads, window = block + 2 * halo, n_keys = window * window;
  const int64_t padded = (n_keys + 15) / 16 * 16, queries = block * block;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const ScoreKernel score = score_kernel(padded / 16);
  float tail[16] = {};
  for (int64_t lane = n_keys - (padded - 16); lane < 16; ++lane) tail[lane] = -3.0e38f;
  const float scales[kGroup] = {scale, scale, scale, scale};
  for (int64_t by = 0; by < h / block; ++by) {
    for (int64_t bx = 0; bx < w / block; ++bx) {
      window_transposed(qkv, embedding, h, w, c, dim, c + head * dim, block, halo, by, bx, s.keys_t.data(),
                        s.keys.data());
      window_transposed(qkv, nullptr, h, w, c, dim, 2 * c + head * dim, block, halo, by, bx, s.values_t.data(),
                        nullptr);
      for (int64_t i = 0; i < queries; ++i) {
        const int64_t pixel = (by * block + i / block) * w + bx * block + i % block;
        s.q[i] = qkv + pixel * 3 * c + head * dim;
        s.dout[i] = grad + pixel * c + head * dim;
      }
      for (int64_t i0 = 0; i0 < queries; i0 += kGroup) {
        const int64_t group = std::min(kGroup, queries - i0);
        const float* q[kGroup];
        const float* dout[kGroup];
        float* dq[kGroup];
        float spare[kGroup][16 * 8];  // dq of a repeated query in a short last group (heads of up to 128)
        for (int64_t g = 0; g < kGroup; ++g) {
          const int64_t i = std::min(i0 + g, queries - 1);  // a short last group repeats its last query
          const int64_t pixel = (by * block + i / block) * w + bx * block + i % block;
          q[g] = s.q[i];
          dout[g] = s.dout[i];
          dq[g] = g < group ? dqkv + pixel * 3 * c + head * dim : spare[g];
        }
        float* p = s.probs.data() + i0 * padded;
        float* dp = s.dprobs.data() + i0 * padded;
        float group_p[kGroup * 128], group_dp[kGroup * 128];  // a short last group's rows (at most 128 keys)
        float* gp = group == kGroup ? p : group_p;
        float* gdp = group == kGroup ? dp : group_dp;
        score(q, s.keys_t.data(), padded, dim, scale, gp);
        score(dout, s.values_t.data(), padded, dim, 1.f, gdp);
        for (int64_t g = 0; g < kGroup; ++g) {
          float* pg = gp + g * padded;
          float* dpg = gdp + g * padded;
          const float inv = softmax_row(pg, padded, tail);
          Vec16 dot{};
          for (int64_t j = 0; j < padded; j += 16) {
            const Vec16 pj = load16(pg + j) * inv;
            store16(pg + j, pj);
            dot += pj * load16(dpg + j);
          }
          const float rowsum = lanes_sum(dot);
          for (int64_t j = 0; j < padded; j += 16) store16(dpg + j, load16(pg + j) * (load16(dpg + j) - rowsum));
        }
        group_weighted_sum(gdp, scales, s.keys.data(), n_keys, padded, dim, dq);
        if (group < kGroup) {
          std::copy(group_p, group_p + group * padded, p);
          std::copy(group_dp, group_dp + group * padded, dp);
        }
      }
      for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyGroup) {
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
          Vec16 dk[kKeyGroup], dv[kKeyGroup];
          key_gradients(s, queries, padded, j0, d0, dk, dv);
          for (int64_t jj = 0; jj < kKeyGroup && j0 + jj < n_keys; ++jj) {
            const int64_t j = j0 + jj, y = by * block - halo + j / window, x = bx * block - halo + j % window;
            const Vec16 k = dk[jj] * scale;
            store16(demb + j * dim + d0, load16(demb + j * dim + d0) + k);
            if (y >= 0 && y < h && x >= 0 && x < w) {
              float* dkey = dqkv + (y * w + x) * 3 * c + c + head * dim + d0;
              store16(dkey, load16(dkey) + k);
              store16(dkey + c, load16(dkey + c) + dv[jj]);
            }
          }
        }
      }
    }
  }
}

// Gradients of halo_attention (float32) with respect to its qkv map and embedding, from the output's gradient
// `grad` (B, h, w, C): (dqkv (B, h, w, 3 C), dembedding (window, window, dim)). Heads of 16k channels.
std::tuple<at::Tensor, at::Tensor> halo_attention_backward(const at::Tensor& grad, const at::Tensor& qkv,
                                                           const at::Tensor& embedding, int64_t heads, int64_t block,
                                                           int64_t halo) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.size(3) % 3 == 0,
              "halo_attention_backward: qkv must be a float32 (B, h, w, 3 C) CPU map, got ", qkv.sizes());
  const int64_t batch = qkv.size(0), h = qkv.size(1), w = qkv.size(2), c = qkv.size(3) / 3;
  TORCH_CHECK(heads > 0 && c % heads == 0 && (c / heads) % 16 == 0 && c / heads <= 128, "halo_attention_backward: ",
              c, " channels do not split into ", heads, " heads of 16, 32, ... 128");
  TORCH_CHECK(block > 0 && halo >= 0 && h % block == 0 && w % block == 0, "halo_attention_backward: a ", h, "x", w,
              " map is not made of ", block, "x", block, " blocks");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({batch, h, w, c}) && grad.scalar_type() == at::kFloat,
              "halo_attention_backward: grad must be float32 (B, h, w, C)");
  const int64_t dim = c / heads, window = block + 2 * halo, n_keys = window * window;
  TORCH_CHECK(n_keys <= 128, "halo_attention_backward: windows of at most 128 keys, got ", n_keys);
  TORCH_CHECK(embedding.sizes() == at::IntArrayRef({window, window, dim}),
              "halo_attention_backward: embedding must be (", window, ", ", window, ", ", dim, ")");
  const at::Tensor input = qkv.contiguous(), g = grad.contiguous(), emb = embedding.contiguous().to(at::kFloat);
  at::Tensor dqkv = at::zeros_like(input);
  at::Tensor demb = at::zeros({batch * heads, n_keys, dim}, input.options());
  const int64_t padded = (n_keys + 15) / 16 * 16;
  const float* in_data = input.data_ptr<float>();
  const float* g_data = g.data_ptr<float>();
  const float* emb_data = emb.data_ptr<float>();
  float* dq_data = dqkv.data_ptr<float>();
  float* demb_data = demb.data_ptr<float>();
  // one task per (image, head): the windows of an image overlap, its heads' channels do not
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch(dim, n_keys, padded, block * block);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t image = index / heads, head = index % heads;
      attend_head_backward(in_data + image * h * w * 3 * c, g_data + image * h * w * c, emb_data, h, w, c, heads,
                           block, halo, head, scratch, dq_data + image * h * w * 3 * c,
                           demb_data + index * n_keys * dim);
    }
  });
  return {dqkv, demb.sum(0).view({window, window, dim})};
}

void check_gate_maps(const char* name, std::initializer_list<const at::Tensor*> maps) {
  const at::Tensor& first = **maps.begin();
  for (const at::Tensor* t : maps) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous() &&
                    t->sizes() == first.sizes() && t->numel() % 16 == 0,
                name, ": contiguous float32 CPU maps of one shape with a multiple of 16 values expected");
  }
}

constexpr int64_t kGateGrain = 16 * 1024;  // values per parallel task

at::Tensor gelu_gate(const at::Tensor& h, const at::Tensor& u) {
  check_gate_maps("gelu_gate", {&h, &u});
  at::Tensor out = at::empty_like(h);
  const float* hp = h.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, h.numel() / 16, kGateGrain / 16, [&](int64_t begin, int64_t end) {
    gelu_gate_values(hp + begin * 16, up + begin * 16, (end - begin) * 16, op + begin * 16);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gelu_gate_backward(const at::Tensor& grad, const at::Tensor& h,
                                                      const at::Tensor& u) {
  check_gate_maps("gelu_gate_backward", {&grad, &h, &u});
  at::Tensor dh = at::empty_like(h), du = at::empty_like(u);
  const float* gp = grad.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  float* dhp = dh.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  at::parallel_for(0, h.numel() / 16, kGateGrain / 16, [&](int64_t begin, int64_t end) {
    const int64_t o = begin * 16;
    gelu_gate_gradients(gp + o, hp + o, up + o, (end - begin) * 16, dhp + o, dup + o);
  });
  return {dh, du};
}

// MoE-FS gating of channels-last maps: per pixel and channel, gates = softmax over the experts of `logits`,
// out = sum of gates * experts; skip = out + residual (out itself without a residual). Returns (out, skip,
// gates), gates (B, H, W, E, C) if asked for, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_combine(at::TensorList logits, at::TensorList experts,
                                                           const std::optional<at::Tensor>& residual,
                                                           bool with_gates) {
  const int64_t n = static_cast<int64_t>(logits.size());
  TORCH_CHECK(n >= 1 && n <= kMaxExperts && static_cast<int64_t>(experts.size()) == n, "moe_combine: 1 to ",
              kMaxExperts, " experts, with one logit map each");
  const auto shape = experts[0].sizes();
  TORCH_CHECK(experts[0].dim() == 4, "moe_combine: (B, H, W, C) maps expected, got ", shape);
  std::vector<at::Tensor> l, e;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(logits[i].sizes() == shape && experts[i].sizes() == shape && logits[i].scalar_type() == at::kFloat &&
                experts[i].scalar_type() == at::kFloat && logits[i].device().is_cpu() && experts[i].device().is_cpu(),
                "moe_combine: every logit and expert map must be float32 on the CPU and shaped ", shape);
    l.push_back(logits[i].contiguous());
    e.push_back(experts[i].contiguous());
  }
  at::Tensor res;
  if (residual) {
    TORCH_CHECK(residual->sizes() == shape && residual->scalar_type() == at::kFloat,
                "moe_combine: the residual must be float32 and shaped ", shape);
    res = residual->contiguous();
  }
  const int64_t c = shape[3], pixels = shape[0] * shape[1] * shape[2];
  at::Tensor out = at::empty(shape, e[0].options()), skip = at::empty(shape, e[0].options());
  at::Tensor gates = with_gates ? at::empty({shape[0], shape[1], shape[2], n, c}, e[0].options())
                                : at::empty({0}, e[0].options());
  std::array<const float*, kMaxExperts> lp{}, ep{};
  for (int64_t i = 0; i < n; ++i) lp[i] = l[i].data_ptr<float>(), ep[i] = e[i].data_ptr<float>();
  const float* rp = residual ? res.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  float* sp = skip.data_ptr<float>();
  float* gp = with_gates ? gates.data_ptr<float>() : nullptr;
  at::parallel_for(0, pixels, 1024, [&](int64_t begin, int64_t end) {
    moe_pixels(lp.data(), ep.data(), rp, n, c, begin, end, op, sp, gp);
  });
  return {out, skip, gates};
}

// Gradients of moe_combine's out and gates, per pixel and channel: given the gates g_i, the experts e_i and the
// gradients of out (`grad`, plus `grad_skip` if given: skip = out + residual) and of the gates (`grad_gates`, if
// any): de_i = G g_i, and through the softmax dl_i = g_i (d_i - sum_j g_j d_j) with d_i = G e_i + dgates_i, G the
// summed output gradient.
SSIU_TARGETS void moe_backward_pixels(const float* grad, const float* grad_skip, const float* gates,
                                      const float* grad_gates, const float* const* experts, int64_t n, int64_t c,
                                      int64_t begin, int64_t end, float* const* dlogits, float* const* dexperts) {
  for (int64_t px = begin; px < end; ++px) {
    const int64_t at = px * c;
    int64_t ch = 0;
    for (; ch + 16 <= c; ch += 16) {
      Vec16 go = load16(grad + at + ch);
      if (grad_skip) go += load16(grad_skip + at + ch);
      Vec16 g[kMaxExperts], d[kMaxExperts];
      Vec16 total{};
      for (int64_t i = 0; i < n; ++i) {
        const int64_t gi = (px * n + i) * c + ch;
        g[i] = load16(gates + gi);
        d[i] = go * load16(experts[i] + at + ch);
        if (grad_gates) d[i] += load16(grad_gates + gi);
        total += g[i] * d[i];
        store16(dexperts[i] + at + ch, go * g[i]);
      }
      for (int64_t i = 0; i < n; ++i) store16(dlogits[i] + at + ch, g[i] * (d[i] - total));
    }
    for (; ch < c; ++ch) {
      const float go = grad[at + ch] + (grad_skip ? grad_skip[at + ch] : 0.f);
      float g[kMaxExperts], d[kMaxExperts];
      float total = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t gi = (px * n + i) * c + ch;
        g[i] = gates[gi];
        d[i] = go * experts[i][at + ch] + (grad_gates ? grad_gates[gi] : 0.f);
        total += g[i] * d[i];
        dexperts[i][at + ch] = go * g[i];
      }
      for (int64_t i = 0; i < n; ++i) dlogits[i][at + ch] = g[i] * (d[i] - total);
    }
  }
}

// Backward of moe_combine for training: (B, H, W, C) maps `grad` (out's gradient; `grad_skip`, skip's, is added to
// it), `gates` (B, H, W, E, C) as moe_combine returned them and their gradient `grad_gates` if any, and the experts.
// Returns the logits' and the experts' gradients, one (B, H, W, C) map each, in one pass over the maps.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> moe_combine_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_skip, const at::Tensor& gates,
    const std::optional<at::Tensor>& grad_gates, at::TensorList experts) {
  const int64_t n = static_cast<int64_t>(experts.size());
  TORCH_CHECK(n >= 1 && n <= kMaxExperts, "moe_combine_backward: 1 to ", kMaxExperts, " experts");
  const auto shape = grad.sizes();
  TORCH_CHECK(grad.dim() == 4 && grad.scalar_type() == at::kFloat && grad.device().is_cpu(),
              "moe_combine_backward: grad must be a float32 CPU (B, H, W, C) map, got ", shape);
  const std::vector<int64_t> gate_shape{shape[0], shape[1], shape[2], n, shape[3]};
  auto check = [&](const at::Tensor& t, at::IntArrayRef expected, const char* what) {
    TORCH_CHECK(t.sizes() == expected && t.scalar_type() == at::kFloat && t.device().is_cpu(),
                "moe_combine_backward: ", what, " must be float32 on the CPU and shaped ", expected, ", got ",
                t.sizes());
    return t.contiguous();
  };
  const at::Tensor go = grad.contiguous(), g = check(gates, gate_shape, "gates");
  const at::Tensor gs = grad_skip ? check(*grad_skip, shape, "grad_skip") : at::Tensor();
  const at::Tensor gg = grad_gates ? check(*grad_gates, gate_shape, "grad_gates") : at::Tensor();
  std::vector<at::Tensor> e, dlogits, dexperts;
  std::array<const float*, kMaxExperts> ep{};
  std::array<float*, kMaxExperts> dlp{}, dep{};
  for (int64_t i = 0; i < n; ++i) {
    e.push_back(check(experts[i], shape, "every expert"));
    dlogits.push_back(at::empty(shape, go.options()));
    dexperts.push_back(at::empty(shape, go.options()));
    ep[i] = e[i].data_ptr<float>(), dlp[i] = dlogits[i].data_ptr<float>(), dep[i] = dexperts[i].data_ptr<float>();
  }
  const float* gp = go.data_ptr<float>();
  const float* gsp = grad_skip ? gs.data_ptr<float>() : nullptr;
  const float* gatep = g.data_ptr<float>();
  const float* ggp = grad_gates ? gg.data_ptr<float>() : nullptr;
  const int64_t c = shape[3];
  at::parallel_for(0, shape[0] * shape[1] * shape[2], 1024, [&](int64_t begin, int64_t end) {
    moe_backward_pixels(gp, gsp, gatep, ggp, ep.data(), n, c, begin, end, dlp.data(), dep.data());
  });
  return {dlogits, dexperts};
}

}  // namespace

TORCH_LIBRARY(ssiu, m) {
  m.def("depthwise_reflect(Tensor x, Tensor weight, Tensor? bias, int offset, int rows) -> Tensor");
  m.def("depthwise_reflect_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("msgm(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor wd, Tensor bd, Tensor w3, Tensor b3, "
        "Tensor wo, Tensor? bo, Tensor? add, bool residual, Tensor? ln_weight, Tensor? ln_bias, float ln_eps, "
        "int offset, int rows, int tile_pixels, bool bf16=False) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias, Tensor? add, bool gelu) -> Tensor");
  m.def("gelu_product_bf16(Tensor x, Tensor w1, Tensor b1, Tensor w2) -> Tensor");
  m.def("bf16_supported() -> bool", bf16_supported);
  m.def("upsample_combine(Tensor low, Tensor v, Tensor b, int r0, int height) -> Tensor");
  m.def("halo_attention(Tensor qkv, Tensor embedding, int heads, int block, int halo, bool bf16=False) -> Tensor");
  m.def("halo_attention_backward(Tensor grad, Tensor qkv, Tensor embedding, int heads, int block, int halo) -> "
        "(Tensor, Tensor)");
  m.def("gelu_gate(Tensor h, Tensor u) -> Tensor");
  m.def("layer_norm_rows_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_rows_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor weight) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("gelu_gate_backward(Tensor grad, Tensor h, Tensor u) -> (Tensor, Tensor)");
  m.def("linear_backward(Tensor grad, Tensor x, Tensor? weight) -> (Tensor, Tensor, Tensor)");
  m.def("max_pool2(Tensor x, int stride) -> (Tensor, Tensor)");
  m.def("max_pool2_backward(Tensor grad, Tensor argmax, Tensor? add, int height, int width, int stride) -> Tensor");
  m.def("linear_backward_shared(Tensor[] grads, Tensor x, Tensor[] weights, Tensor? add) -> "
        "(Tensor, Tensor[], Tensor[])");
  m.def("gated_linear_backward(Tensor grad, Tensor gate, Tensor h, Tensor u, Tensor weight) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_combine(Tensor[] logits, Tensor[] experts, Tensor? residual, bool with_gates) -> (Tensor, Tensor, Tensor)");
  m.def("moe_combine_backward(Tensor grad, Tensor? grad_skip, Tensor gates, Tensor? grad_gates, Tensor[] experts) -> "
        "(Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(ssiu, CPU, m) {
  m.impl("depthwise_reflect", depthwise_reflect);
  m.impl("depthwise_reflect_backward", depthwise_reflect_backward);
  m.impl("msgm", msgm);
  m.impl("upsample_combine", upsample_combine);
  m.impl("halo_attention", halo_attention);
  m.impl("halo_attention_backward", halo_attention_backward);
  m.impl("gelu_gate", gelu_gate);
  m.impl("layer_norm_rows_forward", layer_norm_rows_forward);
  m.impl("layer_norm_rows_backward", layer_norm_rows_backward);
  m.impl("gelu_gate_backward", gelu_gate_backward);
  m.impl("moe_combine", moe_combine);
  m.impl("moe_combine_backward", moe_combine_backward);
  m.impl("linear_backward", linear_backward);
  m.impl("max_pool2", max_pool2);
  m.impl("max_pool2_backward", max_pool2_backward);
  m.impl("linear_backward_shared", linear_backward_shared);
  m.impl("gated_linear_backward", gated_linear_backward);
  m.impl("linear_bf16", linear_bf16);
  m.impl("gelu_product_bf16", gelu_product_bf16);
}
