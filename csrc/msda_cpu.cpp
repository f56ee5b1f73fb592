// Multi-scale deformable attention, CPU build: float32 and float64, OpenMP threads (as many as
// torch.get_num_threads()). The arithmetic is msda.h's, the same the CUDA build runs.
//
// forward:  parallel over query x head (a fixed split of the rows); each output row is written by
//           one thread, in a fixed order.
// backward: parallel over batch x head; thread (n, m) walks the queries in order and owns
//           grad_value[n, :, m, :] (every sample of head m of image n reads only those rows), and
//           the gradients of its own locations and weights. No two threads write one element and
//           every sum runs in one fixed order, so the backward is deterministic, bit for bit, at any
//           thread count; the `deterministic` flag has nothing to change here.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "msda_host.h"

namespace msda {
namespace {

// The row loops are compiled for AVX2+FMA and AVX-512 as well as the baseline; the loader picks
// one for the CPU it runs on (GCC function multi-versioning), so the build stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSDA_CPU_CLONES
#endif

struct PlainAdd {
  template <typename T>
  void operator()(T* p, T v) const { *p += v; }
};

// Thread t of T takes items [work * t / T, work * (t + 1) / T): a fixed split over at most
// torch.get_num_threads() threads, each with about a million multiply-adds or more (`cost` per
// item), so that small calls (gradcheck's) do not pay for waking threads.
template <typename F>
void parallel_split(int64_t work, int64_t cost, F body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work * cost / (1 << 20)));
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    body(work * t / T, work * (t + 1) / T);
  }
}

// kD > 0: the channel count known at compile time (the encoder's 32 and friends), so the
// accumulator lives in registers; kD = 0: any D, accumulating in the output row.
template <typename scalar_t, int kD>
MSDA_CPU_CLONES void forward_rows(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, scalar_t* out,
                                  const Dims& d, const Levels& lv, int64_t begin, int64_t end) {
  const int64_t token_stride = d.M * d.D;
  const int D = kD > 0 ? kD : static_cast<int>(d.D);
  scalar_t local[kD > 0 ? kD : 1];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t m = i % d.M, n = i / (d.Lq * d.M);
    const scalar_t* head = value + n * d.S * token_stride + m * d.D;
    scalar_t* o = out + i * d.D;  // (N, Lq, M * D): query-head i owns D consecutive outputs
    scalar_t* acc = kD > 0 ? local : o;
    for (int c = 0; c < D; ++c) acc[c] = scalar_t(0);
    for (int64_t l = 0; l < d.L; ++l) {
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t j = sample_index(d, i, l, p);
        Bilinear<scalar_t> b;
        if (bilinear(loc[2 * j], loc[2 * j + 1], lv.height[l], lv.width[l], lv.start[l], b)) {
          accumulate_sample(head, token_stride, b, attn[j], acc, D, UnitStride{});
        }
      }
    }
    if (kD > 0) {
      for (int c = 0; c < D; ++c) o[c] = acc[c];
    }
  }
}

// Owners (n, m) in [begin, end): all of head m of image n, queries in order.
template <typename scalar_t, int kD>
MSDA_CPU_CLONES void backward_owners(const scalar_t* grad, const scalar_t* value, const scalar_t* loc,
                                     const scalar_t* attn, scalar_t* grad_value, scalar_t* grad_loc,
                                     scalar_t* grad_attn, const Dims& d, const Levels& lv, int64_t begin,
                                     int64_t end) {
  const int64_t token_stride = d.M * d.D;
  const int D = kD > 0 ? kD : static_cast<int>(d.D);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / d.M, m = nm % d.M;
    const scalar_t* head = value + n * d.S * token_stride + m * d.D;
    scalar_t* grad_head = grad_value + n * d.S * token_stride + m * d.D;
    for (int64_t q = 0; q < d.Lq; ++q) {
      const int64_t i = query_head(d, n, q, m);
      const scalar_t* g = grad + i * d.D;
      for (int64_t l = 0; l < d.L; ++l) {
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t j = sample_index(d, i, l, p);
          Bilinear<scalar_t> b;
          scalar_t gw = 0, gx = 0, gy = 0;
          if (bilinear(loc[2 * j], loc[2 * j + 1], lv.height[l], lv.width[l], lv.start[l], b)) {
            scalar_t dots[4] = {0, 0, 0, 0};
            accumulate_corner_dots(head, token_stride, g, b, D, UnitStride{}, dots);
            weight_location_grads(b, dots, attn[j], lv.height[l], lv.width[l], gw, gx, gy);
            scatter_value_grad(grad_head, token_stride, g, b, attn[j], D, UnitStride{}, PlainAdd{});
          }
          grad_attn[j] = gw;
          grad_loc[2 * j] = gx;
          grad_loc[2 * j + 1] = gy;
        }
      }
    }
  }
}

