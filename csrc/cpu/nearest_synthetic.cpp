// CPU kernels of fastdd::nearest_synthetic (nearest center of every point, optionally among the centers of the
// point's own group) and its backward.
//
// The forward computes every squared distance exactly, as a sum of squared differences, and keeps a running
// minimum per point, so it never materialises the [N, M] distance matrix. Groups are handled without copying any
// data: the rows and the centers are listed group by group (index lists, built once per call), and each group's rows
// are compared only with its own centers. The inner loop is a 4 x 4 register tile: four points against four
// centers, sixteen vector accumulators, so every element loaded feeds four subtract-square-accumulate lanes. Rows
// are visited in blocks that stay in L2 while the centers (of the group) go past them, so each point is read from
// memory once. Without groups, everything is one group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

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

// Rows per block: a block stays in L2 while its group's centers (a center block at a time) go past it.
constexpr int64_t kRowBlockBytes = 384 * 1024;
constexpr int64_t kCenterBlockBytes = 256 * 1024;
// Below this many multiply-adds a task is not worth a thread.
constexpr int64_t kMinWorkPerTask = 1 << 16;

// Rows and centers listed group by group: the rows of group slot s are rows[row_start[s] .. row_start[s + 1]) and
// its centers are centers[center_start[s] .. center_start[s + 1]), both in increasing index order.
struct GroupLayout {
  std::vector<int64_t> rows;
  std::vector<int64_t> row_start;
  std::vector<int64_t> centers;
  std::vector<int64_t> center_start;
};

GroupLayout single_group_layout(int64_t num_points, int64_t num_centers) {
  GroupLayout layout;
  layout.rows.resize(num_points);
  layout.centers.resize(num_centers);
  for (int64_t i = 0; i < num_points; ++i) layout.rows[i] = i;
  for (int64_t j = 0; j < num_centers; ++j) layout.centers[j] = j;
  layout.row_start = {0, num_points};
  layout.center_start = {0, num_centers};
  return layout;
}

// Any int64 group labels: centers are sorted by (group, index), each point finds its group by binary search, and a
// stable counting sort lists the points group by group. A point whose group has no center is a ValueError.
GroupLayout grouped_layout(const int64_t* point_groups, int64_t num_points, const int64_t* center_groups,
                           int64_t num_centers) {
  std::vector<std::pair<int64_t, int64_t>> by_group(num_centers);
  for (int64_t j = 0; j < num_centers; ++j) by_group[j] = {center_groups[j], j};
  std::sort(by_group.begin(), by_group.end());
  GroupLayout layout;
  std::vector<int64_t> labels;
  layout.centers.resize(num_centers);
  for (int64_t j = 0; j < num_centers; ++j) {
    if (j == 0 || by_group[j].first != by_group[j - 1].first) {
      labels.push_back(by_group[j].first);
      layout.center_start.push_back(j);
    }
    layout.centers[j] = by_group[j].second;
  }
  layout.center_start.push_back(num_centers);
  const int64_t slots = static_cast<int64_t>(labels.size());
  std::vector<int64_t> slot_of_row(num_points);
  layout.row_start.assign(slots + 1, 0);
  for (int64_t i = 0; i < num_points; ++i) {
    const auto found = std::lower_bound(labels.begin(), labels.end(), point_groups[i]);
    TORCH_CHECK_VALUE(found != labels.end() && *found == point_groups[i], "nearest_synthetic: point ", i,
                      " is in group ", point_groups[i], ", which has no center; every group in point_groups needs ",
                      "at least one center in center_groups");
    slot_of_row[i] = found - labels.begin();
    ++layout.row_start[slot_of_row[i] + 1];
  }
  for (int64_t s = 0; s < slots; ++s) layout.row_start[s + 1] += layout.row_start[s];
  layout.rows.resize(num_points);
  std::vector<int64_t> fill(layout.row_start.begin(), layout.row_start.end() - 1);
  for (int64_t i = 0; i < num_points; ++i) layout.rows[fill[slot_of_row[i]]++] = i;
  return layout;
}

