// Multi-scale deformable attention, CUDA build: float32, float64, float16 and bfloat16, always
// accumulating in float32 (float64 for float64). The arithmetic is msda.h's, the same the CPU
// build runs and the CPU tests check.
//
// Threads: a group of G lanes (G = D rounded up to a power of two, at most 32, so a group never
// straddles a warp) per query-head (n, q, m); lane k handles channels k, k + G, ... Reads and
// writes of a group are consecutive channels, i.e. coalesced in the (N, S, M, D) layout.
//
// backward, fast:          one kernel; the value gradient by float atomics into a float32 (or
//                          float64) buffer, so the order of its additions varies run to run.
// backward, deterministic: no float atomics. The same kernel computes the location and weight
//                          gradients (each written by one lane, after a fixed-order shuffle
//                          reduction); the value gradient is a gather: every (sample, neighbour)
//                          pair gets a unique integer key (value row, then sample, then neighbour),
//                          the keys are sorted, and one lane group per value row sums its segment
//                          in key order.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "msda_host.h"

namespace msda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kOutside = std::numeric_limits<int64_t>::max();  // the key of a neighbour off the map

int lanes_for(int64_t D) {
  int g = 1;
  while (g < D && g < 32) g *= 2;
  return g;
}

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

struct AtomicAdd {
  __device__ void operator()(float* p, float v) const { atomicAdd(p, v); }
  __device__ void operator()(double* p, double v) const { atomicAdd(p, v); }
};

// Sum of v over the G lanes of a group (G a power of two <= 32); the same tree every run. Every
// lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, const Dims d,
                               const Levels lv, const int G) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = t / G;
  const int lane = static_cast<int>(t % G);
  if (i >= d.N * d.Lq * d.M) return;
  const int64_t m = i % d.M, n = i / (d.Lq * d.M), token_stride = d.M * d.D;
  const scalar_t* head = value + n * d.S * token_stride + m * d.D;
  for (int64_t c = lane; c < d.D; c += G) {
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < d.L; ++l) {
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t j = sample_index(d, i, l, p);
        Bilinear<acc_t> b;
        if (bilinear(static_cast<acc_t>(loc[2 * j]), static_cast<acc_t>(loc[2 * j + 1]), lv.height[l], lv.width[l],
                     lv.start[l], b)) {
          accumulate_sample(head + c, token_stride, b, static_cast<acc_t>(attn[j]), &acc, 1, UnitStride{});
        }
      }
    }
    out[i * d.D + c] = static_cast<scalar_t>(acc);
  }
}

// Location and weight gradients of every sample; with kScatter also the value gradient (atomics).
template <typename scalar_t, typename acc_t, bool kScatter>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ value,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, const Dims d, const Levels lv, const int G) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(t % G);
  const bool active = t / G < d.N * d.Lq * d.M;
  const int64_t i = active ? t / G : 0;  // idle lanes of the last warp shadow group 0 and write nothing:
                                         // they must still take part in the shuffles
  const int64_t m = i % d.M, n = i / (d.Lq * d.M), token_stride = d.M * d.D;
  const scalar_t* head = value + n * d.S * token_stride + m * d.D + lane;
  const scalar_t* g = grad + i * d.D + lane;
  const int count = lane < d.D ? static_cast<int>((d.D - lane + G - 1) / G) : 0;  // channels of this lane
  for (int64_t l = 0; l < d.L; ++l) {
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t j = sample_index(d, i, l, p);
      const acc_t a = static_cast<acc_t>(attn[j]);
      Bilinear<acc_t> b;
      const bool inside = bilinear(static_cast<acc_t>(loc[2 * j]), static_cast<acc_t>(loc[2 * j + 1]),
                                   lv.height[l], lv.width[l], lv.start[l], b);
      acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      if (inside) accumulate_corner_dots(head, token_stride, g, b, count, G, dots);
      acc_t gw, gx, gy;
      weight_location_grads(b, dots, a, lv.height[l], lv.width[l], gw, gx, gy);
      gw = group_sum(gw, G);
      gx = group_sum(gx, G);
      gy = group_sum(gy, G);
      if (active && lane == 0) {
        grad_attn[j] = static_cast<scalar_t>(gw);
        grad_loc[2 * j] = static_cast<scalar_t>(gx);
        grad_loc[2 * j + 1] = static_cast<scalar_t>(gy);
      }
      if (kScatter && active && inside) {
        scatter_value_grad(grad_value + n * d.S * token_stride + m * d.D + lane, token_stride, g, b, a, count, G,
                           AtomicAdd{});
      }
    }
  }
}

