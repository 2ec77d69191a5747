// CPU kernels of fastdd::nearest_synthetic (nearest center of every point, optionally among the centers of the
// point's own group) and its backward.
//
// The forward computes every squared distance exactly, as a sum of squared differences, and keeps a running
// minimum per point, so it never materialises the [N, M] distance matrix. Groups are handled without copying any
// data: the rows and the centers are listed group by group (index lists, built once per call), and each group's rows
// are compared only with its own centers. The inner loop is a register tile: four points against up to five
// centers, one vector accumulator per pair, so every vector loaded feeds four or five subtract-square-accumulates.
// Rows are visited in blocks that stay in L2 while the centers (of the group) go past them, so each point is read
// from memory once, and while a tile computes, the rows of a tile to come are prefetched, so the memory stream
// overlaps the arithmetic (measured: 1.3x on one core of the 10-class robust-loss workload, and 1.1x more when a
// class's centers fetch the tile after the next; see scan_block). Without groups, everything is one group.
//
// Not used: the dot-product form |x|^2 - 2 x.c + |c|^2 as a screen before an exact recheck. It halves the vector
// operations, but on Zen 5 the subtract runs on the add pipes beside the multiply-add, so both forms cost one
// multiply-add per step: measured 1.2x slower with the norms and the recheck, bit-identical results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../half_precision.h"
#include "../nearest_synthetic_checks.h"
#include "simd.h"

// The backward loops are FASTDD_CPU_CLONES functions; the forward picks its copy itself, below: each copy has its
// own vector width.
#if defined(__GNUC__)
#define FASTDD_PREFETCH(address) __builtin_prefetch((address), 0, 3)
#else
#define FASTDD_PREFETCH(address) ((void)(address))
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


template <typename T, typename V>
FASTDD_ALWAYS_INLINE T sum_lanes(const V& value) {
  const T* lane = reinterpret_cast<const T*>(&value);
  T total = 0;
  for (size_t i = 0; i < sizeof(V) / sizeof(T); ++i) total += lane[i];
  return total;
}

// Rows to pull into the cache while a tile computes: cache lines [first_line, last_line) of `rows` rows, issued
// evenly over the tile's loop so the memory system streams the next rows while the arithmetic runs.
template <typename T>
struct Prefetch {
  const T* const* row = nullptr;
  int64_t rows = 0;
  int64_t first_line = 0;
  int64_t last_line = 0;
};

constexpr int64_t kCacheLine = 64;

// out[j * R + r] = sum_k (p[r][k] - c[j][k])^2 for R rows and C centers, each pair in its own vector accumulator:
// every vector loaded feeds R or C subtract-square-accumulate operations. The lanes, their sum and the scalar tail
// are the same whatever R and C, so a pair's distance does not depend on the tile that computed it.
template <typename T, int Bytes, int R, int C>
FASTDD_ALWAYS_INLINE void tile_sums(const T* const* p, const T* const* c, int64_t dim, const Prefetch<T>& prefetch,
                                    T* out) {
  using V = typename Simd<T, Bytes>::type;
  constexpr int64_t lanes = Simd<T, Bytes>::lanes;
  constexpr int64_t line_elements = kCacheLine / sizeof(T);
  V acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) acc[r][j] = V{};
  }
  const int64_t steps = dim / lanes;
  const int64_t prefetch_lines = prefetch.last_line - prefetch.first_line;
  int64_t line = prefetch.first_line;
  for (int64_t step = 0; step < steps; ++step) {
    if (line < prefetch.last_line && step * prefetch_lines >= (line - prefetch.first_line) * steps) {
      for (int64_t r = 0; r < prefetch.rows; ++r) FASTDD_PREFETCH(prefetch.row[r] + line * line_elements);
      ++line;
    }
    const int64_t k = step * lanes;
    V x[R];
    for (int r = 0; r < R; ++r) x[r] = load<V>(p[r] + k);
    for (int j = 0; j < C; ++j) {
      const V y = load<V>(c[j] + k);
      for (int r = 0; r < R; ++r) {
        const V d = x[r] - y;
        acc[r][j] += d * d;
      }
    }
  }
  for (int j = 0; j < C; ++j) {
    for (int r = 0; r < R; ++r) {
      T total = sum_lanes<T>(acc[r][j]);
      for (int64_t k = steps * lanes; k < dim; ++k) {
        const T d = p[r][k] - c[j][k];
        total += d * d;
      }
      out[j * R + r] = total;
    }
  }
}

// The widest center tile of a vector width: 4 rows x 5 centers = 20 accumulators fit AVX-512's 32 registers
// (measured on the 10-centers-per-class workload: 1.17x faster than 4 x 4 + 4 x 2); 16-register ISAs get 4 x 3.
template <int Bytes>
constexpr int64_t max_tile_centers() {
  return Bytes >= 64 ? 5 : 3;
}

