// Argument checks shared by the kernels of fastdd::instance_norm_relu_pool and its derivatives. The Python entry
// point validates first with friendlier messages; these guard direct torch.ops.fastdd callers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "half_precision.h"

namespace fastdd {

// dtypes: x is float32, float64, bfloat16 or float16; weight and bias share one dtype, x's or, for a bfloat16 or
// float16 x, float32 (autocast's half-precision activations with float32 parameters). mean and rstd are in the
// statistics dtype (float32 for a half-precision x, else x's); grad_y, gg_x and the gradients of x's shape are in
// x's dtype, gg_weight, gg_bias and the per-channel gradients in weight's.
inline at::ScalarType instance_norm_relu_pool_stats_dtype(const at::Tensor& x) {
  return compute_dtype(x.scalar_type());
}

inline void check_instance_norm_relu_pool_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& bias, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty feature map, got shape ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  const bool half_x = is_half_precision(x.scalar_type());
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": weight and bias must be [", x.size(1),
                "], got shape ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), op, ": weight and bias must be on x's device");
  }
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type() &&
                  (weight.scalar_type() == x.scalar_type() || (half_x && weight.scalar_type() == at::kFloat)),
              op, ": weight and bias must have x's dtype (or float32 for a bfloat16 or float16 x), got x ",
              x.scalar_type(), ", weight ", weight.scalar_type(), ", bias ", bias.scalar_type());
}

inline void check_instance_norm_relu_pool_state(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& mean, const at::Tensor& rstd, bool pool,
                                                const char* op) {
  const int64_t out_h = pool ? x.size(2) / 2 : x.size(2), out_w = pool ? x.size(3) / 2 : x.size(3);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == x.size(0) && grad_y.size(1) == x.size(1) &&
                  grad_y.size(2) == out_h && grad_y.size(3) == out_w,
              op, ": grad_y must be [", x.size(0), ", ", x.size(1), ", ", out_h, ", ", out_w, "], got ",
              grad_y.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(1), op,
                ": mean and rstd must be [", x.size(0), ", ", x.size(1), "], got ", t->sizes());
  }
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(), op,
              ": grad_y must have x's dtype and device");
  const at::ScalarType stats = instance_norm_relu_pool_stats_dtype(x);
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == stats && t->device() == x.device(), op, ": mean and rstd must be ", stats,
                " on x's device, got ", t->scalar_type());
  }
}

inline void check_instance_norm_relu_pool_grads(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& gg_x,
                                                const std::optional<at::Tensor>& gg_weight,
                                                const std::optional<at::Tensor>& gg_bias, const char* op) {
  if (gg_x.has_value()) {
    TORCH_CHECK(gg_x->sizes() == x.sizes() && gg_x->scalar_type() == x.scalar_type(), op,
                ": gg_x must match x, got ", gg_x->sizes());
  }
  for (const std::optional<at::Tensor>* t : {&gg_weight, &gg_bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->sizes() == weight.sizes() && (*t)->scalar_type() == weight.scalar_type(), op,
                  ": gg_weight and gg_bias must match weight, got ", (*t)->sizes(), " ", (*t)->scalar_type());
    }
  }
}

}  // namespace fastdd