// f.template operator()<kD>() with kD the compile-time twin of D where there is one.
template <typename F>
void with_channels(int64_t D, F f) {
  switch (D) {
    case 16: return f.template operator()<16>();
    case 32: return f.template operator()<32>();  // Mask2Former: 256 channels over 8 heads
    default: return f.template operator()<0>();
  }
}

template <typename scalar_t>
void forward_cpu(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims d,
                 const Levels lv) {
  with_channels(d.D, [&]<int kD>() {
    parallel_split(d.N * d.Lq * d.M, d.L * d.P * 4 * d.D, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t, kD>(value, loc, attn, out, d, lv, begin, end);
    });
  });
}

template <typename scalar_t>
void backward_cpu(const scalar_t* grad, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                  scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, const Dims d, const Levels lv) {
  with_channels(d.D, [&]<int kD>() {
    parallel_split(d.N * d.M, d.Lq * d.L * d.P * 8 * d.D, [&](int64_t begin, int64_t end) {
      backward_owners<scalar_t, kD>(grad, value, loc, attn, grad_value, grad_loc, grad_attn, d, lv, begin, end);
    });
  });
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "msda_native_cpu: tensors must be on the CPU, got ", value.device());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "msda_native_cpu: float32 or float64 only, got ", value.scalar_type());
}

at::Tensor forward(const at::Tensor& value_in, at::IntArrayRef shapes, const at::Tensor& locations_in,
                   const at::Tensor& weights_in) {
  auto [d, lv] = check_inputs(value_in, shapes, locations_in, weights_in);
  check_cpu(value_in);
  const at::Tensor value = value_in.contiguous(), locations = locations_in.contiguous(),
                   weights = weights_in.contiguous();
  at::Tensor out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_forward_cpu", [&] {
    forward_cpu<scalar_t>(value.const_data_ptr<scalar_t>(), locations.const_data_ptr<scalar_t>(),
                          weights.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), d, lv);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& value_in,
                                                        at::IntArrayRef shapes, const at::Tensor& locations_in,
                                                        const at::Tensor& weights_in, bool /*deterministic*/) {
  auto [d, lv] = check_inputs(value_in, shapes, locations_in, weights_in);
  check_cpu(value_in);
  TORCH_CHECK(grad_in.numel() == d.N * d.Lq * d.M * d.D && grad_in.scalar_type() == value_in.scalar_type(),
              "msda_native_cpu: grad_output must be (N, Lq, M * D) of the value's dtype, got ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous(), value = value_in.contiguous(),
                   locations = locations_in.contiguous(), weights = weights_in.contiguous();
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(locations), grad_attn = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_backward_cpu", [&] {
    backward_cpu<scalar_t>(grad.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                           locations.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
                           grad_value.mutable_data_ptr<scalar_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
                           grad_attn.mutable_data_ptr<scalar_t>(), d, lv);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda

TORCH_LIBRARY(msda_native_cpu, m) {
  m.def("forward(Tensor value, int[] shapes, Tensor locations, Tensor weights) -> Tensor", &msda::forward);
  m.def("backward(Tensor grad, Tensor value, int[] shapes, Tensor locations, Tensor weights, bool deterministic)"
        " -> (Tensor, Tensor, Tensor)",
        &msda::backward);
}
