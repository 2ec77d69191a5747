// CPU kernels of fastdd::instance_norm_relu_pool and of its first and second derivatives.
//
// Per (image, channel) feature map of M = H * W values, with z = (x - mean) * rstd, a = weight * z + bias:
//   y = pool(relu(a)),   pool = 2x2 average (floor: a trailing odd row / column is dropped) or the identity.
// Each map is independent and small (at most a few thousand values, resident in L1/L2), so maps run in parallel
// and every kernel makes two to four passes over its map. Nothing of size M is saved between calls except x
// itself: z and the ReLU mask are recomputed from x, mean and rstd, so a block saves its conv output plus two
// numbers per map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "../instance_norm_relu_pool_checks.h"

namespace fastdd {
namespace {

// Each per-map loop below is written so the compiler vectorises it (omp simd for the reductions), and compiled
// twice: for AVX2 + FMA, and for the baseline x86-64 the wheel targets; the loader picks one for the CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTDD_VECTORISED __attribute__((target_clones("arch=haswell", "default")))
#else
#define FASTDD_VECTORISED
#endif

// The feature-map geometry: H x W maps, and whether a 2x2 average pool (floor) follows.
struct MapShape {
  int64_t height, width;
  bool pool;

  int64_t size() const { return height * width; }
  int64_t out_height() const { return pool ? height / 2 : height; }
  int64_t out_width() const { return pool ? width / 2 : width; }
  int64_t out_size() const { return out_height() * out_width(); }
};

// out = pool(full): the 2x2 average (or a copy without pooling). full [H * W] -> out [out_size].
template <typename T>
FASTDD_VECTORISED void pool_map(const T* full, const MapShape& shape, T* out) {
  if (!shape.pool) {
    std::copy(full, full + shape.size(), out);
    return;
  }
  const int64_t width = shape.width, out_width = shape.out_width();
  for (int64_t row = 0; row < shape.out_height(); ++row) {
    const T* top = full + 2 * row * width;
    const T* bottom = top + width;
    T* o = out + row * out_width;
#pragma omp simd
    for (int64_t col = 0; col < out_width; ++col) {
      o[col] = T(0.25) * ((top[2 * col] + top[2 * col + 1]) + (bottom[2 * col] + bottom[2 * col + 1]));
    }
  }
}

// full = pool^T(out): the adjoint of pool_map (each pooled value spread as 1/4 over its 2x2 cell; dropped rows and
// columns get 0). out [out_size] -> full [H * W].
template <typename T>
FASTDD_VECTORISED void unpool_map(const T* out, const MapShape& shape, T* full) {
  if (!shape.pool) {
    std::copy(out, out + shape.size(), full);
    return;
  }
  const int64_t width = shape.width, out_width = shape.out_width();
  std::fill(full, full + shape.size(), T(0));
  for (int64_t row = 0; row < shape.out_height(); ++row) {
    const T* o = out + row * out_width;
    T* top = full + 2 * row * width;
    T* bottom = top + width;
#pragma omp simd
    for (int64_t col = 0; col < out_width; ++col) {
      const T value = T(0.25) * o[col];
      top[2 * col] = value;
      top[2 * col + 1] = value;
      bottom[2 * col] = value;
      bottom[2 * col + 1] = value;
    }
  }
}

// Mean and 1 / sqrt(biased variance + eps) of one map, two passes (no cancellation).
template <typename T>
FASTDD_VECTORISED void map_statistics(const T* x, int64_t size, double eps, T& mean, T& rstd) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < size; ++k) sum += x[k];
  const T mu = sum / static_cast<T>(size);
  T squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t k = 0; k < size; ++k) squares += (x[k] - mu) * (x[k] - mu);
  mean = mu;
  rstd = static_cast<T>(1.0 / std::sqrt(static_cast<double>(squares) / static_cast<double>(size) + eps));
}

