// Host-side argument checks, shared by the CPU and the CUDA builds: the tensors' dimensions and
// sizes, the level shapes (a flat list h0, w0, h1, w1, ...) against S, one dtype and device.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "msda.h"

namespace msda {

inline std::pair<Dims, Levels> check_inputs(const at::Tensor& value, at::IntArrayRef shapes,
                                            const at::Tensor& locations, const at::Tensor& weights) {
  TORCH_CHECK(value.dim() == 4, "msda: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(locations.dim() == 6 && locations.size(5) == 2,
              "msda: sampling_locations must be (N, Lq, M, L, P, 2), got ", locations.sizes());
  TORCH_CHECK(weights.dim() == 5, "msda: attention_weights must be (N, Lq, M, L, P), got ", weights.sizes());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3),
         locations.size(1), locations.size(3), locations.size(4)};
  TORCH_CHECK(locations.size(0) == d.N && locations.size(2) == d.M,
              "msda: sampling_locations ", locations.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(weights.sizes() == locations.sizes().slice(0, 5),
              "msda: attention_weights ", weights.sizes(), " do not match sampling_locations ", locations.sizes());
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * d.L,
              "msda: ", shapes.size() / 2, " spatial shapes for ", d.L, " sampled levels");
  TORCH_CHECK(d.L <= kMaxLevels, "msda: at most ", kMaxLevels, " levels, got ", d.L);
  TORCH_CHECK(value.scalar_type() == locations.scalar_type() && value.scalar_type() == weights.scalar_type(),
              "msda: value, sampling_locations and attention_weights must have one dtype, got ",
              value.scalar_type(), ", ", locations.scalar_type(), ", ", weights.scalar_type());
  TORCH_CHECK(value.device() == locations.device() && value.device() == weights.device(),
              "msda: all inputs must be on one device");
  Levels lv{};
  lv.count = static_cast<int>(d.L);
  int64_t start = 0;
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0 && h * w < (int64_t(1) << 31), "msda: bad level shape (", h, ", ", w, ")");
    lv.height[l] = static_cast<int>(h);
    lv.width[l] = static_cast<int>(w);
    lv.start[l] = start;
    start += h * w;
  }
  TORCH_CHECK(start == d.S, "msda: the spatial shapes cover ", start, " tokens, value has S = ", d.S);
  return {d, lv};
}

}  // namespace msda
