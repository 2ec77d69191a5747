// CUDA kernels of fastdd::nearest_synthetic and its backward.
//
// Forward: one warp per point. The lanes stride over the features, accumulate squared differences to one center,
// and a butterfly shuffle leaves the full sum in every lane (the pairwise sums are commutative, so all lanes agree
// bit for bit and take the same branch). The warps of a block read the same center rows, which stay in L1/L2.
// With group labels a warp skips the centers of other groups (M is small: the labels cost one load per center);
// a point whose group has no center keeps index -1, which the host turns into a ValueError naming the group.
// Backward: one thread per (point, feature); grad_centers is accumulated with atomics (order not deterministic).
// bfloat16 and float16 inputs are loaded as they are and computed on in float32 (at::opmath_type): distances are
// summed in float32 and stored in the inputs' dtype, and grad_centers is accumulated in a float32 buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../half_precision.h"
#include "../nearest_synthetic_checks.h"

namespace fastdd {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kBackwardThreads = 256;

template <typename T>
__global__ void nearest_synthetic_kernel(const T* __restrict__ points, const T* __restrict__ centers,
                                         const int64_t* __restrict__ point_groups,
                                         const int64_t* __restrict__ center_groups, int64_t num_points,
                                         int64_t num_centers, int64_t dim, T* __restrict__ sq_dist,
                                         int64_t* __restrict__ index) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_points) {
    return;  // whole warps leave together, so the shuffles below always see 32 active lanes
  }
  using A = at::opmath_type<T>;  // float for bfloat16 and float16
  const T* p = points + row * dim;
  // NaN distances are ranked as -inf so the first NaN wins, as in torch.argmin; real distances are never -inf.
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool grouped = point_groups != nullptr;
  const int64_t group = grouped ? point_groups[row] : 0;
  A best_key = std::numeric_limits<A>::infinity();
  int64_t best_index = -1;
  for (int64_t center = 0; center < num_centers; ++center) {
    if (grouped && center_groups[center] != group) {
      continue;  // the same for every lane of the warp
    }
    const T* c = centers + center * dim;
    A acc = 0;
    for (int64_t k = lane; k < dim; k += kWarpSize) {
      const A d = static_cast<A>(p[k]) - static_cast<A>(c[k]);
      acc += d * d;
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    const T key = isnan(acc) ? neg_inf : acc;
    if (best_index < 0 || key < best_key) {  // strict: ties keep the lowest center
      best_key = key;
      best_index = center;
    }
  }
  if (lane == 0) {
    sq_dist[row] = static_cast<T>(best_key == neg_inf ? std::numeric_limits<A>::quiet_NaN() : best_key);
    index[row] = best_index;
  }
}

// grad_centers is A = at::opmath_type<T> (a float32 buffer for half-precision T).
template <typename T, typename A>
__global__ void nearest_synthetic_backward_kernel(const T* __restrict__ grad, const T* __restrict__ points,
                                                  const T* __restrict__ centers, const int64_t* __restrict__ index,
                                                  int64_t num_points, int64_t num_centers, int64_t dim,
                                                  T* __restrict__ grad_points, A* __restrict__ grad_centers) {
  const int64_t total = num_points * dim;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total; flat += stride) {
    const int64_t row = flat / dim;
    const int64_t k = flat - row * dim;
    const int64_t center = index[row];
    CUDA_KERNEL_ASSERT(center >= 0 && center < num_centers);
    const A g = A(2) * static_cast<A>(grad[row]) *
                (static_cast<A>(points[flat]) - static_cast<A>(centers[center * dim + k]));
    grad_points[flat] = static_cast<T>(g);
    atomicAdd(grad_centers + center * dim + k, -g);
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_synthetic_cuda(const at::Tensor& points, const at::Tensor& centers,
                                                          const std::optional<at::Tensor>& point_groups,
                                                          const std::optional<at::Tensor>& center_groups) {
  check_nearest_synthetic_inputs(points, centers, point_groups, center_groups);
  const c10::cuda::CUDAGuard device_guard(points.device());
  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  const int64_t num_points = p.size(0);
  const int64_t num_centers = c.size(0);
  const int64_t dim = p.size(1);
  at::Tensor sq_dist = at::empty({num_points}, p.options());
  at::Tensor index = at::empty({num_points}, p.options().dtype(at::kLong));
  if (num_points == 0) {
    return {sq_dist, index};
  }
  const bool grouped = point_groups.has_value();
  const at::Tensor pg = grouped ? point_groups->contiguous() : at::Tensor();
  const at::Tensor cg = grouped ? center_groups->contiguous() : at::Tensor();
  const int64_t blocks = (num_points + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "nearest_synthetic_cuda", [&] {
    nearest_synthetic_kernel<scalar_t><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        p.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
        grouped ? pg.const_data_ptr<int64_t>() : nullptr, grouped ? cg.const_data_ptr<int64_t>() : nullptr,
        num_points, num_centers, dim, sq_dist.mutable_data_ptr<scalar_t>(), index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (grouped) {
    const at::Tensor orphans = (index < 0).nonzero();
    if (orphans.size(0) > 0) {
      const int64_t row = orphans[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "nearest_synthetic: point ", row, " is in group ", pg[row].item<int64_t>(),
                        ", which has no center; every group in point_groups needs at least one center in ",
                        "center_groups");
    }
  }
  return {sq_dist, index};
}

std::tuple<at::Tensor, at::Tensor> nearest_synthetic_backward_cuda(const at::Tensor& grad_sq_dist,
                                                                   const at::Tensor& points,
                                                                   const at::Tensor& centers,
                                                                   const at::Tensor& index) {
  check_nearest_synthetic_backward_inputs(grad_sq_dist, points, centers, index);
  const c10::cuda::CUDAGuard device_guard(points.device());
  const at::Tensor g = grad_sq_dist.contiguous();
  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t num_points = p.size(0);
  const int64_t dim = p.size(1);
  at::Tensor grad_points = at::empty_like(p);
  at::Tensor grad_centers = at::zeros_like(c, c.options().dtype(compute_dtype(c.scalar_type())));
  const int64_t total = num_points * dim;
  if (total == 0) {
    return {grad_points, grad_centers.to(c.scalar_type())};
  }
  const int64_t max_blocks = 65535;
  const int64_t blocks = std::min<int64_t>(max_blocks, (total + kBackwardThreads - 1) / kBackwardThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "nearest_synthetic_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    nearest_synthetic_backward_kernel<scalar_t, A><<<blocks, kBackwardThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
        idx.const_data_ptr<int64_t>(), num_points, c.size(0), dim, grad_points.mutable_data_ptr<scalar_t>(),
        grad_centers.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_points, grad_centers.to(c.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CUDA, m) {
  m.impl("nearest_synthetic", &nearest_synthetic_cuda);
  m.impl("nearest_synthetic_backward", &nearest_synthetic_backward_cuda);
}

}  // namespace fastdd
