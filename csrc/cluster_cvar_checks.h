// Argument checks and the tail-size rule shared by the kernels of fastdd::cluster_cvar. The Python entry point
// validates first with friendlier messages; these guard direct torch.ops.fastdd callers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastdd {

// ceil(alpha * count), with alpha * count that is an integer up to rounding (0.7 * 10) counted as that integer, and
// at least 1. Mirrored by fastdd.ops.cvar.tail_size.
inline int64_t cvar_tail_size(int64_t count, double alpha) {
  const auto k = static_cast<int64_t>(std::ceil(alpha * static_cast<double>(count) - 1e-9));
  return std::min(count, std::max<int64_t>(1, k));
}

inline void check_cluster_cvar_inputs(const at::Tensor& losses, const at::Tensor& assign, int64_t num_clusters,
                                      double alpha) {
  TORCH_CHECK(losses.dim() == 1, "cluster_cvar: losses must be 1-D [N], got shape ", losses.sizes());
  TORCH_CHECK(at::isFloatingType(losses.scalar_type()), "cluster_cvar: losses must be floating point, got ",
              losses.scalar_type());
  TORCH_CHECK(assign.dim() == 1 && assign.size(0) == losses.size(0), "cluster_cvar: assign must have shape [",
              losses.size(0), "], got ", assign.sizes());
  TORCH_CHECK(assign.scalar_type() == at::kLong, "cluster_cvar: assign must be int64, got ", assign.scalar_type());
  TORCH_CHECK(assign.device() == losses.device(), "cluster_cvar: losses (", losses.device(), ") and assign (",
              assign.device(), ") must be on the same device");
  TORCH_CHECK(num_clusters >= 1, "cluster_cvar: num_clusters must be at least 1, got ", num_clusters);
  TORCH_CHECK(alpha > 0.0 && alpha <= 1.0, "cluster_cvar: alpha must be in (0, 1], got ", alpha);
}

}  // namespace fastdd
