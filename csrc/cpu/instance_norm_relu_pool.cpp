// CPU kernels of fastdd::instance_norm_relu_pool and of its first and second derivatives.
//
// Per (image, channel) feature map of M = H * W values, with z = (x - mean) * rstd, a = weight * z + bias:
//   y = pool(relu(a)),   pool = 2x2 average (floor: a trailing odd row / column is dropped) or the identity.
// Each map is independent and small (at most a few thousand values, resident in L1/L2), so maps run in parallel
// and every kernel makes two to four passes over its map. Nothing of size M is saved between calls except x
// itself: z and the ReLU mask are recomputed from x, mean and rstd, so a block saves its conv output plus two
// numbers per map.
//
// Half precision (autocast's activations): x, y, grad_y, gg_x and grad_x may be bfloat16 or float16, with weight and
// bias float32 or x's dtype. Each map is then widened to float32 once (in cache), computed on exactly as a float32
// map, and its results narrowed once, so the statistics and sums are float32 while memory traffic halves; mean and
// rstd are float32, and the per-channel gradients are summed in float32 and returned in weight's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../instance_norm_relu_pool_checks.h"
#include "simd.h"

namespace fastdd {
namespace {

// The per-map loops below are contiguous and branch-free (the ReLU mask is a select). All are inlined into one copy
// of each kernel's loop over maps per x86-64 level (run_maps): the elementwise ones vectorise by themselves, the
// ones that also sum are written on explicit vectors (map_sums), since GCC keeps omp simd reduction accumulators
// in memory.

// The sum of a Simd<T, Bytes> vector's lanes, adding its halves until one lane is left.
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE T sum_lanes(const typename Simd<T, Bytes>::type& value) {
  if constexpr (Simd<T, Bytes>::lanes == 1) {
    return load<T>(reinterpret_cast<const T*>(&value));
  } else {
    using Half = typename Simd<T, Bytes / 2>::type;
    const T* lanes = reinterpret_cast<const T*>(&value);
    return sum_lanes<T, Bytes / 2>(load<Half>(lanes) + load<Half>(lanes + Simd<T, Bytes>::lanes / 2));
  }
}

// The N sums over k in [0, size) of the terms body returns: body(P{}, k) handles the elements k, k + 1, ... that
// fit a P (a Simd<T, Bytes> vector, then T for the tail), may store results for them, and returns its N terms as
// P's. Sums run per lane, then add lanes (sum_lanes), then the tail, in a fixed order.
template <typename T, int Bytes, int N, typename Body>
FASTDD_ALWAYS_INLINE std::array<T, N> map_sums(int64_t size, const Body& body) {
  using V = typename Simd<T, Bytes>::type;
  constexpr int64_t lanes = Simd<T, Bytes>::lanes;
  std::array<V, N> acc{};
  int64_t k = 0;
  for (; k + lanes <= size; k += lanes) {
    const std::array<V, N> terms = body(V{}, k);
    for (int i = 0; i < N; ++i) acc[i] += terms[i];
  }
  std::array<T, N> total;
  for (int i = 0; i < N; ++i) total[i] = sum_lanes<T, Bytes>(acc[i]);
  for (; k < size; ++k) {
    const std::array<T, N> terms = body(T{}, k);
    for (int i = 0; i < N; ++i) total[i] += terms[i];
  }
  return total;
}

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
FASTDD_ALWAYS_INLINE void pool_map(const T* full, const MapShape& shape, T* out) {
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
FASTDD_ALWAYS_INLINE void unpool_map(const T* out, const MapShape& shape, T* full) {
  if (!shape.pool) {
    std::copy(out, out + shape.size(), full);
    return;
  }
  const int64_t width = shape.width, out_width = shape.out_width();
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
    if (width % 2 == 1) top[width - 1] = bottom[width - 1] = T(0);
  }
  std::fill(full + 2 * shape.out_height() * width, full + shape.size(), T(0));
}

// Mean and 1 / sqrt(biased variance + eps) of one map, two passes (no cancellation).
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE void map_statistics(const T* x, int64_t size, double eps, T& mean, T& rstd) {
  const auto [sum] = map_sums<T, Bytes, 1>(size, [&](auto pack, int64_t k) FASTDD_ALWAYS_INLINE_LAMBDA {
    using P = decltype(pack);
    return std::array<P, 1>{load<P>(x + k)};
  });
  const T mu = sum / static_cast<T>(size);
  const auto [squares] = map_sums<T, Bytes, 1>(size, [&](auto pack, int64_t k) FASTDD_ALWAYS_INLINE_LAMBDA {
    using P = decltype(pack);
    const P d = load<P>(x + k) - mu;
    return std::array<P, 1>{d * d};
  });
  mean = mu;
  rstd = static_cast<T>(1.0 / std::sqrt(static_cast<double>(squares) / static_cast<double>(size) + eps));
}

// activation = relu(weight * (x - mean) * rstd + bias) over one map.
template <typename T>
FASTDD_ALWAYS_INLINE void normalised_relu(const T* x, int64_t size, T mean, T rstd, T weight, T bias, T* activation) {
#pragma omp simd
  for (int64_t k = 0; k < size; ++k) {
    const T a = weight * ((x[k] - mean) * rstd) + bias;
    activation[k] = a > T(0) ? a : T(0);
  }
}

// grad_a = mask * grad_full (in place) with mask = [weight * z + bias > 0], z = (x - mean) * rstd; returns
// (sum grad_a, sum grad_a * z).
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE std::array<T, 2> masked_gradient(const T* x, int64_t size, T mean, T rstd, T weight, T bias,
                                                      T* grad) {
  return map_sums<T, Bytes, 2>(size, [&](auto pack, int64_t k) FASTDD_ALWAYS_INLINE_LAMBDA {
    using P = decltype(pack);
    const P z = (load<P>(x + k) - mean) * rstd;
    const P ga = weight * z + bias > P{} ? load<P>(grad + k) : P{};
    store(grad + k, ga);
    return std::array<P, 2>{ga, ga * z};
  });
}

// out = scale * (v - mean_v - z * mean_vz) with z = (x - mean) * rstd: with scale = rstd, the normalisation's
// Jacobian L applied to v.
template <typename T>
FASTDD_ALWAYS_INLINE void normalisation_jacobian(const T* x, const T* v, int64_t size, T mean, T rstd, T scale,
                                                 T mean_v, T mean_vz, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < size; ++k) {
    const T z = (x[k] - mean) * rstd;
    out[k] = scale * (v[k] - mean_v - z * mean_vz);
  }
}

// One compiled copy of a kernel's loop over maps per x86-64 level (AVX-512, AVX2, baseline SSE2), each with its own
// vector width; run_maps picks the widest the running CPU supports. kernel.run<Bytes>(begin, end) handles the maps
// [begin, end) and is inlined into each copy.
#if defined(__GNUC__) && defined(__x86_64__)
template <typename Kernel>
__attribute__((target("arch=x86-64-v4"))) void maps_avx512(const Kernel& kernel, int64_t begin, int64_t end) {
  kernel.template run<64>(begin, end);
}

template <typename Kernel>
__attribute__((target("arch=x86-64-v3"))) void maps_avx2(const Kernel& kernel, int64_t begin, int64_t end) {
  kernel.template run<32>(begin, end);
}
#endif

template <typename Kernel>
void maps_baseline(const Kernel& kernel, int64_t begin, int64_t end) {
  kernel.template run<16>(begin, end);
}

// kernel over all maps [0, maps), in parallel, with the copy for this CPU.
template <typename Kernel>
void run_maps(const Kernel& kernel, int64_t maps) {
  const SimdLevel level = simd_level_for_this_cpu();
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (level == SimdLevel::avx512) return maps_avx512(kernel, begin, end);
    if (level == SimdLevel::avx2) return maps_avx2(kernel, begin, end);
#endif
    maps_baseline(kernel, begin, end);
  });
}

