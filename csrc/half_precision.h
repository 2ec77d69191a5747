// The dtype rule shared by the kernels of every fastdd op: bfloat16 and float16 tensors are loaded, computed on and
// accumulated in float32, and stored in their own dtype; float32 and float64 tensors are computed on as they are.
#pragma once

#include <ATen/ATen.h>

namespace fastdd {

// bfloat16 or float16 (not the float8 types, which no fastdd kernel takes).
inline bool is_half_precision(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The dtype a kernel computes and accumulates in for tensors of `dtype`: float32 for a half-precision one.
inline at::ScalarType compute_dtype(at::ScalarType dtype) { return is_half_precision(dtype) ? at::kFloat : dtype; }

// float32, float64, bfloat16 or float16: the dtypes the kernels are compiled for.
inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || is_half_precision(dtype);
}

}  // namespace fastdd