// activation = relu(weight * (x - mean) * rstd + bias) over one map.
template <typename T>
FASTDD_VECTORISED void normalised_relu(const T* x, int64_t size, T mean, T rstd, T weight, T bias, T* activation) {
#pragma omp simd
  for (int64_t k = 0; k < size; ++k) {
    const T a = weight * ((x[k] - mean) * rstd) + bias;
    activation[k] = a > T(0) ? a : T(0);
  }
}

// grad_a = mask * grad_full (in place) with mask = [weight * z + bias > 0], z = (x - mean) * rstd; returns
// (sum grad_a, sum grad_a * z).
template <typename T>
FASTDD_VECTORISED std::pair<T, T> masked_gradient(const T* x, int64_t size, T mean, T rstd, T weight, T bias,
                                                  T* grad) {
  T sum_ga = 0, sum_gaz = 0;
#pragma omp simd reduction(+ : sum_ga, sum_gaz)
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - mean) * rstd;
    const T ga = weight * z + bias > T(0) ? grad[k] : T(0);
    grad[k] = ga;
    sum_ga += ga;
    sum_gaz += ga * z;
  }
  return {sum_ga, sum_gaz};
}

// out = scale * (v - mean_v - z * mean_vz) - extra * z with z = (x - mean) * rstd: with scale = rstd, the
// normalisation's Jacobian L applied to v (plus a z term).
template <typename T>
FASTDD_VECTORISED void normalisation_jacobian(const T* x, const T* v, int64_t size, T mean, T rstd, T scale,
                                              T mean_v, T mean_vz, T extra, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - mean) * rstd;
    out[k] = scale * (v[k] - mean_v - z * mean_vz) - extra * z;
  }
}

template <typename T>
void forward_kernel(const T* x, const T* weight, const T* bias, double eps, int64_t batch, int64_t channels,
                    const MapShape& shape, T* y, T* mean_out, T* rstd_out) {
  const int64_t size = shape.size(), out_size = shape.out_size();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> activation(size);
    for (int64_t map = begin; map < end; ++map) {
      const int64_t c = map % channels;
      map_statistics(x + map * size, size, eps, mean_out[map], rstd_out[map]);
      normalised_relu(x + map * size, size, mean_out[map], rstd_out[map], weight[c], bias[c], activation.data());
      pool_map(activation.data(), shape, y + map * out_size);
    }
  });
}

template <typename T>
void backward_kernel(const T* grad_y, const T* x, const T* weight, const T* bias, const T* mean, const T* rstd,
                     int64_t batch, int64_t channels, const MapShape& shape, T* grad_x, T* grad_weight_part,
                     T* grad_bias_part) {
  const int64_t size = shape.size(), out_size = shape.out_size();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grad_a(size);
    for (int64_t map = begin; map < end; ++map) {
      const T* xm = x + map * size;
      const int64_t c = map % channels;
      const T m = mean[map], r = rstd[map], w = weight[c];
      unpool_map(grad_y + map * out_size, shape, grad_a.data());
      const auto [sum_ga, sum_gaz] = masked_gradient(xm, size, m, r, w, bias[c], grad_a.data());
      grad_weight_part[map] = sum_gaz;
      grad_bias_part[map] = sum_ga;
      // grad_z = w * grad_a, grad_x = L(grad_z); L is linear, so scale after: L(w * grad_a) = w * L(grad_a).
      const T n = static_cast<T>(size);
      normalisation_jacobian(xm, grad_a.data(), size, m, r, r * w, sum_ga / n, sum_gaz / n, T(0), grad_x + map * size);
    }
  });
}

// out = mask * (w * u + gg_weight * z + gg_bias) with u = rstd * (gg_x - mean_g - z * mean_gz): the full-size
// gradient w.r.t. grad_a, before the pooling adjoint.
template <typename T>
FASTDD_VECTORISED void grad_grad_y_full(const T* x, const T* ggx, int64_t size, T m, T r, T w, T b, T ggw, T ggb,
                                        T mean_g, T mean_gz, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - m) * r;
    const T u = r * (ggx[k] - mean_g - z * mean_gz);
    out[k] = w * z + b > T(0) ? w * u + ggw * z + ggb : T(0);
  }
}