// Deterministic value gradient, step 1: the key of every (sample, neighbour) pair,
//   row * K + (sample within (n, m)) * 4 + neighbour,  row = (n * S + token) * M + m,
// K = Lq * L * P * 4; a neighbour outside the map gets the largest key (sorted past every row).
template <typename scalar_t, typename acc_t>
__global__ void keys_kernel(const scalar_t* __restrict__ loc, int64_t* __restrict__ keys, const Dims d,
                            const Levels lv, const int64_t K) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d.N * d.Lq * d.M * d.L * d.P) return;
  const int64_t p = j % d.P, l = (j / d.P) % d.L, i = j / (d.L * d.P);
  const int64_t m = i % d.M, q = (i / d.M) % d.Lq, n = i / (d.M * d.Lq);
  Bilinear<acc_t> b;
  bilinear(static_cast<acc_t>(loc[2 * j]), static_cast<acc_t>(loc[2 * j + 1]), lv.height[l], lv.width[l],
           lv.start[l], b);
  const int64_t local = ((q * d.L + l) * d.P + p) * 4;
  for (int c = 0; c < 4; ++c) {
    keys[4 * j + c] = b.token[c] < 0 ? kOutside : ((n * d.S + b.token[c]) * d.M + m) * K + local + c;
  }
}

// Step 2 (after the sort): one lane group per value row sums its segment of sorted keys in order.
template <typename scalar_t, typename acc_t>
__global__ void gather_value_grad_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ row_start,
                                         const scalar_t* __restrict__ grad, const scalar_t* __restrict__ loc,
                                         const scalar_t* __restrict__ attn, scalar_t* __restrict__ grad_value,
                                         const Dims d, const Levels lv, const int G, const int64_t K) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = t / G;
  const int lane = static_cast<int>(t % G);
  if (r >= d.N * d.S * d.M) return;
  const int64_t m = r % d.M, n = r / (d.M * d.S);
  const int64_t begin = row_start[r], end = row_start[r + 1];
  for (int64_t ch = lane; ch < d.D; ch += G) {
    acc_t acc = acc_t(0);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t local = sorted[e] - r * K;
      const int c = static_cast<int>(local % 4);
      const int64_t s = local / 4, p = s % d.P, l = (s / d.P) % d.L, q = s / (d.P * d.L);
      const int64_t i = query_head(d, n, q, m), j = sample_index(d, i, l, p);
      Bilinear<acc_t> b;
      bilinear(static_cast<acc_t>(loc[2 * j]), static_cast<acc_t>(loc[2 * j + 1]), lv.height[l], lv.width[l],
               lv.start[l], b);
      acc += neighbour_weight(b, static_cast<acc_t>(attn[j]), c) * static_cast<acc_t>(grad[i * d.D + ch]);
    }
    grad_value[r * d.D + ch] = static_cast<scalar_t>(acc);  // row r is value[n, token, m, :]
  }
}

void check_cuda(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cuda(), "msda_native_cuda: tensors must be on a CUDA device, got ", value.device());
}