// The selection key of a distance: NaN counts as -inf, so the first NaN distance wins, as in torch.argmin.
// A true distance is never -inf (it is a sum of squares), which lets the caller turn -inf back into NaN.
template <typename T>
FASTDD_ALWAYS_INLINE void keep_if_closer(T sq_dist, int64_t center, T& best_key, int64_t& best_index) {
  const T key = std::isnan(sq_dist) ? -std::numeric_limits<T>::infinity() : sq_dist;
  // Centers arrive in increasing index order and only a strictly smaller key replaces the best: ties keep the lowest.
  if (key < best_key) {
    best_key = key;
    best_index = center;
  }
}

// Register tiles: sums of squared differences of R rows against C centers over all features, each (row, center)
// pair in its own accumulator (the compiler turns each into a vector register). out[c * R + r].
template <typename T>
FASTDD_ALWAYS_INLINE void tile_4x4(const T* const* p, const T* const* c, int64_t dim, T* out) {
  const T *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
  const T *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
  T a00 = 0, a10 = 0, a20 = 0, a30 = 0, a01 = 0, a11 = 0, a21 = 0, a31 = 0;
  T a02 = 0, a12 = 0, a22 = 0, a32 = 0, a03 = 0, a13 = 0, a23 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a10, a20, a30, a01, a11, a21, a31, a02, a12, a22, a32, a03, a13, a23, a33)
  for (int64_t k = 0; k < dim; ++k) {
    const T x0 = p0[k], x1 = p1[k], x2 = p2[k], x3 = p3[k];
    const T y0 = c0[k], y1 = c1[k], y2 = c2[k], y3 = c3[k];
    T d;
    d = x0 - y0; a00 += d * d; d = x1 - y0; a10 += d * d; d = x2 - y0; a20 += d * d; d = x3 - y0; a30 += d * d;
    d = x0 - y1; a01 += d * d; d = x1 - y1; a11 += d * d; d = x2 - y1; a21 += d * d; d = x3 - y1; a31 += d * d;
    d = x0 - y2; a02 += d * d; d = x1 - y2; a12 += d * d; d = x2 - y2; a22 += d * d; d = x3 - y2; a32 += d * d;
    d = x0 - y3; a03 += d * d; d = x1 - y3; a13 += d * d; d = x2 - y3; a23 += d * d; d = x3 - y3; a33 += d * d;
  }
  out[0] = a00; out[1] = a10; out[2] = a20; out[3] = a30;
  out[4] = a01; out[5] = a11; out[6] = a21; out[7] = a31;
  out[8] = a02; out[9] = a12; out[10] = a22; out[11] = a32;
  out[12] = a03; out[13] = a13; out[14] = a23; out[15] = a33;
}

template <typename T>
FASTDD_ALWAYS_INLINE void tile_4x1(const T* const* p, const T* c0, int64_t dim, T* out) {
  const T *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < dim; ++k) {
    const T y = c0[k];
    const T d0 = p0[k] - y, d1 = p1[k] - y, d2 = p2[k] - y, d3 = p3[k] - y;
    a0 += d0 * d0;
    a1 += d1 * d1;
    a2 += d2 * d2;
    a3 += d3 * d3;
  }
  out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}

template <typename T>
FASTDD_ALWAYS_INLINE void tile_1x4(const T* p0, const T* const* c, int64_t dim, T* out) {
  const T *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < dim; ++k) {
    const T x = p0[k];
    const T d0 = x - c0[k], d1 = x - c1[k], d2 = x - c2[k], d3 = x - c3[k];
    a0 += d0 * d0;
    a1 += d1 * d1;
    a2 += d2 * d2;
    a3 += d3 * d3;
  }
  out[0] = a0; out[1] = a1; out[2] = a2; out[3] = a3;
}

template <typename T>
FASTDD_ALWAYS_INLINE T tile_1x1(const T* p0, const T* c0, int64_t dim) {
  T a = 0;
#pragma omp simd reduction(+ : a)
  for (int64_t k = 0; k < dim; ++k) {
    const T d = p0[k] - c0[k];
    a += d * d;
  }
  return a;
}