// Derivatives of <gg_x, grad_x> + <gg_weight, grad_weight> + <gg_bias, grad_bias> (the outputs of backward_kernel)
// with respect to grad_y, x and weight. With L(v) = rstd * (v - mean(v) - z * mean(v * z)) (symmetric, and the
// Jacobian of z with respect to x), grad_a = mask * unpool(grad_y) and grad_z = weight * grad_a:
//   u = L(gg_x);  d/d grad_y = pool(mask * (weight * u + gg_weight * z + gg_bias));  d/d weight = sum(u * grad_a);
//   d/d x = L(t) - rstd^2 * q * z / M  with  t = gg_weight * grad_a - rstd * (gg_x * mean(grad_z * z)
//           + mean(gg_x * z) * grad_z)  and  q = <gg_x, grad_z - mean(grad_z) - z * mean(grad_z * z)>.
// The ReLU mask is piecewise constant, so bias gets no second-order gradient.
template <typename T>
FASTDD_VECTORISED void double_backward_map(const T* gy, const T* x, const T* ggx, T m, T r, T w, T b, T ggw, T ggb,
                                           const MapShape& shape, T* grad_a, T* scratch, T* grad_grad_y,
                                           T* grad_x, T& grad_weight_part) {
  const int64_t size = shape.size();
  const T n = static_cast<T>(size);
  unpool_map(gy, shape, grad_a);
  T sum_ga = 0, sum_gaz = 0, sum_g = 0, sum_gz = 0, sum_gga = 0;
#pragma omp simd reduction(+ : sum_ga, sum_gaz, sum_g, sum_gz, sum_gga)
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - m) * r;
    const T ga = w * z + b > T(0) ? grad_a[k] : T(0);
    const T g = ggx[k];
    grad_a[k] = ga;
    sum_ga += ga;
    sum_gaz += ga * z;
    sum_g += g;
    sum_gz += g * z;
    sum_gga += g * ga;
  }
  const T mean_gz = w * sum_ga / n, mean_gzz = w * sum_gaz / n, mean_g = sum_g / n, mean_gzx = sum_gz / n;
  const T q = w * sum_gga - mean_gz * sum_g - mean_gzz * sum_gz;
  // scratch = t; sums for L(t), and <u, grad_a> for weight.
  T sum_t = 0, sum_tz = 0, sum_uga = 0;
#pragma omp simd reduction(+ : sum_t, sum_tz, sum_uga)
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - m) * r;
    const T g = ggx[k];
    const T u = r * (g - mean_g - z * mean_gzx);
    sum_uga += u * grad_a[k];
    const T t = ggw * grad_a[k] - r * (g * mean_gzz + mean_gzx * w * grad_a[k]);
    scratch[k] = t;
    sum_t += t;
    sum_tz += t * z;
  }
  grad_weight_part = sum_uga;
  normalisation_jacobian(x, scratch, size, m, r, r, sum_t / n, sum_tz / n, r * r * q / n, grad_x);
  grad_grad_y_full(x, ggx, size, m, r, w, b, ggw, ggb, mean_g, mean_gzx, scratch);
  pool_map(scratch, shape, grad_grad_y);
}