// The kernels below are templated on the storage type S of x, y and the gradients of their shape; everything else
// (weight, bias, mean, rstd, the sums) is T = compute_t<S>. With S = bfloat16 or float16 each map is widened to
// float once (it stays in L1/L2), computed on as a float map, and the results are narrowed once: the map crosses
// memory at half the bytes of float32.
template <typename S>
struct ForwardMaps {
  using T = compute_t<S>;
  const S* x;
  const T *weight, *bias;
  double eps;
  int64_t channels;
  MapShape shape;
  S* y;
  T *mean, *rstd;

  template <int Bytes>
  FASTDD_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    constexpr bool widened = !std::is_same_v<S, T>;
    const int64_t size = shape.size(), out_size = shape.out_size();
    std::vector<T> activation(size), x_buffer(widened ? size : 0), y_buffer(widened ? out_size : 0);
    for (int64_t map = begin; map < end; ++map) {
      const int64_t c = map % channels;
      const T* xm = as_compute<Bytes>(x + map * size, size, x_buffer.data());
      map_statistics<T, Bytes>(xm, size, eps, mean[map], rstd[map]);
      normalised_relu(xm, size, mean[map], rstd[map], weight[c], bias[c], activation.data());
      T* ym = compute_target(y + map * out_size, y_buffer.data());
      pool_map(activation.data(), shape, ym);
      store_computed<Bytes>(ym, out_size, y + map * out_size);
    }
  }
};

