// Argument checks shared by the kernels of fastdd::instance_norm_relu_pool and its derivatives. The Python entry
// point validates first with friendlier messages; these guard direct torch.ops.fastdd callers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastdd {

inline void check_instance_norm_relu_pool_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& bias, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty feature map, got shape ", x.sizes());
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": weight and bias must be [", x.size(1),
                "], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": weight and bias must have x's dtype and device");
  }
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
  for (const at::Tensor* t : {&grad_y, &mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": grad_y, mean and rstd must have x's dtype and device");
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
      TORCH_CHECK((*t)->sizes() == weight.sizes() && (*t)->scalar_type() == x.scalar_type(), op,
                  ": gg_weight and gg_bias must match weight, got ", (*t)->sizes());
    }
  }
}

}  // namespace fastdd