template <typename T>
void double_backward_kernel(const T* grad_y, const T* x, const T* weight, const T* bias, const T* mean,
                            const T* rstd, const T* gg_x, const T* gg_weight, const T* gg_bias, int64_t batch,
                            int64_t channels, const MapShape& shape, T* grad_grad_y, T* grad_x, T* grad_weight_part) {
  const int64_t size = shape.size(), out_size = shape.out_size();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grad_a(size), scratch(size);
    for (int64_t map = begin; map < end; ++map) {
      const int64_t c = map % channels;
      double_backward_map(grad_y + map * out_size, x + map * size, gg_x + map * size, mean[map],
                          rstd[map], weight[c], bias[c], gg_weight ? gg_weight[c] : T(0),
                          gg_bias ? gg_bias[c] : T(0), shape, grad_a.data(), scratch.data(),
                          grad_grad_y + map * out_size, grad_x + map * size, grad_weight_part[map]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_cpu(const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps,
                                                                           bool pool) {
  check_instance_norm_relu_pool_inputs(x, weight, bias, "instance_norm_relu_pool");
  const auto input = x.contiguous();
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  auto y = at::empty({batch, channels, map.out_height(), map.out_width()}, input.options());
  auto mean = at::empty({batch, channels}, input.options());
  auto rstd = at::empty({batch, channels}, input.options());
  const auto w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "instance_norm_relu_pool_cpu", [&] {
    forward_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             b.const_data_ptr<scalar_t>(), eps, batch, channels, map, y.mutable_data_ptr<scalar_t>(),
                             mean.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool pool) {
  check_instance_norm_relu_pool_inputs(x, weight, bias, "instance_norm_relu_pool_backward");
  check_instance_norm_relu_pool_state(grad_y, x, mean, rstd, pool, "instance_norm_relu_pool_backward");
  const auto input = x.contiguous(), gy = grad_y.contiguous();
  const auto w = weight.contiguous(), b = bias.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  auto grad_x = at::empty_like(input);
  auto weight_part = at::empty({batch, channels}, input.options());
  auto bias_part = at::empty({batch, channels}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "instance_norm_relu_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                              mu.const_data_ptr<scalar_t>(), rs.const_data_ptr<scalar_t>(), batch, channels, map,
                              grad_x.mutable_data_ptr<scalar_t>(), weight_part.mutable_data_ptr<scalar_t>(),
                              bias_part.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, weight_part.sum(0), bias_part.sum(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_double_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& gg_x,
    const std::optional<at::Tensor>& gg_weight, const std::optional<at::Tensor>& gg_bias, bool pool) {
  const char* name = "instance_norm_relu_pool_double_backward";
  check_instance_norm_relu_pool_inputs(x, weight, bias, name);
  check_instance_norm_relu_pool_state(grad_y, x, mean, rstd, pool, name);
  check_instance_norm_relu_pool_grads(x, weight, gg_x, gg_weight, gg_bias, name);
  const auto input = x.contiguous(), gy = grad_y.contiguous();
  const auto w = weight.contiguous(), b = bias.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  // A missing gg_x is zeros: materialising them keeps the per-map loops free of branches, so they vectorise.
  const auto ggx = gg_x.has_value() ? gg_x->contiguous() : at::zeros_like(input);
  const auto ggw = gg_weight.has_value() ? gg_weight->contiguous() : at::Tensor();
  const auto ggb = gg_bias.has_value() ? gg_bias->contiguous() : at::Tensor();
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  auto grad_grad_y = at::empty_like(gy);
  auto grad_x = at::empty_like(input);
  auto weight_part = at::empty({batch, channels}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "instance_norm_relu_pool_double_backward_cpu", [&] {
    double_backward_kernel<scalar_t>(
        gy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(), rs.const_data_ptr<scalar_t>(),
        ggx.const_data_ptr<scalar_t>(),
        ggw.defined() ? ggw.const_data_ptr<scalar_t>() : nullptr,
        ggb.defined() ? ggb.const_data_ptr<scalar_t>() : nullptr, batch, channels, map,
        grad_grad_y.mutable_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        weight_part.mutable_data_ptr<scalar_t>());
  });
  return {grad_grad_y, grad_x, weight_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("instance_norm_relu_pool", &instance_norm_relu_pool_cpu);
  m.impl("instance_norm_relu_pool_backward", &instance_norm_relu_pool_backward_cpu);
  m.impl("instance_norm_relu_pool_double_backward", &instance_norm_relu_pool_double_backward_cpu);
}

}  // namespace fastdd
