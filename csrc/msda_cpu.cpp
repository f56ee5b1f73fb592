// Multi-scale deformable attention, CPU build: float32 and float64, OpenMP threads (as many as
// torch.get_num_threads()). The arithmetic is msda.h's, the same the CUDA build runs.
//
// forward:  parallel over query x head; each output row is written by one thread, in a fixed order.
// backward: parallel over batch x head; thread (n, m) walks the queries in order and owns
//           grad_value[n, :, m, :] (every sample of head m of image n reads only those rows), and
//           the gradients of its own locations and weights. No two threads write one element and
//           every sum runs in one fixed order, so the backward is deterministic, bit for bit, at any
//           thread count; the `deterministic` flag has nothing to change here.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <tuple>

#include "msda_host.h"

namespace msda {
namespace {

struct PlainAdd {
  template <typename T>
  void operator()(T* p, T v) const { *p += v; }
};

int threads_for(int64_t work) {
  const int64_t n = at::get_num_threads();
  return static_cast<int>(work < n ? (work < 1 ? 1 : work) : n);
}

template <typename scalar_t>
void forward_cpu(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims d,
                 const Levels lv) {
  const int64_t rows = d.N * d.Lq * d.M, token_stride = d.M * d.D;
  const int D = static_cast<int>(d.D);
#pragma omp parallel for schedule(static) num_threads(threads_for(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = i % d.M, n = i / (d.Lq * d.M);
    const scalar_t* head = value + n * d.S * token_stride + m * d.D;
    scalar_t* o = out + i * d.D;  // (N, Lq, M * D): query-head i owns D consecutive outputs
    for (int c = 0; c < D; ++c) o[c] = scalar_t(0);
    for (int64_t l = 0; l < d.L; ++l) {
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t j = sample_index(d, i, l, p);
        Bilinear<scalar_t> b;
        if (bilinear(loc[2 * j], loc[2 * j + 1], lv.height[l], lv.width[l], lv.start[l], b)) {
          accumulate_sample(head, token_stride, b, attn[j], o, D, UnitStride{});
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_cpu(const scalar_t* grad, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                  scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, const Dims d, const Levels lv) {
  const int64_t owners = d.N * d.M, token_stride = d.M * d.D;
  const int D = static_cast<int>(d.D);
#pragma omp parallel for schedule(static) num_threads(threads_for(owners))
  for (int64_t nm = 0; nm < owners; ++nm) {
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
