// Multi-scale deformable attention: the per-sample arithmetic, shared by the CPU build
// (msda_cpu.cpp) and the CUDA build (msda_cuda.cu), so the CPU tests exercise the same code the
// GPU runs. Plain C++ (no ATen): every function is inline and, under nvcc, __host__ __device__.
//
// Layouts (all contiguous, as the encoder has them; msda.py's reference uses the same):
//   value      (N, S, M, D)         S = sum of H_l * W_l, tokens of level l row-major from start[l]
//   locations  (N, Lq, M, L, P, 2)  (x, y) normalised to [0, 1]; outside the map reads zeros
//   weights    (N, Lq, M, L, P)
//   output     (N, Lq, M * D)
//
// Sampling is F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) on the
// grid 2 * location - 1, i.e. pixel coordinate px = x * W - 1/2 (pixel j has its centre at
// px = j): the four neighbours of (px, py) with bilinear weights, a neighbour outside the map
// contributing zero (value and gradient).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#else
#define MSDA_HD inline
#endif

// The channel loops are independent (or a sum): let the CPU compiler vectorise them (OpenMP simd;
// a vectorised sum has one fixed order per build, so results stay bit-reproducible).
#if defined(_OPENMP) && !defined(__CUDACC__)
#define MSDA_SIMD _Pragma("omp simd")
#define MSDA_SIMD_SUM(var) _Pragma(MSDA_STRINGIFY(omp simd reduction(+ : var)))
#define MSDA_STRINGIFY(x) #x
#else
#define MSDA_SIMD
#define MSDA_SIMD_SUM(var)
#endif

