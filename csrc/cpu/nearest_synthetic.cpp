// CPU kernels of fastdd::nearest_synthetic (nearest center of every point) and its backward.
//
// The forward computes every squared distance exactly, as a sum of squared differences, and keeps a running
// minimum per point, so it never materialises the [N, M] distance matrix. Work is tiled for the caches: a tile of
// kRowsPerTile points is compared with one center at a time, so each center element loaded from cache feeds
// kRowsPerTile subtract-square-accumulate lanes, and centers are visited in blocks small enough to stay in L2
// while all point tiles of a thread's row block go past them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../nearest_synthetic_checks.h"

// On x86-64 the compiler emits AVX-512 and AVX2 copies of the hot loops next to the baseline one and the loader
// picks the best for the running CPU, so a single build is both portable and vectorised.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTDD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDD_CPU_CLONES
#endif

#if defined(__GNUC__)
#define FASTDD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTDD_ALWAYS_INLINE inline
#endif

namespace fastdd {
namespace {

constexpr int64_t kRowsPerTile = 4;
constexpr int64_t kRowBlockBytes = 128 * 1024;
constexpr int64_t kCenterBlockBytes = 256 * 1024;
// Below this many multiply-adds a task is not worth a thread.
constexpr int64_t kMinWorkPerTask = 1 << 16;

// The selection key of a distance: NaN counts as -inf, so the first NaN distance wins, as in torch.argmin.
// A true distance is never -inf (it is a sum of squares), which lets the caller turn -inf back into NaN.
template <typename T>
FASTDD_ALWAYS_INLINE void keep_if_closer(T sq_dist, int64_t center, T& best_key, int64_t& best_index) {
  const T key = std::isnan(sq_dist) ? -std::numeric_limits<T>::infinity() : sq_dist;
  // Centers arrive in increasing order and only a strictly smaller key replaces the best: ties keep the lowest.
  if (key < best_key) {
    best_key = key;
    best_index = center;
  }
}

// Compares points [row_begin, row_end) with centers [center_begin, center_end) and updates the per-row best.
template <typename T>
FASTDD_ALWAYS_INLINE void scan_block(const T* points, const T* centers, int64_t dim, int64_t row_begin,
                                     int64_t row_end, int64_t center_begin, int64_t center_end, T* best_key,
                                     int64_t* best_index) {
  int64_t row = row_begin;
  for (; row + kRowsPerTile <= row_end; row += kRowsPerTile) {
    const T* p0 = points + row * dim;
    const T* p1 = p0 + dim;
    const T* p2 = p1 + dim;
    const T* p3 = p2 + dim;
    for (int64_t center = center_begin; center < center_end; ++center) {
      const T* c = centers + center * dim;
      T acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
      for (int64_t k = 0; k < dim; ++k) {
        const T ck = c[k];
        const T d0 = p0[k] - ck, d1 = p1[k] - ck, d2 = p2[k] - ck, d3 = p3[k] - ck;
        acc0 += d0 * d0;
        acc1 += d1 * d1;
        acc2 += d2 * d2;
        acc3 += d3 * d3;
      }
      keep_if_closer(acc0, center, best_key[row], best_index[row]);
      keep_if_closer(acc1, center, best_key[row + 1], best_index[row + 1]);
      keep_if_closer(acc2, center, best_key[row + 2], best_index[row + 2]);
      keep_if_closer(acc3, center, best_key[row + 3], best_index[row + 3]);
    }
  }
  for (; row < row_end; ++row) {
    const T* p = points + row * dim;
    for (int64_t center = center_begin; center < center_end; ++center) {
      const T* c = centers + center * dim;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < dim; ++k) {
        const T d = p[k] - c[k];
        acc += d * d;
      }
      keep_if_closer(acc, center, best_key[row], best_index[row]);
    }
  }
}

// Nearest center of rows [row_begin, row_end); writes sq_dist (NaN where a NaN distance won) and index.
template <typename T>
FASTDD_ALWAYS_INLINE void nearest_rows(const T* points, const T* centers, int64_t num_centers, int64_t dim,
                                       int64_t row_begin, int64_t row_end, T* sq_dist, int64_t* index) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    sq_dist[row] = std::numeric_limits<T>::infinity();
    index[row] = 0;
  }
  const int64_t row_bytes = std::max<int64_t>(1, dim) * static_cast<int64_t>(sizeof(T));
  const int64_t rows_per_block = std::max<int64_t>(kRowsPerTile, kRowBlockBytes / row_bytes / kRowsPerTile * kRowsPerTile);
  const int64_t centers_per_block = std::max<int64_t>(1, kCenterBlockBytes / row_bytes);
  for (int64_t block_begin = row_begin; block_begin < row_end; block_begin += rows_per_block) {
    const int64_t block_end = std::min(row_end, block_begin + rows_per_block);
    for (int64_t center_begin = 0; center_begin < num_centers; center_begin += centers_per_block) {
      const int64_t center_end = std::min(num_centers, center_begin + centers_per_block);
      scan_block(points, centers, dim, block_begin, block_end, center_begin, center_end, sq_dist, index);
    }
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (sq_dist[row] == -std::numeric_limits<T>::infinity()) {
      sq_dist[row] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

// One entry point per dtype (a plain function, so it can carry per-ISA clones).
FASTDD_CPU_CLONES void nearest_rows_float(const float* points, const float* centers, int64_t num_centers,
                                          int64_t dim, int64_t row_begin, int64_t row_end, float* sq_dist,
                                          int64_t* index) {
  nearest_rows(points, centers, num_centers, dim, row_begin, row_end, sq_dist, index);
}

FASTDD_CPU_CLONES void nearest_rows_double(const double* points, const double* centers, int64_t num_centers,
                                           int64_t dim, int64_t row_begin, int64_t row_end, double* sq_dist,
                                           int64_t* index) {
  nearest_rows(points, centers, num_centers, dim, row_begin, row_end, sq_dist, index);
}

FASTDD_ALWAYS_INLINE void nearest_rows_dispatch(const float* points, const float* centers, int64_t num_centers,
                                                int64_t dim, int64_t row_begin, int64_t row_end, float* sq_dist,
                                                int64_t* index) {
  nearest_rows_float(points, centers, num_centers, dim, row_begin, row_end, sq_dist, index);
}

FASTDD_ALWAYS_INLINE void nearest_rows_dispatch(const double* points, const double* centers, int64_t num_centers,
                                                int64_t dim, int64_t row_begin, int64_t row_end, double* sq_dist,
                                                int64_t* index) {
  nearest_rows_double(points, centers, num_centers, dim, row_begin, row_end, sq_dist, index);
}

// grad_points and grad_centers for columns [col_begin, col_end). Rows are visited in order, so the sums into
// grad_centers are deterministic; threads own disjoint column ranges, so nothing is shared.
template <typename T>
FASTDD_ALWAYS_INLINE void backward_columns(const T* grad, const T* points, const T* centers, const int64_t* index,
                                           int64_t num_points, int64_t dim, int64_t col_begin, int64_t col_end,
                                           T* grad_points, T* grad_centers) {
  for (int64_t row = 0; row < num_points; ++row) {
    const T scale = 2 * grad[row];
    const T* p = points + row * dim;
    const T* c = centers + index[row] * dim;
    T* gp = grad_points + row * dim;
    T* gc = grad_centers + index[row] * dim;
#pragma omp simd
    for (int64_t k = col_begin; k < col_end; ++k) {
      const T g = scale * (p[k] - c[k]);
      gp[k] = g;
      gc[k] -= g;
    }
  }
}

FASTDD_CPU_CLONES void backward_columns_float(const float* grad, const float* points, const float* centers,
                                              const int64_t* index, int64_t num_points, int64_t dim,
                                              int64_t col_begin, int64_t col_end, float* grad_points,
                                              float* grad_centers) {
  backward_columns(grad, points, centers, index, num_points, dim, col_begin, col_end, grad_points, grad_centers);
}

FASTDD_CPU_CLONES void backward_columns_double(const double* grad, const double* points, const double* centers,
                                               const int64_t* index, int64_t num_points, int64_t dim,
                                               int64_t col_begin, int64_t col_end, double* grad_points,
                                               double* grad_centers) {
  backward_columns(grad, points, centers, index, num_points, dim, col_begin, col_end, grad_points, grad_centers);
}

FASTDD_ALWAYS_INLINE void backward_columns_dispatch(const float* grad, const float* points, const float* centers,
                                                    const int64_t* index, int64_t num_points, int64_t dim,
                                                    int64_t col_begin, int64_t col_end, float* grad_points,
                                                    float* grad_centers) {
  backward_columns_float(grad, points, centers, index, num_points, dim, col_begin, col_end, grad_points,
                         grad_centers);
}

FASTDD_ALWAYS_INLINE void backward_columns_dispatch(const double* grad, const double* points, const double* centers,
                                                    const int64_t* index, int64_t num_points, int64_t dim,
                                                    int64_t col_begin, int64_t col_end, double* grad_points,
                                                    double* grad_centers) {
  backward_columns_double(grad, points, centers, index, num_points, dim, col_begin, col_end, grad_points,
                          grad_centers);
}

std::tuple<at::Tensor, at::Tensor> nearest_synthetic_cpu(const at::Tensor& points, const at::Tensor& centers) {
  check_nearest_synthetic_inputs(points, centers);
  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  const int64_t num_points = p.size(0);
  const int64_t num_centers = c.size(0);
  const int64_t dim = p.size(1);
  at::Tensor index = at::empty({num_points}, p.options().dtype(at::kLong));
  at::Tensor sq_dist = at::empty({num_points}, p.options());
  const int64_t work_per_row = std::max<int64_t>(1, num_centers * dim);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / work_per_row);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "nearest_synthetic_cpu", [&] {
    const scalar_t* p_data = p.const_data_ptr<scalar_t>();
    const scalar_t* c_data = c.const_data_ptr<scalar_t>();
    scalar_t* dist_data = sq_dist.mutable_data_ptr<scalar_t>();
    int64_t* index_data = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, num_points, grain, [&](int64_t begin, int64_t end) {
      nearest_rows_dispatch(p_data, c_data, num_centers, dim, begin, end, dist_data, index_data);
    });
  });
  return {sq_dist, index};
}