template <typename S>
struct BackwardMaps {
  using T = compute_t<S>;
  const S *grad_y, *x;
  const T *weight, *bias, *mean, *rstd;
  int64_t channels;
  MapShape shape;
  S* grad_x;
  T *grad_weight_part, *grad_bias_part;

  template <int Bytes>
  FASTDD_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    constexpr bool widened = !std::is_same_v<S, T>;
    const int64_t size = shape.size(), out_size = shape.out_size();
    std::vector<T> grad_a(size), x_buffer(widened ? size : 0), grad_y_buffer(widened ? out_size : 0),
        grad_x_buffer(widened ? size : 0);
    for (int64_t map = begin; map < end; ++map) {
      const T* xm = as_compute<Bytes>(x + map * size, size, x_buffer.data());
      const int64_t c = map % channels;
      const T m = mean[map], r = rstd[map], w = weight[c];
      unpool_map(as_compute<Bytes>(grad_y + map * out_size, out_size, grad_y_buffer.data()), shape, grad_a.data());
      const auto [sum_ga, sum_gaz] = masked_gradient<T, Bytes>(xm, size, m, r, w, bias[c], grad_a.data());
      grad_weight_part[map] = sum_gaz;
      grad_bias_part[map] = sum_ga;
      // grad_z = w * grad_a, grad_x = L(grad_z); L is linear, so scale after: L(w * grad_a) = w * L(grad_a).
      const T n = static_cast<T>(size);
      T* gx = compute_target(grad_x + map * size, grad_x_buffer.data());
      normalisation_jacobian(xm, grad_a.data(), size, m, r, r * w, sum_ga / n, sum_gaz / n, gx);
      store_computed<Bytes>(gx, size, grad_x + map * size);
    }
  }
};