namespace msda {

constexpr int kMaxLevels = 16;

// The level geometry, small enough to pass to a kernel by value.
struct Levels {
  int count;
  int height[kMaxLevels];
  int width[kMaxLevels];
  int64_t start[kMaxLevels];  // index in S of the level's first token
};

// Sizes of one call.
struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// A unit channel stride known at compile time, so the CPU build's channel loops vectorise; the
// CUDA build passes a run-time stride (the lanes of a channel group).
struct UnitStride {
  MSDA_HD constexpr operator int() const { return 1; }
};

MSDA_HD float floor_of(float v) { return floorf(v); }
MSDA_HD double floor_of(double v) { return ::floor(v); }

// The four neighbours of one sample, in the order (y0, x0), (y0, x0 + 1), (y0 + 1, x0),
// (y0 + 1, x0 + 1). A neighbour outside the map has token -1 and weight 0.
template <typename acc_t>
struct Bilinear {
  int64_t token[4];
  acc_t weight[4];
  acc_t fx, fy;  // position between the neighbours, in [0, 1)
};

// Neighbours of the normalised location (x, y) on a level of H x W tokens starting at `start`.
// Returns false (all four outside) when the sample is more than a pixel off the map, or NaN.
template <typename acc_t>
MSDA_HD bool bilinear(acc_t x, acc_t y, int H, int W, int64_t start, Bilinear<acc_t>& b) {
  const acc_t px = x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t py = y * static_cast<acc_t>(H) - acc_t(0.5);
  for (int c = 0; c < 4; ++c) {
    b.token[c] = -1;
    b.weight[c] = acc_t(0);
  }
  b.fx = b.fy = acc_t(0);
  if (!(px > acc_t(-1) && px < static_cast<acc_t>(W) && py > acc_t(-1) && py < static_cast<acc_t>(H))) {
    return false;  // also catches NaN, and keeps the int conversion below in range
  }
  const acc_t x0f = floor_of(px), y0f = floor_of(py);
  const int x0 = static_cast<int>(x0f), y0 = static_cast<int>(y0f);
  const acc_t fx = px - x0f, fy = py - y0f;
  b.fx = fx;
  b.fy = fy;
  const acc_t w[4] = {(acc_t(1) - fy) * (acc_t(1) - fx), (acc_t(1) - fy) * fx, fy * (acc_t(1) - fx), fy * fx};
  for (int c = 0; c < 4; ++c) {
    const int xi = x0 + (c & 1), yi = y0 + (c >> 1);
    if (xi >= 0 && xi < W && yi >= 0 && yi < H) {
      b.token[c] = start + static_cast<int64_t>(yi) * W + xi;
      b.weight[c] = w[c];
    }
  }
  return true;
}

// Forward: out[i] += a * sample(channel i) for `count` channels `stride` apart. `head` points at
// value[n, 0, m, first channel]; consecutive tokens are `token_stride` (= M * D) elements apart.
template <typename scalar_t, typename acc_t, typename stride_t>
MSDA_HD void accumulate_sample(const scalar_t* head, int64_t token_stride, const Bilinear<acc_t>& b, acc_t a,
                               acc_t* out, int count, stride_t stride) {
  for (int c = 0; c < 4; ++c) {
    if (b.token[c] < 0) continue;
    const acc_t w = a * b.weight[c];
    const scalar_t* v = head + b.token[c] * token_stride;
    MSDA_SIMD
    for (int i = 0; i < count; ++i) out[i] += w * static_cast<acc_t>(v[i * stride]);
  }
}

// Backward, part 1: dots[c] += sum over the channels of grad * value at neighbour c. The
// gradients of the weight and of the location are linear in these four numbers, so partial dots
// over a subset of the channels give partial gradients that add up (the CUDA build's reduction).
template <typename scalar_t, typename acc_t, typename stride_t>
MSDA_HD void accumulate_corner_dots(const scalar_t* head, int64_t token_stride, const scalar_t* grad,
                                    const Bilinear<acc_t>& b, int count, stride_t stride, acc_t dots[4]) {
  for (int c = 0; c < 4; ++c) {
    if (b.token[c] < 0) continue;
    const scalar_t* v = head + b.token[c] * token_stride;
    acc_t s = acc_t(0);
    MSDA_SIMD_SUM(s)
    for (int i = 0; i < count; ++i) s += static_cast<acc_t>(grad[i * stride]) * static_cast<acc_t>(v[i * stride]);
    dots[c] += s;
  }
}

// Backward, part 2: from the dots, the gradients of the attention weight a and of the location
// (x, y). d px / d x = W and d py / d y = H; an outside neighbour has dot 0 (it reads zero).
template <typename acc_t>
MSDA_HD void weight_location_grads(const Bilinear<acc_t>& b, const acc_t dots[4], acc_t a, int H, int W,
                                   acc_t& grad_weight, acc_t& grad_x, acc_t& grad_y) {
  grad_weight = b.weight[0] * dots[0] + b.weight[1] * dots[1] + b.weight[2] * dots[2] + b.weight[3] * dots[3];
  const acc_t ddx = (acc_t(1) - b.fy) * (dots[1] - dots[0]) + b.fy * (dots[3] - dots[2]);
  const acc_t ddy = (acc_t(1) - b.fx) * (dots[2] - dots[0]) + b.fx * (dots[3] - dots[1]);
  grad_x = a * static_cast<acc_t>(W) * ddx;
  grad_y = a * static_cast<acc_t>(H) * ddy;
}

// Backward, part 3: the value gradient of one sample, add(&grad_value[neighbour, channel],
// a * weight * grad) for each inside neighbour; `head` points at grad_value[n, 0, m, first channel].
// `add` is a plain += (CPU: each thread owns its rows) or an atomic add (CUDA, fast path).
template <typename scalar_t, typename acc_t, typename stride_t, typename Add>
MSDA_HD void scatter_value_grad(acc_t* head, int64_t token_stride, const scalar_t* grad, const Bilinear<acc_t>& b,
                                acc_t a, int count, stride_t stride, Add add) {
  for (int c = 0; c < 4; ++c) {
    if (b.token[c] < 0) continue;
    const acc_t w = a * b.weight[c];
    acc_t* gv = head + b.token[c] * token_stride;
    MSDA_SIMD
    for (int i = 0; i < count; ++i) add(gv + i * stride, w * static_cast<acc_t>(grad[i * stride]));
  }
}

// The weight with which sample (a, b) reads neighbour c: the one term a gather-style value
// gradient (the CUDA deterministic path) adds per (sample, neighbour, channel). Bit-identical to
// the factor scatter_value_grad uses.
template <typename acc_t>
MSDA_HD acc_t neighbour_weight(const Bilinear<acc_t>& b, acc_t a, int c) {
  return a * b.weight[c];
}

// Index helpers for the flattened layouts above: query-head i = (n * Lq + q) * M + m, sample
// j = (i * L + l) * P + p.
MSDA_HD int64_t query_head(const Dims& d, int64_t n, int64_t q, int64_t m) { return (n * d.Lq + q) * d.M + m; }
MSDA_HD int64_t sample_index(const Dims& d, int64_t i, int64_t l, int64_t p) { return (i * d.L + l) * d.P + p; }

}  // namespace msda