std::tuple<at::Tensor, at::Tensor> nearest_synthetic_backward_cpu(const at::Tensor& grad_sq_dist,
                                                                  const at::Tensor& points,
                                                                  const at::Tensor& centers,
                                                                  const at::Tensor& index) {
  check_nearest_synthetic_backward_inputs(grad_sq_dist, points, centers, index);
  const at::Tensor g = grad_sq_dist.contiguous();
  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t num_points = p.size(0);
  const int64_t num_centers = c.size(0);
  const int64_t dim = p.size(1);
  const int64_t* idx_data = idx.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < num_points; ++row) {
    TORCH_CHECK(idx_data[row] >= 0 && idx_data[row] < num_centers, "nearest_synthetic_backward: index[", row,
                "] = ", idx_data[row], " is out of range for ", num_centers, " centers");
  }
  at::Tensor grad_points = at::empty_like(p);
  at::Tensor grad_centers = at::zeros_like(c);
  const int64_t grain = std::max<int64_t>(16, kMinWorkPerTask / std::max<int64_t>(1, num_points));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "nearest_synthetic_backward_cpu", [&] {
    const scalar_t* g_data = g.const_data_ptr<scalar_t>();
    const scalar_t* p_data = p.const_data_ptr<scalar_t>();
    const scalar_t* c_data = c.const_data_ptr<scalar_t>();
    scalar_t* gp_data = grad_points.mutable_data_ptr<scalar_t>();
    scalar_t* gc_data = grad_centers.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, dim, grain, [&](int64_t begin, int64_t end) {
      backward_columns_dispatch(g_data, p_data, c_data, idx_data, num_points, dim, begin, end, gp_data, gc_data);
    });
  });
  return {grad_points, grad_centers};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("nearest_synthetic", &nearest_synthetic_cpu);
  m.impl("nearest_synthetic_backward", &nearest_synthetic_backward_cpu);
}

}  // namespace fastdd