// Derivatives of <gg_x, grad_x> + <gg_weight, grad_weight> + <gg_bias, grad_bias> (the outputs of BackwardMaps)
// with respect to grad_y, x and weight. With L(v) = rstd * (v - mean(v) - z * mean(v * z)) (symmetric, and the
// Jacobian of z with respect to x), grad_a = mask * unpool(grad_y) and grad_z = weight * grad_a:
//   u = L(gg_x);  d/d grad_y = pool(mask * (weight * u + gg_weight * z + gg_bias));  d/d weight = sum(u * grad_a);
//   d/d x = L(t) - rstd^2 * q * z / M  with  t = gg_weight * grad_a - rstd * (gg_x * mean(grad_z * z)
//           + mean(gg_x * z) * grad_z)  and  q = <gg_x, grad_z - mean(grad_z) - z * mean(grad_z * z)>.
// t is a combination alpha * grad_a + beta * gg_x with per-map coefficients, so mean(t) and mean(t * z) follow
// from the sums of the first pass, and the second pass writes d/d x and d/d grad_y at once. The ReLU mask is
// piecewise constant, so bias gets no second-order gradient.
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE void double_backward_map(const T* gy, const T* x, const T* ggx, T m, T r, T w, T b, T ggw,
                                              T ggb, const MapShape& shape, T* spread, T* full, T* grad_grad_y,
                                              T* grad_x, T& grad_weight_part) {
  const int64_t size = shape.size();
  const T n = static_cast<T>(size);
  unpool_map(gy, shape, spread);
  const auto [sum_ga, sum_gaz, sum_g, sum_gz, sum_gga] =
      map_sums<T, Bytes, 5>(size, [&](auto pack, int64_t k) FASTDD_ALWAYS_INLINE_LAMBDA {
        using P = decltype(pack);
        const P z = (load<P>(x + k) - m) * r;
        const P ga = w * z + b > P{} ? load<P>(spread + k) : P{};
        const P g = load<P>(ggx + k);
        return std::array<P, 5>{ga, ga * z, g, g * z, g * ga};
      });
  const T mean_gz = w * sum_ga / n, mean_gzz = w * sum_gaz / n, mean_g = sum_g / n, mean_gzx = sum_gz / n;
  const T q = w * sum_gga - mean_gz * sum_g - mean_gzz * sum_gz;
  const T alpha = ggw - r * w * mean_gzx, beta = -r * mean_gzz;
  const T mean_t = (alpha * sum_ga + beta * sum_g) / n, mean_tz = (alpha * sum_gaz + beta * sum_gz) / n;
  const T z_scale = r * mean_tz + r * r * q / n;
  const auto [sum_uga] = map_sums<T, Bytes, 1>(size, [&](auto pack, int64_t k) FASTDD_ALWAYS_INLINE_LAMBDA {
    using P = decltype(pack);
    const P z = (load<P>(x + k) - m) * r;
    const auto active = w * z + b > P{};
    const P ga = active ? load<P>(spread + k) : P{};
    const P g = load<P>(ggx + k);
    const P u = r * (g - mean_g - z * mean_gzx);
    store(grad_x + k, r * (alpha * ga + beta * g - mean_t) - z * z_scale);
    store(full + k, active ? w * u + ggw * z + ggb : P{});
    return std::array<P, 1>{u * ga};
  });
  grad_weight_part = sum_uga;
  pool_map(full, shape, grad_grad_y);
}

template <typename S>
struct DoubleBackwardMaps {
  using T = compute_t<S>;
  const S *grad_y, *x, *gg_x;
  const T *weight, *bias, *mean, *rstd, *gg_weight, *gg_bias;
  int64_t channels;
  MapShape shape;
  S *grad_grad_y, *grad_x;
  T* grad_weight_part;

  template <int Bytes>
  FASTDD_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    constexpr bool widened = !std::is_same_v<S, T>;
    const int64_t size = shape.size(), out_size = shape.out_size();
    const int64_t in_buffer = widened ? size : 0, out_buffer = widened ? out_size : 0;
    std::vector<T> spread(size), full(size), x_buffer(in_buffer), gg_x_buffer(in_buffer), grad_x_buffer(in_buffer),
        grad_y_buffer(out_buffer), grad_grad_y_buffer(out_buffer);
    for (int64_t map = begin; map < end; ++map) {
      const int64_t c = map % channels;
      T* ggy = compute_target(grad_grad_y + map * out_size, grad_grad_y_buffer.data());
      T* gx = compute_target(grad_x + map * size, grad_x_buffer.data());
      double_backward_map<T, Bytes>(
          as_compute<Bytes>(grad_y + map * out_size, out_size, grad_y_buffer.data()),
          as_compute<Bytes>(x + map * size, size, x_buffer.data()),
          as_compute<Bytes>(gg_x + map * size, size, gg_x_buffer.data()), mean[map], rstd[map], weight[c], bias[c],
          gg_weight ? gg_weight[c] : T(0), gg_bias ? gg_bias[c] : T(0), shape, spread.data(), full.data(), ggy, gx,
          grad_weight_part[map]);
      store_computed<Bytes>(ggy, out_size, grad_grad_y + map * out_size);
      store_computed<Bytes>(gx, size, grad_x + map * size);
    }
  }
};