// R rows against `num` <= max_tile_centers centers (num known only at run time).
template <typename T, int Bytes, int R>
FASTDD_ALWAYS_INLINE void tile_sums_up_to_max(const T* const* p, const T* const* c, int64_t num, int64_t dim,
                                              const Prefetch<T>& prefetch, T* out) {
  switch (num) {
    case 5:
      if constexpr (max_tile_centers<Bytes>() >= 5) {
        tile_sums<T, Bytes, R, 5>(p, c, dim, prefetch, out);
        break;
      }
      [[fallthrough]];
    case 4:
      if constexpr (max_tile_centers<Bytes>() >= 4) {
        tile_sums<T, Bytes, R, 4>(p, c, dim, prefetch, out);
        break;
      }
      [[fallthrough]];
    case 3: tile_sums<T, Bytes, R, 3>(p, c, dim, prefetch, out); break;
    case 2: tile_sums<T, Bytes, R, 2>(p, c, dim, prefetch, out); break;
    default: tile_sums<T, Bytes, R, 1>(p, c, dim, prefetch, out); break;
  }
}

// Compares rows[0 .. num_rows) with centers[0 .. num_centers) (index lists, centers in increasing order) and
// updates best_key / best_index, which are indexed like `rows`. rows[num_rows .. num_rows + rows_after) may be read:
// they are the next rows to come, prefetched while the current rows compute. With several center blocks the next
// row tile is fetched during the later center tiles; with one (the centers of a class), the row tile after the next
// is fetched over all of them, which gives the memory system two tiles' time (measured: 1.1x on one core of the
// 10-class robust-loss workload; with several center blocks it was 1.1x slower, as every block fetched the rows
// again). The centers are cut into tiles of nearly equal size (10 -> 5 + 5, 7 -> 4 + 3 with AVX-512).
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE void scan_block(const T* points, const T* centers_data, int64_t dim, const int64_t* rows,
                                     int64_t num_rows, int64_t rows_after, const int64_t* centers,
                                     int64_t num_centers, bool only_center_block, T* best_key,
                                     int64_t* best_index) {
  constexpr int64_t kRows = 4;
  constexpr int64_t kCenters = max_tile_centers<Bytes>();
  const int64_t lines = (dim * static_cast<int64_t>(sizeof(T)) + kCacheLine - 1) / kCacheLine;
  const int64_t center_tiles = (num_centers + kCenters - 1) / kCenters;
  T sums[kRows * kCenters];
  for (int64_t r = 0; r < num_rows; r += kRows) {
    const int64_t tile_rows = std::min(kRows, num_rows - r);
    const T* p[kRows];
    for (int64_t i = 0; i < tile_rows; ++i) p[i] = points + rows[r + i] * dim;
    const T* next[kRows];
    const int64_t next_first = r + tile_rows + (only_center_block ? kRows : 0);
    const int64_t next_rows = std::clamp<int64_t>(num_rows + rows_after - next_first, 0, kRows);
    for (int64_t i = 0; i < next_rows; ++i) next[i] = points + rows[next_first + i] * dim;
    for (int64_t t = 0; t < center_tiles; ++t) {
      const int64_t j = t * num_centers / center_tiles;
      const int64_t tile_centers = (t + 1) * num_centers / center_tiles - j;
      const T* c[kCenters];
      for (int64_t q = 0; q < tile_centers; ++q) c[q] = centers_data + centers[j + q] * dim;
      Prefetch<T> prefetch;
      if (next_rows > 0 && (only_center_block || t > 0 || center_tiles == 1)) {
        const int64_t share = only_center_block ? center_tiles : std::max<int64_t>(1, center_tiles - 1);
        const int64_t part = only_center_block ? t : center_tiles == 1 ? 0 : t - 1;
        prefetch = {next, next_rows, part * lines / share, (part + 1) * lines / share};
      }
      switch (tile_rows) {
        case 4: tile_sums_up_to_max<T, Bytes, 4>(p, c, tile_centers, dim, prefetch, sums); break;
        case 3: tile_sums_up_to_max<T, Bytes, 3>(p, c, tile_centers, dim, prefetch, sums); break;
        case 2: tile_sums_up_to_max<T, Bytes, 2>(p, c, tile_centers, dim, prefetch, sums); break;
        default: tile_sums_up_to_max<T, Bytes, 1>(p, c, tile_centers, dim, prefetch, sums); break;
      }
      for (int64_t q = 0; q < tile_centers; ++q) {
        for (int64_t i = 0; i < tile_rows; ++i) {
          keep_if_closer(sums[q * tile_rows + i], centers[j + q], best_key[r + i], best_index[r + i]);
        }
      }
    }
  }
}