at::Tensor forward(const at::Tensor& value_in, at::IntArrayRef shapes, const at::Tensor& locations_in,
                   const at::Tensor& weights_in) {
  auto [d, lv] = check_inputs(value_in, shapes, locations_in, weights_in);
  check_cuda(value_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous(), locations = locations_in.contiguous(),
                   weights = weights_in.contiguous();
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  const int G = lanes_for(d.D);
  const int64_t threads = d.N * d.Lq * d.M * G;
  if (threads == 0 || d.D == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(threads), kThreads, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), locations.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), d, lv, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& value_in,
                                                        at::IntArrayRef shapes, const at::Tensor& locations_in,
                                                        const at::Tensor& weights_in, bool deterministic) {
  auto [d, lv] = check_inputs(value_in, shapes, locations_in, weights_in);
  check_cuda(value_in);
  TORCH_CHECK(grad_in.numel() == d.N * d.Lq * d.M * d.D && grad_in.scalar_type() == value_in.scalar_type(),
              "msda_native_cuda: grad_output must be (N, Lq, M * D) of the value's dtype, got ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor grad = grad_in.contiguous(), value = value_in.contiguous(),
                   locations = locations_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor grad_loc = at::zeros_like(locations), grad_attn = at::zeros_like(weights);
  const int G = lanes_for(d.D);
  const int64_t threads = d.N * d.Lq * d.M * G;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    if (!deterministic) {
      at::Tensor buffer = at::zeros(value.sizes(), value.options().dtype(acc_type));  // atomics in acc_t
      if (threads > 0 && d.D > 0) {
        backward_kernel<scalar_t, acc_t, true><<<blocks_for(threads), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), locations.const_data_ptr<scalar_t>(),
            weights.const_data_ptr<scalar_t>(), buffer.mutable_data_ptr<acc_t>(),
            grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>(), d, lv, G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_value = buffer.scalar_type() == value.scalar_type() ? buffer : buffer.to(value.scalar_type());
      return;
    }
    grad_value = at::zeros_like(value);
    if (threads == 0 || d.D == 0) return;
    backward_kernel<scalar_t, acc_t, false><<<blocks_for(threads), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), locations.const_data_ptr<scalar_t>(),
        weights.const_data_ptr<scalar_t>(), nullptr, grad_loc.mutable_data_ptr<scalar_t>(),
        grad_attn.mutable_data_ptr<scalar_t>(), d, lv, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t samples = d.N * d.Lq * d.M * d.L * d.P, rows = d.N * d.S * d.M, K = d.Lq * d.L * d.P * 4;
    TORCH_CHECK(rows <= (std::numeric_limits<int64_t>::max() - 1) / K - 1,
                "msda: too many samples for the deterministic backward's 64-bit keys");
    at::Tensor keys = at::empty({samples * 4}, value.options().dtype(at::kLong));
    keys_kernel<scalar_t, acc_t><<<blocks_for(samples), kThreads, 0, stream>>>(
        locations.const_data_ptr<scalar_t>(), keys.mutable_data_ptr<int64_t>(), d, lv, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // The keys are unique, so any sort gives the one sorted order: deterministic.
    const at::Tensor sorted = std::get<0>(keys.sort());
    const at::Tensor bounds = at::arange(rows + 1, keys.options()).mul_(K);  // row r's keys: [r K, (r + 1) K)
    const at::Tensor row_start = at::searchsorted(sorted, bounds);
    gather_value_grad_kernel<scalar_t, acc_t><<<blocks_for(rows * G), kThreads, 0, stream>>>(
        sorted.const_data_ptr<int64_t>(), row_start.const_data_ptr<int64_t>(), grad.const_data_ptr<scalar_t>(),
        locations.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(), d, lv, G, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda

TORCH_LIBRARY(msda_native_cuda, m) {
  m.def("forward(Tensor value, int[] shapes, Tensor locations, Tensor weights) -> Tensor", &msda::forward);
  m.def("backward(Tensor grad, Tensor value, int[] shapes, Tensor locations, Tensor weights, bool deterministic)"
        " -> (Tensor, Tensor, Tensor)",
        &msda::backward);
}
