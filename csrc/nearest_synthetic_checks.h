// Argument checks shared by the CPU and CUDA kernels of fastdd::nearest_synthetic. The Python entry point
// validates first with friendlier messages; these guard direct torch.ops.fastdd callers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastdd {

inline void check_nearest_synthetic_inputs(const at::Tensor& points, const at::Tensor& centers) {
  TORCH_CHECK(points.dim() == 2, "nearest_synthetic: points must be 2-D [N, D], got shape ", points.sizes());
  TORCH_CHECK(centers.dim() == 2, "nearest_synthetic: centers must be 2-D [M, D], got shape ", centers.sizes());
  TORCH_CHECK(points.size(1) == centers.size(1), "nearest_synthetic: points ", points.sizes(), " and centers ",
              centers.sizes(), " must have the same feature size D");
  TORCH_CHECK(centers.size(0) >= 1, "nearest_synthetic: needs at least one center, got shape ", centers.sizes());
  TORCH_CHECK(points.scalar_type() == centers.scalar_type(), "nearest_synthetic: points (", points.scalar_type(),
              ") and centers (", centers.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(points.device() == centers.device(), "nearest_synthetic: points (", points.device(),
              ") and centers (", centers.device(), ") must be on the same device");
}

// Group labels: both or neither; int64 vectors of N and M entries on the device of points.
inline void check_nearest_synthetic_inputs(const at::Tensor& points, const at::Tensor& centers,
                                           const std::optional<at::Tensor>& point_groups,
                                           const std::optional<at::Tensor>& center_groups) {
  check_nearest_synthetic_inputs(points, centers);
  TORCH_CHECK(point_groups.has_value() == center_groups.has_value(),
              "nearest_synthetic: pass both point_groups and center_groups, or neither");
  if (!point_groups.has_value()) {
    return;
  }
  TORCH_CHECK(point_groups->dim() == 1 && point_groups->size(0) == points.size(0),
              "nearest_synthetic: point_groups must have shape [", points.size(0), "], got ", point_groups->sizes());
  TORCH_CHECK(center_groups->dim() == 1 && center_groups->size(0) == centers.size(0),
              "nearest_synthetic: center_groups must have shape [", centers.size(0), "], got ",
              center_groups->sizes());
  TORCH_CHECK(point_groups->scalar_type() == at::kLong && center_groups->scalar_type() == at::kLong,
              "nearest_synthetic: point_groups and center_groups must be int64, got ", point_groups->scalar_type(),
              " and ", center_groups->scalar_type());
  TORCH_CHECK(point_groups->device() == points.device() && center_groups->device() == points.device(),
              "nearest_synthetic: point_groups and center_groups must be on ", points.device());
}

inline void check_nearest_synthetic_backward_inputs(const at::Tensor& grad_sq_dist, const at::Tensor& points,
                                                    const at::Tensor& centers, const at::Tensor& index) {
  check_nearest_synthetic_inputs(points, centers);
  TORCH_CHECK(grad_sq_dist.dim() == 1 && grad_sq_dist.size(0) == points.size(0),
              "nearest_synthetic_backward: grad_sq_dist must have shape [", points.size(0), "], got ",
              grad_sq_dist.sizes());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == points.size(0),
              "nearest_synthetic_backward: index must have shape [", points.size(0), "], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "nearest_synthetic_backward: index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(grad_sq_dist.scalar_type() == points.scalar_type(),
              "nearest_synthetic_backward: grad_sq_dist (", grad_sq_dist.scalar_type(), ") must have the dtype of points (",
              points.scalar_type(), ")");
  TORCH_CHECK(grad_sq_dist.device() == points.device() && index.device() == points.device(),
              "nearest_synthetic_backward: all tensors must be on ", points.device());
}

}  // namespace fastdd