// Nearest center of the rows listed in rows[0 .. num_rows), all of one group whose centers are listed in
// centers[0 .. num_centers); writes sq_dist (NaN where a NaN distance won) and index at the rows' own positions.
template <typename T, int Bytes>
FASTDD_ALWAYS_INLINE void nearest_rows(const T* points, const T* centers_data, int64_t dim, const int64_t* rows,
                                       int64_t num_rows, const int64_t* centers, int64_t num_centers, T* sq_dist,
                                       int64_t* index) {
  constexpr int64_t kMaxBlockRows = 512;
  const int64_t row_bytes = std::max<int64_t>(1, dim) * static_cast<int64_t>(sizeof(T));
  const int64_t block_rows_max = std::clamp<int64_t>(kRowBlockBytes / row_bytes / 4 * 4, 4, kMaxBlockRows);
  const int64_t centers_per_block = std::max<int64_t>(4, kCenterBlockBytes / row_bytes / 4 * 4);
  T best_key[kMaxBlockRows];
  int64_t best_index[kMaxBlockRows];
  for (int64_t block_begin = 0; block_begin < num_rows; block_begin += block_rows_max) {
    const int64_t block_rows = std::min(num_rows - block_begin, block_rows_max);
    std::fill(best_key, best_key + block_rows, std::numeric_limits<T>::infinity());
    std::fill(best_index, best_index + block_rows, centers[0]);
    for (int64_t center_begin = 0; center_begin < num_centers; center_begin += centers_per_block) {
      const int64_t block_centers = std::min(num_centers - center_begin, centers_per_block);
      const bool last_center_block = center_begin + block_centers == num_centers;
      const int64_t rows_after = last_center_block ? num_rows - block_begin - block_rows : 0;
      scan_block<T, Bytes>(points, centers_data, dim, rows + block_begin, block_rows, rows_after,
                           centers + center_begin, block_centers, block_centers == num_centers, best_key, best_index);
    }
    for (int64_t r = 0; r < block_rows; ++r) {
      const int64_t row = rows[block_begin + r];
      sq_dist[row] = best_key[r] == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::quiet_NaN()
                                                                         : best_key[r];
      index[row] = best_index[r];
    }
  }
}

// One compiled copy per x86-64 level (AVX-512, AVX2, baseline SSE2), each with its own vector width; the widest the
// running CPU supports is picked once. Elsewhere, 16-byte vectors (NEON on arm64).
#if defined(__GNUC__) && defined(__x86_64__)
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void nearest_rows_avx512(const T* points, const T* centers_data,
                                                                   int64_t dim, const int64_t* rows,
                                                                   int64_t num_rows, const int64_t* centers,
                                                                   int64_t num_centers, T* sq_dist, int64_t* index) {
  nearest_rows<T, 64>(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}

template <typename T>
__attribute__((target("arch=x86-64-v3"))) void nearest_rows_avx2(const T* points, const T* centers_data,
                                                                 int64_t dim, const int64_t* rows, int64_t num_rows,
                                                                 const int64_t* centers, int64_t num_centers,
                                                                 T* sq_dist, int64_t* index) {
  nearest_rows<T, 32>(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}
#endif

template <typename T>
void nearest_rows_baseline(const T* points, const T* centers_data, int64_t dim, const int64_t* rows,
                           int64_t num_rows, const int64_t* centers, int64_t num_centers, T* sq_dist,
                           int64_t* index) {
  nearest_rows<T, 16>(points, centers_data, dim, rows, num_rows, centers, num_centers, sq_dist, index);
}

template <typename T>
using NearestRows = void (*)(const T*, const T*, int64_t, const int64_t*, int64_t, const int64_t*, int64_t, T*,
                             int64_t*);

// The copy for simd_level_for_this_cpu() (which ATEN_CPU_CAPABILITY can cap).
template <typename T>
NearestRows<T> nearest_rows_for_this_cpu() {
#if defined(__GNUC__) && defined(__x86_64__)
  switch (simd_level_for_this_cpu()) {
    case SimdLevel::avx512:
      return &nearest_rows_avx512<T>;
    case SimdLevel::avx2:
      return &nearest_rows_avx2<T>;
    case SimdLevel::baseline:
      break;
  }
#endif
  return &nearest_rows_baseline<T>;
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
  if (is_half_precision(points.scalar_type())) {
    // Half-precision inputs run the float32 kernel on float32 copies (a pass over N + M rows next to the N x M x D
    // search): distances are summed in float32 from the exact half values, then stored in the inputs' dtype.
    auto [sq_dist, index] = nearest_synthetic_cpu(points.to(at::kFloat), centers.to(at::kFloat), point_groups,
                                                  center_groups);
    return {sq_dist.to(points.scalar_type()), index};
  }
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
    static const NearestRows<scalar_t> kernel = nearest_rows_for_this_cpu<scalar_t>();
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
          kernel(p_data, c_data, dim, layout.rows.data() + pos, stop - pos, layout.centers.data() + first_center,
                 layout.center_start[slot + 1] - first_center, dist_data, index_data);
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
  if (is_half_precision(points.scalar_type())) {
    // As the forward: float32 copies, so grad_centers, a sum over each center's points, accumulates in float32.
    auto [grad_points, grad_centers] = nearest_synthetic_backward_cpu(grad_sq_dist.to(at::kFloat),
                                                                      points.to(at::kFloat), centers.to(at::kFloat),
                                                                      index);
    return {grad_points.to(points.scalar_type()), grad_centers.to(centers.scalar_type())};
  }
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