// Compares rows[0 .. num_rows) with centers[0 .. num_centers) (index lists, centers in increasing order) and
// updates best_key / best_index, which are indexed like `rows`.
template <typename T>
FASTDD_ALWAYS_INLINE void scan_block(const T* points, const T* centers_data, int64_t dim, const int64_t* rows,
                                     int64_t num_rows, const int64_t* centers, int64_t num_centers, T* best_key,
                                     int64_t* best_index) {
  T sums[16];
  int64_t r = 0;
  for (; r + 4 <= num_rows; r += 4) {
    const T* p[4] = {points + rows[r] * dim, points + rows[r + 1] * dim, points + rows[r + 2] * dim,
                     points + rows[r + 3] * dim};
    int64_t j = 0;
    for (; j + 4 <= num_centers; j += 4) {
      const T* c[4] = {centers_data + centers[j] * dim, centers_data + centers[j + 1] * dim,
                       centers_data + centers[j + 2] * dim, centers_data + centers[j + 3] * dim};
      tile_4x4(p, c, dim, sums);
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t i = 0; i < 4; ++i) {
          keep_if_closer(sums[q * 4 + i], centers[j + q], best_key[r + i], best_index[r + i]);
        }
      }
    }
    for (; j < num_centers; ++j) {
      tile_4x1(p, centers_data + centers[j] * dim, dim, sums);
      for (int64_t i = 0; i < 4; ++i) {
        keep_if_closer(sums[i], centers[j], best_key[r + i], best_index[r + i]);
      }
    }
  }
  for (; r < num_rows; ++r) {
    const T* p = points + rows[r] * dim;
    int64_t j = 0;
    for (; j + 4 <= num_centers; j += 4) {
      const T* c[4] = {centers_data + centers[j] * dim, centers_data + centers[j + 1] * dim,
                       centers_data + centers[j + 2] * dim, centers_data + centers[j + 3] * dim};
      tile_1x4(p, c, dim, sums);
      for (int64_t q = 0; q < 4; ++q) {
        keep_if_closer(sums[q], centers[j + q], best_key[r], best_index[r]);
      }
    }
    for (; j < num_centers; ++j) {
      keep_if_closer(tile_1x1(p, centers_data + centers[j] * dim, dim), centers[j], best_key[r], best_index[r]);
    }
  }
}

// Nearest center of the rows listed in rows[0 .. num_rows), all of one group whose centers are listed in
// centers[0 .. num_centers); writes sq_dist (NaN where a NaN distance won) and index at the rows' own positions.
template <typename T>
FASTDD_ALWAYS_INLINE void nearest_rows(const T* points, const T* centers_data, int64_t dim, const int64_t* rows,
                                       int64_t num_rows, const int64_t* centers, int64_t num_centers, T* sq_dist,
                                       int64_t* index) {
  const int64_t row_bytes = std::max<int64_t>(1, dim) * static_cast<int64_t>(sizeof(T));
  const int64_t rows_per_block = std::max<int64_t>(4, kRowBlockBytes / row_bytes / 4 * 4);
  const int64_t centers_per_block = std::max<int64_t>(4, kCenterBlockBytes / row_bytes / 4 * 4);
  T best_key[512];
  int64_t best_index[512];
  const int64_t chunk = std::min<int64_t>(rows_per_block, 512);
  for (int64_t block_begin = 0; block_begin < num_rows; block_begin += chunk) {
    const int64_t block_rows = std::min(num_rows - block_begin, chunk);
    std::fill(best_key, best_key + block_rows, std::numeric_limits<T>::infinity());
    std::fill(best_index, best_index + block_rows, centers[0]);
    for (int64_t center_begin = 0; center_begin < num_centers; center_begin += centers_per_block) {
      const int64_t block_centers = std::min(num_centers - center_begin, centers_per_block);
      scan_block(points, centers_data, dim, rows + block_begin, block_rows, centers + center_begin, block_centers,
                 best_key, best_index);
    }
    for (int64_t r = 0; r < block_rows; ++r) {
      const int64_t row = rows[block_begin + r];
      sq_dist[row] = best_key[r] == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::quiet_NaN()
                                                                         : best_key[r];
      index[row] = best_index[r];
    }
  }
}