// weight, bias or their cotangent [C] in the statistics dtype (the kernels' T), contiguous; a missing one stays
// undefined.
at::Tensor per_channel(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() ? t.to(instance_norm_relu_pool_stats_dtype(x)).contiguous() : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_cpu(const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps,
                                                                           bool pool) {
  check_instance_norm_relu_pool_inputs(x, weight, bias, "instance_norm_relu_pool");
  const auto input = x.contiguous();
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  const auto stats_options = input.options().dtype(instance_norm_relu_pool_stats_dtype(input));
  auto y = at::empty({batch, channels, map.out_height(), map.out_width()}, input.options());
  auto mean = at::empty({batch, channels}, stats_options);
  auto rstd = at::empty({batch, channels}, stats_options);
  const auto w = per_channel(weight, input), b = per_channel(bias, input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "instance_norm_relu_pool_cpu", [&] {
    using T = compute_t<scalar_t>;
    const ForwardMaps<scalar_t> kernel{input.const_data_ptr<scalar_t>(), w.const_data_ptr<T>(),
                                       b.const_data_ptr<T>(), eps, channels, map,
                                       y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<T>(),
                                       rstd.mutable_data_ptr<T>()};
    run_maps(kernel, batch * channels);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool pool) {
  check_instance_norm_relu_pool_inputs(x, weight, bias, "instance_norm_relu_pool_backward");
  check_instance_norm_relu_pool_state(grad_y, x, mean, rstd, pool, "instance_norm_relu_pool_backward");
  const auto input = x.contiguous(), gy = grad_y.contiguous();
  const auto w = per_channel(weight, input), b = per_channel(bias, input);
  const auto mu = mean.contiguous(), rs = rstd.contiguous();
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  const auto stats_options = input.options().dtype(instance_norm_relu_pool_stats_dtype(input));
  auto grad_x = at::empty_like(input);
  auto weight_part = at::empty({batch, channels}, stats_options);
  auto bias_part = at::empty({batch, channels}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "instance_norm_relu_pool_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const BackwardMaps<scalar_t> kernel{gy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                        w.const_data_ptr<T>(), b.const_data_ptr<T>(), mu.const_data_ptr<T>(),
                                        rs.const_data_ptr<T>(), channels, map, grad_x.mutable_data_ptr<scalar_t>(),
                                        weight_part.mutable_data_ptr<T>(), bias_part.mutable_data_ptr<T>()};
    run_maps(kernel, batch * channels);
  });
  // The per-channel gradients are summed over the batch in the compute dtype, then take weight's and bias's dtype.
  return {grad_x, weight_part.sum(0).to(weight.scalar_type()), bias_part.sum(0).to(bias.scalar_type())};
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
  const auto w = per_channel(weight, input), b = per_channel(bias, input);
  const auto mu = mean.contiguous(), rs = rstd.contiguous();
  // A missing gg_x is zeros: materialising them keeps the per-map loops free of branches, so they vectorise.
  const auto ggx = gg_x.has_value() ? gg_x->contiguous() : at::zeros_like(input);
  const auto ggw = per_channel(gg_weight.value_or(at::Tensor()), input);
  const auto ggb = per_channel(gg_bias.value_or(at::Tensor()), input);
  const int64_t batch = input.size(0), channels = input.size(1);
  const MapShape map{input.size(2), input.size(3), pool};
  auto grad_grad_y = at::empty_like(gy);
  auto grad_x = at::empty_like(input);
  auto weight_part = at::empty({batch, channels}, input.options().dtype(instance_norm_relu_pool_stats_dtype(input)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "instance_norm_relu_pool_double_backward_cpu", [&] {
    using T = compute_t<scalar_t>;
    const DoubleBackwardMaps<scalar_t> kernel{
        gy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), ggx.const_data_ptr<scalar_t>(),
        w.const_data_ptr<T>(), b.const_data_ptr<T>(), mu.const_data_ptr<T>(), rs.const_data_ptr<T>(),
        ggw.defined() ? ggw.const_data_ptr<T>() : nullptr, ggb.defined() ? ggb.const_data_ptr<T>() : nullptr,
        channels, map, grad_grad_y.mutable_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        weight_part.mutable_data_ptr<T>()};
    run_maps(kernel, batch * channels);
  });
  return {grad_grad_y, grad_x, weight_part.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("instance_norm_relu_pool", &instance_norm_relu_pool_cpu);
  m.impl("instance_norm_relu_pool_backward", &instance_norm_relu_pool_backward_cpu);
  m.impl("instance_norm_relu_pool_double_backward", &instance_norm_relu_pool_double_backward_cpu);
}

}  // namespace fastdd