// One entry point per dtype (a plain function, so it can carry per-ISA clones).
FASTDD_CPU_CLONES void nearest_rows_float(const float* points, const float* centers_data, int64_t dim,
                                          const int64_t* rows, int64_t num_rows, const int64_t* centers,
                                          int64_t num_centers, float* sq_dist, int64_t* index) {
  nearest_rows(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}

FASTDD_CPU_CLONES void nearest_rows_double(const double* points, const double* centers_data, int64_t dim,
                                           const int64_t* rows, int64_t num_rows, const int64_t* centers,
                                           int64_t num_centers, double* sq_dist, int64_t* index) {
  nearest_rows(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}

FASTDD_ALWAYS_INLINE void nearest_rows_dispatch(const float* points, const float* centers_data, int64_t dim,
                                                const int64_t* rows, int64_t num_rows, const int64_t* centers,
                                                int64_t num_centers, float* sq_dist, int64_t* index) {
  nearest_rows_float(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}

FASTDD_ALWAYS_INLINE void nearest_rows_dispatch(const double* points, const double* centers_data, int64_t dim,
                                                const int64_t* rows, int64_t num_rows, const int64_t* centers,
                                                int64_t num_centers, double* sq_dist, int64_t* index) {
  nearest_rows_double(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
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

std::tuple<at::Tensor, at::Tensor> nearest_synthetic_cpu(const at::Tensor& points, const at::Tensor& centers,
                                                         const std::optional<at::Tensor>& point_groups,
                                                         const std::optional<at::Tensor>& center_groups) {
  check_nearest_synthetic_inputs(points, centers, point_groups, center_groups);
  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  const int64_t num_points = p.size(0);
  const int64_t num_centers = c.size(0);
  const int64_t dim = p.size(1);
  at::Tensor index = at::empty({num_points}, p.options().dtype(at::kLong));
  at::Tensor sq_dist = at::empty({num_points}, p.options());
  GroupLayout layout;
  if (point_groups.has_value()) {
    const at::Tensor pg = point_groups->contiguous();
    const at::Tensor cg = center_groups->contiguous();
    layout = grouped_layout(pg.const_data_ptr<int64_t>(), num_points, cg.const_data_ptr<int64_t>(), num_centers);
  } else {
    layout = single_group_layout(num_points, num_centers);
  }
  // Tasks are ranges of the grouped row list; a range may span several groups.
  const int64_t centers_per_row = std::max<int64_t>(1, num_centers / (static_cast<int64_t>(layout.row_start.size()) - 1));
  const int64_t grain = std::max<int64_t>(4, kMinWorkPerTask / std::max<int64_t>(1, centers_per_row * dim));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "nearest_synthetic_cpu", [&] {
    const scalar_t* p_data = p.const_data_ptr<scalar_t>();
    const scalar_t* c_data = c.const_data_ptr<scalar_t>();
    scalar_t* dist_data = sq_dist.mutable_data_ptr<scalar_t>();
    int64_t* index_data = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, num_points, grain, [&](int64_t begin, int64_t end) {
      // The group slot holding position `begin`: the last slot whose rows start at or before it.
      int64_t slot = std::upper_bound(layout.row_start.begin(), layout.row_start.end(), begin) -
                     layout.row_start.begin() - 1;
      for (int64_t pos = begin; pos < end; ++slot) {
        const int64_t stop = std::min(end, layout.row_start[slot + 1]);
        if (stop > pos) {
          const int64_t first_center = layout.center_start[slot];
          nearest_rows_dispatch(p_data, c_data, dim, layout.rows.data() + pos, stop - pos,
                                layout.centers.data() + first_center, layout.center_start[slot + 1] - first_center,
                                dist_data, index_data);
        }
        pos = std::max(pos, stop);
      }
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
