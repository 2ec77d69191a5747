// CPU kernels of fastdd::diff_augment (the DSA map A(x)) and fastdd::diff_augment_adjoint (its transpose A^T(g)).
//
// Given its parameters every family is an affine map of the image, the same for each channel apart from color:
//   color    ((x_c - pm) s + pm - mx) k + mx + delta   with pm = the pixel's channel mean, mx = the image mean
//            (brightness adds delta, saturation s, contrast k; mean(x + delta after saturation) = mx + delta)
//   crop, flip, scale    separable: out[r, c] = sum of row taps x column taps (1 tap each, or 2 bilinear taps)
//   cutout               zeroes a rectangle
//   rotate               out[p] = sum of 4 bilinear taps (F.affine_grid + F.grid_sample, zero padding)
// The linear part of color is symmetric, so it is its own adjoint; a sampling stage's adjoint sends each tap's
// share back to its source pixel.
//
// Each image runs through all its families in per-thread scratch buffers, read once from memory and written once
// (parallel over images). Adjacent separable families are composed into one stage while each axis keeps at most 2
// taps (flip then scale is one stage). A separable axis map is a gather (out[i] = sum of weight x in[index]); its
// adjoint is the gather of the transposed map (built with the stage, O(H + W)), so both directions run the same
// code. A one-tap axis map (crop, flip and their compositions) is a shifted or reversed contiguous copy with zero
// fill, and runs as one. With several taps a separable stage first resamples every row along the columns, then
// combines whole rows (vector operations). Rotate works a pixel row at a time for all channels, its taps factored
// by axis (2 rows x 2 columns): the forward gathers them, the adjoint scatters the 4 products of each pixel, all
// channels of a pixel in one 4-lane update. Shared parameters (one row) build their stages once per call (rotate
// materialises its taps); per-image parameters build them per image, reusing the buffers, and compute rotate's
// taps a row at a time. A shared rotate on its own runs on blocks of 16 planes of the batch at once instead (float32,
// AVX-512): transposed so that one vector holds a pixel of all 16, each tap is one vector gather or scatter.
//
// Every tap reads a valid pixel (taps outside the image have weight 0 and a clamped index) and a zero-weight tap
// contributes a selected 0 rather than 0 * value (the rotate adjoint sends it to a spare pixel instead), so the hot
// loops have no branches and a non-finite value never leaks into zero-filled pixels. The per-image work is
// compiled for AVX-512, AVX2 and baseline x86-64 and the loader picks the copy for the running CPU. On CPUs with
// AVX-512 the float32 bilinear loops are hand-vectorised: a row of up to 32 pixels sits in two registers and a
// two-register permute reads 16 taps of it (the scale column pass; rotate permutes each input row a 16-pixel chunk
// touches), since x86 gathers are slower than scalar loads on some CPUs and GCC does not emit them when tuning for
// generic x86-64.
//
// bfloat16 and float16 images are widened to float32 an image at a time, run through the float32 code and narrowed
// back (the parameters are float64 and the plans float32, as for float32 images).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../diff_augment_checks.h"
#include "simd.h"

// The hand-vectorised float32 loops (see the top); they run only where cpu_has_avx512().
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTDD_HAS_AVX512_PATH 1
#define FASTDD_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#include <immintrin.h>
#else
#define FASTDD_HAS_AVX512_PATH 0
#endif

namespace fastdd {
namespace {

// out[i] = sum over t < taps of weight[t * size + i] * in[index[t * size + i]] along one axis of a separable stage.
// A tap outside the image has weight 0 and a valid, unused index.
template <typename T>
struct TapMap {
  int64_t size = 0;
  int64_t taps = 0;
  std::vector<int32_t> index;
  std::vector<T> weight;

  void resize(int64_t n, int64_t tap_count) {
    size = n;
    taps = tap_count;
    index.resize(n * tap_count);
    weight.resize(n * tap_count);
  }
  const int32_t* index_of(int64_t t) const { return index.data() + t * size; }
  const T* weight_of(int64_t t) const { return weight.data() + t * size; }
};

// A one-tap axis map as a copy: out[i] = in[source + (i - begin)] (in[source - (i - begin)] when reversed) for
// begin <= i < end, 0 elsewhere.
struct Shift {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t source = 0;
  bool reversed = false;
};

// `map` as a Shift if it is one (one tap of weight 1 on an interval, sources consecutive or reversed).
template <typename T>
bool as_shift(const TapMap<T>& map, Shift& shift) {
  if (map.taps != 1) {
    return false;
  }
  const int64_t n = map.size;
  const int32_t* index = map.index.data();
  const T* weight = map.weight.data();
  int64_t begin = 0;
  while (begin < n && weight[begin] == T(0)) {
    ++begin;
  }
  shift = Shift{begin, begin, begin < n ? index[begin] : 0, false};
  if (begin == n) {
    return true;
  }
  shift.reversed = begin + 1 < n && weight[begin + 1] != T(0) && index[begin + 1] == index[begin] - 1;
  const int64_t step = shift.reversed ? -1 : 1;
  int64_t end = begin;
  while (end < n && weight[end] == T(1) && index[end] == shift.source + step * (end - begin)) {
    ++end;
  }
  shift.end = end;
  for (int64_t i = end; i < n; ++i) {
    if (weight[i] != T(0)) {
      return false;
    }
  }
  return true;
}

struct ColorFactors {
  double brightness;
  double saturation;
  double contrast;
};

// Output coordinate (u, v) samples the input at (m00 u + m01 v, m10 u + m11 v).
template <typename T>
struct Affine2 {
  T m00, m01, m10, m11;
};

// The bilinear taps of pixels, factored by axis: pixel i reads rows top[i] and bottom[i] (weights wt, wb) and
// columns left[i] and right[i] (weights wl, wr). A tap outside the image has weight 0 and index 0.
template <typename T>
struct BilinearTaps {
  std::vector<int32_t> top, bottom, left, right;
  std::vector<T> wt, wb, wl, wr;

  void resize(int64_t n) {
    for (std::vector<int32_t>* v : {&top, &bottom, &left, &right}) {
      v->resize(n);
    }
    for (std::vector<T>* v : {&wt, &wb, &wl, &wr}) {
      v->resize(n);
    }
  }
};

// One axis of a separable stage in the direction being run: the gather map, and whether it is a plain copy.
template <typename T>
struct Axis {
  TapMap<T> map;
  Shift shift;
  bool is_shift = false;
};

enum class StageKind { kColor, kSeparable, kRectangle, kPixelMap };

template <typename T>
struct Stage {
  StageKind kind = StageKind::kColor;
  ColorFactors color{};
  Axis<T> rows, cols;  // kSeparable: out[r, c] = sum_a sum_b rows.w[r, a] cols.w[c, b] in[rows.i[r, a], cols.i[c, b]]
  Affine2<T> affine{};     // kPixelMap
  // kPixelMap with shared parameters: the taps of every pixel, and for the adjoint as four_taps gives them (row r
  // at entry 4 r W).
  BilinearTaps<T> pixels;
  std::vector<int32_t> four_index;
  std::vector<T> four_weight;
  bool materialised = false;
  int64_t top = 0, left = 0, bottom = 0, right = 0;  // kRectangle: rows [top, bottom) x columns [left, right) zeroed
};

// The stages of one image's transform in application order. Stage objects are kept when the plan is rebuilt, so
// per-image plans reuse their buffers.
template <typename T>
struct Plan {
  std::vector<Stage<T>> stages;
  int64_t size = 0;

  Stage<T>& add(StageKind kind) {
    if (size == static_cast<int64_t>(stages.size())) {
      stages.emplace_back();
    }
    stages[size].kind = kind;
    return stages[size++];
  }
  Stage<T>* last() { return size ? &stages[size - 1] : nullptr; }
};

struct Geometry {
  int64_t height;
  int64_t width;
  int64_t cutout_height;
  int64_t cutout_width;
  bool align_corners;
};

// Normalised coordinate of pixel i of n along one axis, as F.affine_grid's base grid computes it (torch.linspace's
// two-sided formula; shrunk by (n - 1) / n without align_corners; 0 for a single pixel).
template <typename T>
T base_coordinate(int64_t i, int64_t n, bool align_corners) {
  if (n <= 1) {
    return T(0);
  }
  const T step = T(2) / static_cast<T>(n - 1);
  T value = i < n / 2 ? T(-1) + step * static_cast<T>(i) : T(1) - step * static_cast<T>(n - 1 - i);
  if (!align_corners) {
    value = value * static_cast<T>(n - 1) / static_cast<T>(n);
  }
  return value;
}

// The parameter-free part of the bilinear families: each column's (u) and row's (v) normalised coordinate, and
// F.grid_sample's unnormalisation (g + 1) / 2 (n - 1), or ((g + 1) n - 1) / 2 without align_corners, written as
// g * half_extent + centre.
template <typename T>
struct SamplingGrid {
  std::vector<T> u, v;
  T half_width, centre_x, half_height, centre_y;

  explicit SamplingGrid(const Geometry& g) : u(g.width), v(g.height) {
    for (int64_t c = 0; c < g.width; ++c) {
      u[c] = base_coordinate<T>(c, g.width, g.align_corners);
    }
    for (int64_t r = 0; r < g.height; ++r) {
      v[r] = base_coordinate<T>(r, g.height, g.align_corners);
    }
    const T w = static_cast<T>(g.width), h = static_cast<T>(g.height);
    half_width = g.align_corners ? (w - T(1)) / T(2) : w / T(2);
    half_height = g.align_corners ? (h - T(1)) / T(2) : h / T(2);
    centre_x = (w - T(1)) / T(2);
    centre_y = (h - T(1)) / T(2);
  }
};

// The two bilinear taps of pixel coordinate `at` along an axis of n pixels (zero padding): indices and weights.
// Branch-free (bitwise & and selects), so loops over pixels vectorise.
template <typename T>
FASTDD_ALWAYS_INLINE void linear_taps(T at, int32_t n, int32_t& low_index, int32_t& high_index, T& low_weight,
                                      T& high_weight) {
  // Both taps are outside unless -1 < at < n (also false for NaN).
  const bool useful = (at > T(-1)) & (at < static_cast<T>(n));
  at = useful ? at : T(0);
  // floor by truncating the positive at + 1 (std::floor is a libm call on baseline x86-64).
  const int32_t low = static_cast<int32_t>(at + T(1)) - 1;
  const T frac = at - static_cast<T>(low);
  const bool low_inside = useful & (low >= 0), high_inside = useful & (low + 1 < n);
  low_index = low_inside ? low : 0;
  high_index = high_inside ? low + 1 : 0;
  low_weight = low_inside ? T(1) - frac : T(0);
  high_weight = high_inside ? frac : T(0);
}

// One-tap axis map i -> i + shift (zero outside), or i -> n - 1 - i when mirrored.
template <typename T>
void fill_axis_shift(int64_t n, int64_t shift, bool mirror, TapMap<T>& map) {
  map.resize(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t source = mirror ? n - 1 - i : i + shift;
    const bool inside = source >= 0 && source < n;
    map.index[i] = inside ? static_cast<int32_t>(source) : 0;
    map.weight[i] = inside ? T(1) : T(0);
  }
}

// Two-tap axis map: output coordinate g samples the input at factor * g (F.affine_grid with a diagonal theta).
template <typename T>
void fill_axis_scale(const std::vector<T>& coordinates, T factor, T half_extent, T centre, TapMap<T>& map) {
  const int64_t n = static_cast<int64_t>(coordinates.size());
  map.resize(n, 2);
  for (int64_t i = 0; i < n; ++i) {
    linear_taps<T>(factor * coordinates[i] * half_extent + centre, static_cast<int32_t>(n), map.index[i],
                   map.index[n + i], map.weight[i], map.weight[n + i]);
  }
}

// The taps of the pixels of row r, written at entries offset .. offset + W of `taps`.
template <typename T>
FASTDD_ALWAYS_INLINE void bilinear_row(const Affine2<T>& m, const SamplingGrid<T>& grid, int64_t r,
                                       BilinearTaps<T>& taps, int64_t offset) {
  const int32_t height = static_cast<int32_t>(grid.v.size()), width = static_cast<int32_t>(grid.u.size());
  // Locals and restrict pointers: the stores must not look as if they could change the grid or the factors.
  const T v = grid.v[r], half_width = grid.half_width, centre_x = grid.centre_x;
  const T half_height = grid.half_height, centre_y = grid.centre_y;
  const T x_row = m.m01 * v, y_row = m.m11 * v, m00 = m.m00, m10 = m.m10;
  const T* __restrict u = grid.u.data();
  int32_t* __restrict top = taps.top.data() + offset;
  int32_t* __restrict bottom = taps.bottom.data() + offset;
  int32_t* __restrict left = taps.left.data() + offset;
  int32_t* __restrict right = taps.right.data() + offset;
  T* __restrict wt = taps.wt.data() + offset;
  T* __restrict wb = taps.wb.data() + offset;
  T* __restrict wl = taps.wl.data() + offset;
  T* __restrict wr = taps.wr.data() + offset;
  for (int32_t c = 0; c < width; ++c) {
    linear_taps<T>((m00 * u[c] + x_row) * half_width + centre_x, width, left[c], right[c], wl[c], wr[c]);
    linear_taps<T>((m10 * u[c] + y_row) * half_height + centre_y, height, top[c], bottom[c], wt[c], wb[c]);
  }
}

#if FASTDD_HAS_AVX512_PATH
// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the unused merge source, which -Wmaybe-uninitialized
// reports (GCC bug 105593).
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
bool cpu_has_avx512() { return simd_level_for_this_cpu() == SimdLevel::avx512; }

// Lanes of the first `count` of 16 (all when count >= 16, none when count <= 0).
FASTDD_AVX512 inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// out[y, c] = sum over taps t of weight[t * width + c] * in[y, index[t * width + c]] for the rows y < rows of a
// float32 plane of width <= 32 (zero-weight taps selected out). The taps are the same for every row: with up to
// kHeldTaps of them they are loaded into registers once.
FASTDD_AVX512 void gather_columns_avx512(const TapMap<float>& map, const float* in, float* out, int64_t rows,
                                         int64_t width) {
  constexpr int64_t kHeldTaps = 4;
  const __mmask16 low_lanes = first_lanes(width), high_lanes = first_lanes(width - 16);
  const int64_t taps = map.taps;
  if (taps <= kHeldTaps) {
    __m512i index[2][kHeldTaps];
    __m512 weight[2][kHeldTaps];
    __mmask16 use[2][kHeldTaps];
    for (int64_t h = 0; h < 2; ++h) {
      const __mmask16 lanes = first_lanes(width - 16 * h);
      for (int64_t t = 0; t < taps; ++t) {
        index[h][t] = _mm512_maskz_loadu_epi32(lanes, map.index_of(t) + 16 * h);
        weight[h][t] = _mm512_maskz_loadu_ps(lanes, map.weight_of(t) + 16 * h);
        use[h][t] = _mm512_cmpneq_ps_mask(weight[h][t], _mm512_setzero_ps());
      }
    }
    for (int64_t y = 0; y < rows; ++y) {
      const __m512 low = _mm512_maskz_loadu_ps(low_lanes, in + y * width);
      const __m512 high = _mm512_maskz_loadu_ps(high_lanes, in + y * width + 16);
      for (int64_t h = 0; h < 2; ++h) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t t = 0; t < taps; ++t) {
          acc = _mm512_mask3_fmadd_ps(weight[h][t], _mm512_permutex2var_ps(low, index[h][t], high), acc, use[h][t]);
        }
        _mm512_mask_storeu_ps(out + y * width + 16 * h, h == 0 ? low_lanes : high_lanes, acc);
      }
    }
    return;
  }
  for (int64_t y = 0; y < rows; ++y) {
    const __m512 low = _mm512_maskz_loadu_ps(low_lanes, in + y * width);
    const __m512 high = _mm512_maskz_loadu_ps(high_lanes, in + y * width + 16);
    for (int64_t c = 0; c < width; c += 16) {
      const __mmask16 lanes = first_lanes(width - c);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t t = 0; t < taps; ++t) {
        const __m512i index = _mm512_maskz_loadu_epi32(lanes, map.index_of(t) + c);
        const __m512 weight = _mm512_maskz_loadu_ps(lanes, map.weight_of(t) + c);
        const __m512 value = _mm512_permutex2var_ps(low, index, high);
        acc = _mm512_mask3_fmadd_ps(weight, value, acc, _mm512_cmpneq_ps_mask(weight, _mm512_setzero_ps()));
      }
      _mm512_mask_storeu_ps(out + y * width + c, lanes, acc);
    }
  }
}

// Lanes i of the 16 from `first` whose column first + i lies in [begin, end), bit-reversed when `reversed`.
FASTDD_AVX512 inline __mmask16 column_lanes(int64_t first, int64_t begin, int64_t end, bool reversed) {
  unsigned bits = 0;
  for (int64_t i = 0; i < 16; ++i) {
    if (first + i >= begin && first + i < end) {
      bits |= 1u << (reversed ? 15 - i : i);
    }
  }
  return __mmask16(bits);
}

// A one-tap separable stage on a float32 plane of width <= 32 whose columns are a Shift: each output row is two
// masked loads of its source row (lanes outside the shift load nothing and read 0), reversed by a permute when the
// shift is, then scaled by its row weight (0 or 1 from crop and flip; any one-tap weight from a transposed map).
FASTDD_AVX512 void shift_plane_avx512(const TapMap<float>& rows, const Shift& shift, const float* in, float* out,
                                      int64_t height, int64_t width) {
  const __mmask16 low_lanes = first_lanes(width), high_lanes = first_lanes(width - 16);
  const __mmask16 low_valid = column_lanes(0, shift.begin, shift.end, shift.reversed);
  const __mmask16 high_valid = column_lanes(16, shift.begin, shift.end, shift.reversed);
  const __m512i reverse = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Output column i reads source + (i - begin), or source - (i - begin): the 16-wide block each half loads from.
  const int64_t low_start = shift.reversed ? shift.source + shift.begin - 15 : shift.source - shift.begin;
  const int64_t high_start = shift.reversed ? low_start - 16 : low_start + 16;
  for (int64_t r = 0; r < height; ++r) {
    const float w = rows.weight[r];
    __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
    if (w != 0.0f) {
      const float* source = in + rows.index[r] * width;
      low = _mm512_maskz_loadu_ps(low_valid, source + low_start);
      high = _mm512_maskz_loadu_ps(high_valid, source + high_start);
      if (shift.reversed) {
        low = _mm512_permutexvar_ps(reverse, low);
        high = _mm512_permutexvar_ps(reverse, high);
      }
      if (w != 1.0f) {
        low = _mm512_mul_ps(low, _mm512_set1_ps(w));
        high = _mm512_mul_ps(high, _mm512_set1_ps(w));
      }
    }
    _mm512_mask_storeu_ps(out + r * width, low_lanes, low);
    _mm512_mask_storeu_ps(out + r * width + 16, high_lanes, high);
  }
}

// The bilinear taps of 16 pixels (BilinearTaps fields as vectors).
struct TapVectors {
  __m512i top, bottom, left, right;
  __m512 wt, wb, wl, wr;
};

// linear_taps on the 16 coordinates `at`.
FASTDD_AVX512 inline void linear_taps_avx512(__m512 at, int32_t n, __m512i& low_index, __m512i& high_index,
                                             __m512& low_weight, __m512& high_weight) {
  const __mmask16 useful = _mm512_cmp_ps_mask(at, _mm512_set1_ps(-1.0f), _CMP_GT_OQ) &
                           _mm512_cmp_ps_mask(at, _mm512_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
  at = _mm512_maskz_mov_ps(useful, at);
  const __m512i low = _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(at, _mm512_set1_ps(1.0f))),
                                       _mm512_set1_epi32(1));
  const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(1));
  const __m512 frac = _mm512_sub_ps(at, _mm512_cvtepi32_ps(low));
  const __mmask16 low_inside = useful & _mm512_cmpge_epi32_mask(low, _mm512_setzero_si512());
  const __mmask16 high_inside = useful & _mm512_cmplt_epi32_mask(high, _mm512_set1_epi32(n));
  low_index = _mm512_maskz_mov_epi32(low_inside, low);
  high_index = _mm512_maskz_mov_epi32(high_inside, high);
  low_weight = _mm512_maskz_sub_ps(low_inside, _mm512_set1_ps(1.0f), frac);
  high_weight = _mm512_maskz_mov_ps(high_inside, frac);
}

// bilinear_row for the pixels c .. c + 16 of row r (lanes past the width get zero weights).
FASTDD_AVX512 inline TapVectors compute_taps(const Affine2<float>& m, const SamplingGrid<float>& grid, int64_t r,
                                             int64_t c, __mmask16 lanes) {
  const int32_t height = static_cast<int32_t>(grid.v.size()), width = static_cast<int32_t>(grid.u.size());
  const float v = grid.v[r];
  const __m512 u = _mm512_maskz_loadu_ps(lanes, grid.u.data() + c);
  const __m512 x = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(m.m00), u, _mm512_set1_ps(m.m01 * v)),
                                   _mm512_set1_ps(grid.half_width), _mm512_set1_ps(grid.centre_x));
  const __m512 y = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(m.m10), u, _mm512_set1_ps(m.m11 * v)),
                                   _mm512_set1_ps(grid.half_height), _mm512_set1_ps(grid.centre_y));
  TapVectors t;
  linear_taps_avx512(x, width, t.left, t.right, t.wl, t.wr);
  linear_taps_avx512(y, height, t.top, t.bottom, t.wt, t.wb);
  const __m512 zero = _mm512_setzero_ps();
  t.wt = _mm512_mask_mov_ps(zero, lanes, t.wt);
  t.wb = _mm512_mask_mov_ps(zero, lanes, t.wb);
  return t;
}

FASTDD_AVX512 inline TapVectors load_taps(const BilinearTaps<float>& taps, int64_t at, __mmask16 lanes) {
  return {_mm512_maskz_loadu_epi32(lanes, taps.top.data() + at),
          _mm512_maskz_loadu_epi32(lanes, taps.bottom.data() + at),
          _mm512_maskz_loadu_epi32(lanes, taps.left.data() + at),
          _mm512_maskz_loadu_epi32(lanes, taps.right.data() + at),
          _mm512_maskz_loadu_ps(lanes, taps.wt.data() + at),
          _mm512_maskz_loadu_ps(lanes, taps.wb.data() + at),
          _mm512_maskz_loadu_ps(lanes, taps.wl.data() + at),
          _mm512_maskz_loadu_ps(lanes, taps.wr.data() + at)};
}

// The taps of row r: stored taps (entries offset .. offset + W) when given, else computed.
struct RowTapSource {
  const BilinearTaps<float>* taps;
  int64_t offset;
  const Affine2<float>* affine;
  const SamplingGrid<float>* grid;
  int64_t row;
};

FASTDD_AVX512 inline TapVectors row_tap_vectors(const RowTapSource& source, int64_t c, __mmask16 lanes) {
  return source.taps != nullptr ? load_taps(*source.taps, source.offset + c, lanes)
                                : compute_taps(*source.affine, *source.grid, source.row, c, lanes);
}

// bilinear_row for float32 (any width), 16 pixels at a time.
FASTDD_AVX512 void bilinear_row_avx512_taps(const Affine2<float>& m, const SamplingGrid<float>& grid, int64_t r,
                                            BilinearTaps<float>& taps, int64_t offset) {
  const int64_t width = static_cast<int64_t>(grid.u.size());
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 lanes = first_lanes(width - c);
    const TapVectors t = compute_taps(m, grid, r, c, lanes);
    const int64_t at = offset + c;
    _mm512_mask_storeu_epi32(taps.top.data() + at, lanes, t.top);
    _mm512_mask_storeu_epi32(taps.bottom.data() + at, lanes, t.bottom);
    _mm512_mask_storeu_epi32(taps.left.data() + at, lanes, t.left);
    _mm512_mask_storeu_epi32(taps.right.data() + at, lanes, t.right);
    _mm512_mask_storeu_ps(taps.wt.data() + at, lanes, t.wt);
    _mm512_mask_storeu_ps(taps.wb.data() + at, lanes, t.wb);
    _mm512_mask_storeu_ps(taps.wl.data() + at, lanes, t.wl);
    _mm512_mask_storeu_ps(taps.wr.data() + at, lanes, t.wr);
  }
}

// The 4 taps of the pixels of a row as index[t * width + c], weight[t * width + c], in the order (top, left),
// (top, right), (bottom, left), (bottom, right); a zero-weight tap t gets index spare + t.
FASTDD_AVX512 void four_taps_avx512(const RowTapSource& source, int32_t width, int32_t spare, int32_t* index,
                                    float* weight) {
  const __m512i row_stride = _mm512_set1_epi32(width);
  const __m512 zero = _mm512_setzero_ps();
  for (int32_t c = 0; c < width; c += 16) {
    const __mmask16 lanes = first_lanes(width - c);
    const TapVectors v = row_tap_vectors(source, c, lanes);
    const __m512i rows[2] = {_mm512_mullo_epi32(v.top, row_stride), _mm512_mullo_epi32(v.bottom, row_stride)};
    const __m512i cols[2] = {v.left, v.right};
    const __m512 row_weights[2] = {v.wt, v.wb};
    const __m512 col_weights[2] = {v.wl, v.wr};
    for (int32_t t = 0; t < 4; ++t) {
      const __m512 w = _mm512_mul_ps(row_weights[t / 2], col_weights[t % 2]);
      const __m512i i = _mm512_mask_mov_epi32(_mm512_add_epi32(rows[t / 2], cols[t % 2]),
                                              _mm512_cmpeq_ps_mask(w, zero), _mm512_set1_epi32(spare + t));
      _mm512_mask_storeu_epi32(index + t * width + c, lanes, i);
      _mm512_mask_storeu_ps(weight + t * width + c, lanes, w);
    }
  }
}

// One output row of a float32 image of width <= 32 from its bilinear taps, every channel: for each input row the 16
// lanes of a chunk touch, the row is permuted into both column taps, combined horizontally, and added to the lanes
// whose top or bottom tap it is.
FASTDD_AVX512 void bilinear_row_avx512(const RowTapSource& source, const float* in, float* out, int64_t channels,
                                       int64_t pixels, int64_t width) {
  const __mmask16 low_lanes = first_lanes(width), high_lanes = first_lanes(width - 16);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 lanes = first_lanes(width - c);
    const TapVectors v = row_tap_vectors(source, c, lanes);
    const __mmask16 use_top = _mm512_cmpneq_ps_mask(v.wt, zero), use_bottom = _mm512_cmpneq_ps_mask(v.wb, zero);
    const __mmask16 use_left = _mm512_cmpneq_ps_mask(v.wl, zero), use_right = _mm512_cmpneq_ps_mask(v.wr, zero);
    if ((use_top | use_bottom) == 0) {
      for (int64_t ch = 0; ch < channels; ++ch) {
        _mm512_mask_storeu_ps(out + ch * pixels + c, lanes, zero);
      }
      continue;
    }
    const int32_t first = std::min(_mm512_mask_reduce_min_epi32(use_top, v.top),
                                   _mm512_mask_reduce_min_epi32(use_bottom, v.bottom));
    const int32_t last = std::max(_mm512_mask_reduce_max_epi32(use_top, v.top),
                                  _mm512_mask_reduce_max_epi32(use_bottom, v.bottom));
    for (int64_t ch = 0; ch < channels; ++ch) {
      const float* plane = in + ch * pixels;
      __m512 acc = zero;
      for (int32_t y = first; y <= last; ++y) {
        const __m512 low = _mm512_maskz_loadu_ps(low_lanes, plane + y * width);
        const __m512 high = _mm512_maskz_loadu_ps(high_lanes, plane + y * width + 16);
        __m512 line = _mm512_maskz_mul_ps(use_left, v.wl, _mm512_permutex2var_ps(low, v.left, high));
        line = _mm512_mask3_fmadd_ps(v.wr, _mm512_permutex2var_ps(low, v.right, high), line, use_right);
        const __m512i row = _mm512_set1_epi32(y);
        acc = _mm512_mask3_fmadd_ps(v.wt, line, acc, _mm512_mask_cmpeq_epi32_mask(use_top, v.top, row));
        acc = _mm512_mask3_fmadd_ps(v.wb, line, acc, _mm512_mask_cmpeq_epi32_mask(use_bottom, v.bottom, row));
      }
      _mm512_mask_storeu_ps(out + ch * pixels + c, lanes, acc);
    }
  }
}
// Transposes the 16 x 16 floats in r (row i becomes column i).
FASTDD_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16], v[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      v[8 * i + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0x88);
      v[8 * i + 4 + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0xDD);
    }
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(v[4 + k], v[12 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0xDD);
    r[12 + k] = _mm512_shuffle_f32x4(v[4 + k], v[12 + k], 0xDD);
  }
}

// Shared rotate on up to 16 float32 planes [count, pixels] at once, the planes side by side (one vector per pixel,
// rows of 16 in `side`, `sum`, each pixels + 4 rows): one gather of 4 vectors per output pixel, or in the adjoint
// one scatter of 4, serves all of them, and register transposes of 16 x 16 tiles move the planes in and out. The taps
// are stage.four_index / four_weight, whose zero-weight taps point at the 4 spare rows (kept 0 in `side`).
FASTDD_AVX512 void rotate_planes_avx512(const int32_t* four_index, const float* four_weight, bool adjoint,
                                        const float* in, float* out, int64_t count, int64_t height, int64_t width,
                                        float* side, float* sum) {
  const int64_t pixels = height * width;
  const __m512 zero = _mm512_setzero_ps();
  __m512 tile[16];
  for (int64_t q = 0; q < pixels; q += 16) {
    const __mmask16 lanes = first_lanes(pixels - q);
    for (int64_t j = 0; j < 16; ++j) {
      tile[j] = j < count ? _mm512_maskz_loadu_ps(lanes, in + j * pixels + q) : zero;
    }
    transpose16(tile);
    for (int64_t i = 0; i < 16 && q + i < pixels; ++i) {
      _mm512_storeu_ps(side + (q + i) * 16, tile[i]);
    }
  }
  for (int64_t i = pixels; i < pixels + 4; ++i) {
    _mm512_storeu_ps(side + i * 16, zero);
    _mm512_storeu_ps(sum + i * 16, zero);
  }
  if (adjoint) {
    for (int64_t i = 0; i < pixels; ++i) {
      _mm512_storeu_ps(sum + i * 16, zero);
    }
  }
  for (int64_t r = 0; r < height; ++r) {
    const int32_t* index = four_index + 4 * r * width;
    const float* weight = four_weight + 4 * r * width;
    for (int64_t c = 0; c < width; ++c) {
      const int64_t p = r * width + c;
      if (!adjoint) {
        __m512 acc = zero;
        for (int64_t t = 0; t < 4; ++t) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(weight[t * width + c]),
                                _mm512_loadu_ps(side + 16 * static_cast<int64_t>(index[t * width + c])), acc);
        }
        _mm512_storeu_ps(sum + p * 16, acc);
        continue;
      }
      if (weight[c] == 0.0f && weight[width + c] == 0.0f && weight[2 * width + c] == 0.0f &&
          weight[3 * width + c] == 0.0f) {
        continue;
      }
      const __m512 value = _mm512_loadu_ps(side + p * 16);
      for (int64_t t = 0; t < 4; ++t) {
        float* target = sum + 16 * static_cast<int64_t>(index[t * width + c]);
        _mm512_storeu_ps(target, _mm512_fmadd_ps(_mm512_set1_ps(weight[t * width + c]), value,
                                                 _mm512_loadu_ps(target)));
      }
    }
  }
  for (int64_t q = 0; q < pixels; q += 16) {
    const __mmask16 lanes = first_lanes(pixels - q);
    for (int64_t i = 0; i < 16; ++i) {
      tile[i] = q + i < pixels ? _mm512_loadu_ps(sum + (q + i) * 16) : zero;
    }
    transpose16(tile);
    for (int64_t j = 0; j < count; ++j) {
      _mm512_mask_storeu_ps(out + j * pixels + q, lanes, tile[j]);
    }
  }
}

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

template <typename T>
FASTDD_ALWAYS_INLINE bool permute_path(int64_t width) {
#if FASTDD_HAS_AVX512_PATH
  return std::is_same<T, float>::value && width <= 32 && cpu_has_avx512();
#else
  (void)width;
  return false;
#endif
}

// bilinear_row, vectorised for float32 on CPUs with AVX-512 (both directions and both parameter layouts use the
// same copy, so the adjoint stays the forward's exact transpose).
template <typename T>
FASTDD_ALWAYS_INLINE void row_taps(const Affine2<T>& m, const SamplingGrid<T>& grid, int64_t r, BilinearTaps<T>& taps,
                                   int64_t offset) {
#if FASTDD_HAS_AVX512_PATH
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx512()) {
      bilinear_row_avx512_taps(m, grid, r, taps, offset);
      return;
    }
  }
#endif
  bilinear_row(m, grid, r, taps, offset);
}

// The 4 taps of the pixels 0 .. width of `taps` (from entry offset) as index[t * width + c], weight[t * width + c],
// in the order (top, left), (top, right), (bottom, left), (bottom, right). With `to_spares` a zero-weight tap t
// gets index spare + t (see pixel_map_image).
template <typename T>
FASTDD_ALWAYS_INLINE void four_taps(const BilinearTaps<T>& taps, int64_t offset, int64_t width, bool to_spares,
                                    int32_t spare, int32_t* index, T* weight) {
#if FASTDD_HAS_AVX512_PATH
  if constexpr (std::is_same<T, float>::value) {
    if (to_spares && cpu_has_avx512()) {
      four_taps_avx512({&taps, offset, nullptr, nullptr, 0}, static_cast<int32_t>(width), spare, index, weight);
      return;
    }
  }
#endif
  const int32_t w32 = static_cast<int32_t>(width);
  const int32_t *top = taps.top.data() + offset, *bottom = taps.bottom.data() + offset;
  const int32_t *left = taps.left.data() + offset, *right = taps.right.data() + offset;
  const T *wt = taps.wt.data() + offset, *wb = taps.wb.data() + offset;
  const T *wl = taps.wl.data() + offset, *wr = taps.wr.data() + offset;
  for (int64_t c = 0; c < width; ++c) {
    const T w[4] = {wt[c] * wl[c], wt[c] * wr[c], wb[c] * wl[c], wb[c] * wr[c]};
    const int32_t i[4] = {top[c] * w32 + left[c], top[c] * w32 + right[c], bottom[c] * w32 + left[c],
                          bottom[c] * w32 + right[c]};
    for (int64_t t = 0; t < 4; ++t) {
      weight[t * width + c] = w[t];
      index[t * width + c] = to_spares && w[t] == T(0) ? spare + static_cast<int32_t>(t) : i[t];
    }
  }
}

// out = later after earlier: each tap of `later` continues through the taps of `earlier` (weights multiply).
template <typename T>
void compose(const TapMap<T>& later, const TapMap<T>& earlier, TapMap<T>& out) {
  const int64_t ka = later.taps, kb = earlier.taps, size = later.size;
  out.resize(size, ka * kb);
  for (int64_t a = 0; a < ka; ++a) {
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t t = a * kb + b;
      for (int64_t i = 0; i < size; ++i) {
        const int32_t middle = later.index[a * size + i];
        out.index[t * size + i] = earlier.index[b * earlier.size + middle];
        out.weight[t * size + i] = later.weight[a * size + i] * earlier.weight[b * earlier.size + middle];
      }
    }
  }
}

// The transposed map as a gather: entry j lists the (i, weight) with map.index[t, i] == j and a nonzero weight,
// padded with zero-weight taps to the largest count.
template <typename T>
void transpose(const TapMap<T>& map, int64_t source_size, TapMap<T>& out, std::vector<int32_t>& count) {
  count.assign(source_size, 0);
  for (int64_t slot = 0; slot < map.taps * map.size; ++slot) {
    count[map.index[slot]] += map.weight[slot] != T(0);
  }
  const int64_t taps = std::max<int64_t>(1, *std::max_element(count.begin(), count.end()));
  out.size = source_size;
  out.taps = taps;
  out.index.assign(taps * source_size, 0);
  out.weight.assign(taps * source_size, T(0));
  std::fill(count.begin(), count.end(), 0);
  for (int64_t t = 0; t < map.taps; ++t) {
    for (int64_t i = 0; i < map.size; ++i) {
      const T w = map.weight[t * map.size + i];
      if (w != T(0)) {
        const int32_t j = map.index[t * map.size + i];
        const int64_t slot = count[j]++ * source_size + j;
        out.index[slot] = static_cast<int32_t>(i);
        out.weight[slot] = w;
      }
    }
  }
}

// Scratch of one thread for building plans.
template <typename T>
struct PlanWorkspace {
  TapMap<T> rows, cols, composed;
  std::vector<int32_t> count;
};

// Appends the separable stage (rows, cols), composing it into the previous stage when that one is separable too
// and each axis keeps at most 2 taps.
template <typename T>
void add_separable(Plan<T>& plan, PlanWorkspace<T>& work) {
  Stage<T>* last = plan.last();
  if (last != nullptr && last->kind == StageKind::kSeparable && last->rows.map.taps * work.rows.taps <= 2 &&
      last->cols.map.taps * work.cols.taps <= 2) {
    compose(work.rows, last->rows.map, work.composed);
    std::swap(last->rows.map, work.composed);
    compose(work.cols, last->cols.map, work.composed);
    std::swap(last->cols.map, work.composed);
    return;
  }
  Stage<T>& stage = plan.add(StageKind::kSeparable);
  std::swap(stage.rows.map, work.rows);
  std::swap(stage.cols.map, work.cols);
}

// Readies an axis of a separable stage to run in the given direction.
template <typename T>
void finish_axis(Axis<T>& axis, bool adjoint, PlanWorkspace<T>& work) {
  if (adjoint) {
    transpose(axis.map, axis.map.size, work.composed, work.count);
    std::swap(axis.map, work.composed);
  }
  axis.is_shift = as_shift(axis.map, axis.shift);
}

template <typename T>
void build_plan(const std::vector<AugmentFamily>& families, const double* real, const int64_t* ints,
                const Geometry& g, const SamplingGrid<T>& grid, bool shared, bool adjoint, Plan<T>& plan,
                PlanWorkspace<T>& work) {
  plan.size = 0;
  for (const AugmentFamily family : families) {
    switch (family) {
      case AugmentFamily::kColor: {
        plan.add(StageKind::kColor).color = {real[kBrightness], real[kSaturation], real[kContrast]};
        break;
      }
      case AugmentFamily::kCrop: {
        if (ints[kCropRow] == 0 && ints[kCropCol] == 0) {
          break;
        }
        fill_axis_shift<T>(g.height, ints[kCropRow], false, work.rows);
        fill_axis_shift<T>(g.width, ints[kCropCol], false, work.cols);
        add_separable(plan, work);
        break;
      }
      case AugmentFamily::kFlip: {
        if (ints[kFlip] == 0) {
          break;
        }
        fill_axis_shift<T>(g.height, 0, false, work.rows);
        fill_axis_shift<T>(g.width, 0, true, work.cols);
        add_separable(plan, work);
        break;
      }
      case AugmentFamily::kScale: {
        fill_axis_scale<T>(grid.v, static_cast<T>(real[kScaleY]), grid.half_height, grid.centre_y, work.rows);
        fill_axis_scale<T>(grid.u, static_cast<T>(real[kScaleX]), grid.half_width, grid.centre_x, work.cols);
        add_separable(plan, work);
        break;
      }
      case AugmentFamily::kCutout: {
        Stage<T>& stage = plan.add(StageKind::kRectangle);
        stage.top = std::clamp<int64_t>(ints[kCutoutRow] - g.cutout_height / 2, 0, g.height);
        stage.left = std::clamp<int64_t>(ints[kCutoutCol] - g.cutout_width / 2, 0, g.width);
        stage.bottom = std::clamp<int64_t>(ints[kCutoutRow] - g.cutout_height / 2 + g.cutout_height, 0, g.height);
        stage.right = std::clamp<int64_t>(ints[kCutoutCol] - g.cutout_width / 2 + g.cutout_width, 0, g.width);
        break;
      }
      case AugmentFamily::kRotate: {
        // The reference builds theta = [[cos, -sin], [sin, cos]] in the images' dtype.
        const T angle = static_cast<T>(real[kRotation]);
        const T cos = std::cos(angle), sin = std::sin(angle);
        Stage<T>& stage = plan.add(StageKind::kPixelMap);
        stage.affine = {cos, -sin, sin, cos};
        stage.materialised = shared;
        if (shared) {
          stage.pixels.resize(g.height * g.width);
          for (int64_t r = 0; r < g.height; ++r) {
            row_taps(stage.affine, grid, r, stage.pixels, r * g.width);
          }
          {  // both directions: rotate_planes_avx512 reads them too
            stage.four_index.resize(4 * g.height * g.width);
            stage.four_weight.resize(4 * g.height * g.width);
            for (int64_t r = 0; r < g.height; ++r) {
              four_taps(stage.pixels, r * g.width, g.width, true, static_cast<int32_t>(g.height * g.width),
                        stage.four_index.data() + 4 * r * g.width, stage.four_weight.data() + 4 * r * g.width);
            }
          }
        }
        break;
      }
    }
  }
  for (int64_t s = 0; s < plan.size; ++s) {
    Stage<T>& stage = plan.stages[s];
    if (stage.kind == StageKind::kSeparable) {
      finish_axis(stage.rows, adjoint, work);
      finish_axis(stage.cols, adjoint, work);
    }
  }
}

// Sum of n values in double, in 32 independent lanes: a single running sum cannot be vectorised, and a few vector
// accumulators would wait on the latency of their additions.
template <typename T>
FASTDD_ALWAYS_INLINE double sum_values(const T* values, int64_t n) {
  constexpr int64_t kLanes = 32;
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<double>(values[i + l]);
    }
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  double total = lanes[0];
  for (; i < n; ++i) {
    total += static_cast<double>(values[i]);
  }
  return total;
}

// Scratch of one thread for running images: two images, one plane, an image with 4 spare pixels in planes and in
// pixel-major lanes (see scatter_row), and the taps of one pixel row.
template <typename T>
struct RunWorkspace {
  std::vector<T> images, plane, padded, lanes, row_weight;
  std::vector<int32_t> row_index;
  BilinearTaps<T> row_taps;
  RunWorkspace(int64_t channels, int64_t pixels, int64_t width)
      : images(2 * channels * pixels),
        plane(pixels),
        padded(channels * (pixels + 4)),
        lanes(4 * (pixels + 4)),
        row_weight(4 * width),
        row_index(4 * width) {
    row_taps.resize(width);
  }
};

// The color map on one image [channels, pixels]; its linear part (with_offset false) is symmetric, hence also the
// adjoint.
template <typename T>
FASTDD_ALWAYS_INLINE void apply_color(const ColorFactors& f, bool with_offset, const T* src, T* dst, int64_t channels,
                                      int64_t pixels, T* pixel_mean) {
  const T image_mean = static_cast<T>(sum_values(src, channels * pixels) / static_cast<double>(channels * pixels));
  const T s = static_cast<T>(f.saturation), k = static_cast<T>(f.contrast);
  const T shift = image_mean + (with_offset ? static_cast<T>(f.brightness) : T(0));
  if (channels == 1) {  // saturation is a no-op
    for (int64_t p = 0; p < pixels; ++p) {
      dst[p] = (src[p] - image_mean) * k + shift;
    }
    return;
  }
  std::copy(src, src + pixels, pixel_mean);
  for (int64_t c = 1; c < channels; ++c) {
    const T* plane = src + c * pixels;
    for (int64_t p = 0; p < pixels; ++p) {
      pixel_mean[p] += plane[p];
    }
  }
  const T inv_channels = T(1) / static_cast<T>(channels);
  for (int64_t p = 0; p < pixels; ++p) {
    pixel_mean[p] *= inv_channels;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const T* in = src + c * pixels;
    T* out = dst + c * pixels;
    for (int64_t p = 0; p < pixels; ++p) {
      out[p] = ((in[p] - pixel_mean[p]) * s + pixel_mean[p] - image_mean) * k + shift;
    }
  }
}

// weight * value, or 0 for a zero weight whatever the value.
template <typename T>
FASTDD_ALWAYS_INLINE T tap(T weight, T value) {
  return weight != T(0) ? weight * value : T(0);
}

// out[i] = sum over the taps of entry i of `map`, i < n (out is overwritten).
template <typename T>
FASTDD_ALWAYS_INLINE void gather_line(const TapMap<T>& map, const T* in, T* out, int64_t n) {
  const int32_t* i0 = map.index_of(0);
  const T* w0 = map.weight_of(0);
  if (map.taps == 2) {
    const int32_t* i1 = map.index_of(1);
    const T* w1 = map.weight_of(1);
    for (int64_t i = 0; i < n; ++i) {
      out[i] = tap(w0[i], in[i0[i]]) + tap(w1[i], in[i1[i]]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    out[i] = tap(w0[i], in[i0[i]]);
  }
  for (int64_t t = 1; t < map.taps; ++t) {
    const int32_t* index = map.index_of(t);
    const T* weight = map.weight_of(t);
    for (int64_t i = 0; i < n; ++i) {
      out[i] += tap(weight[i], in[index[i]]);
    }
  }
}

// One line through a Shift: a (reversed) copy and zero fill.
template <typename T>
FASTDD_ALWAYS_INLINE void shift_line(const Shift& shift, const T* in, T* out, int64_t n) {
  std::fill(out, out + shift.begin, T(0));
  const int64_t count = shift.end - shift.begin;
  if (shift.reversed) {
    const T* from = in + shift.source;
    T* to = out + shift.begin;
    for (int64_t i = 0; i < count; ++i) {
      to[i] = from[-i];
    }
  } else {
    std::memcpy(out + shift.begin, in + shift.source, sizeof(T) * count);
  }
  std::fill(out + shift.end, out + n, T(0));
}

template <typename T>
FASTDD_ALWAYS_INLINE void resample_line(const Axis<T>& cols, const T* in, T* out, int64_t width) {
  if (cols.is_shift) {
    shift_line(cols.shift, in, out, width);
  } else {
    gather_line(cols.map, in, out, width);
  }
}

// Separable stage on one plane [height, width]. With one row tap (crop, flip) each output row is its source row
// resampled (and scaled unless its weight is 1); otherwise every input row is resampled along the columns into
// `rows_done`, then each output row is a weighted sum of whole rows of it.
template <typename T>
FASTDD_ALWAYS_INLINE void separable_plane(const Stage<T>& stage, const T* in, T* out, int64_t height, int64_t width,
                                          T* rows_done) {
  const TapMap<T>& rows = stage.rows.map;
#if FASTDD_HAS_AVX512_PATH
  if constexpr (std::is_same<T, float>::value) {
    if (rows.taps == 1 && stage.cols.is_shift && permute_path<T>(width)) {
      shift_plane_avx512(rows, stage.cols.shift, in, out, height, width);
      return;
    }
  }
#endif
  if (rows.taps == 1) {
    for (int64_t r = 0; r < height; ++r) {
      T* line = out + r * width;
      const T w = rows.weight[r];
      if (w == T(0)) {
        std::fill(line, line + width, T(0));
        continue;
      }
      resample_line(stage.cols, in + rows.index[r] * width, line, width);
      if (w != T(1)) {
        for (int64_t c = 0; c < width; ++c) {
          line[c] *= w;
        }
      }
    }
    return;
  }
#if FASTDD_HAS_AVX512_PATH
  if constexpr (std::is_same<T, float>::value) {
    if (!stage.cols.is_shift && permute_path<T>(width)) {
      gather_columns_avx512(stage.cols.map, in, rows_done, height, width);
    } else {
      for (int64_t y = 0; y < height; ++y) {
        resample_line(stage.cols, in + y * width, rows_done + y * width, width);
      }
    }
  } else
#endif
  {
    for (int64_t y = 0; y < height; ++y) {
      resample_line(stage.cols, in + y * width, rows_done + y * width, width);
    }
  }
  for (int64_t r = 0; r < height; ++r) {
    T* line = out + r * width;
    bool empty = true;
    for (int64_t a = 0; a < rows.taps; ++a) {
      const T w = rows.weight_of(a)[r];
      if (w == T(0)) {  // skipped, so a non-finite row does not leak
        continue;
      }
      const T* source = rows_done + rows.index_of(a)[r] * width;
      if (empty) {
        for (int64_t c = 0; c < width; ++c) {
          line[c] = w * source[c];
        }
      } else {
        for (int64_t c = 0; c < width; ++c) {
          line[c] += w * source[c];
        }
      }
      empty = false;
    }
    if (empty) {
      std::fill(line, line + width, T(0));
    }
  }
}

// The 4 taps of pixel c < width of one row go to the pixels index[t * width + c] with weights weight[t * width + c]
// (zero-weight taps to spare pixels). With 2 to 4 channels the target is `lanes` (pixel-major, 4 values per pixel,
// channels in the first ones), so each tap is one 4-wide update instead of one per channel; otherwise `planes`
// (channel stride `stride`). A pixel with no nonzero tap is skipped.
// (GCC ignores vector_size on a dependent type, hence the two named types.)
typedef float Float4 __attribute__((vector_size(4 * sizeof(float))));
typedef double Double4 __attribute__((vector_size(4 * sizeof(double))));

inline bool scatters_to_lanes(int64_t channels) { return channels >= 2 && channels <= 4; }

template <typename T>
FASTDD_ALWAYS_INLINE void scatter_row(const int32_t* index, const T* weight, int64_t width, const T* in,
                                      int64_t pixels, int64_t channels, T* lanes, T* planes, int64_t stride) {
  using Lanes = typename std::conditional<std::is_same<T, float>::value, Float4, Double4>::type;
  static_assert(sizeof(Lanes) == 4 * sizeof(T), "4 lanes of T");
  const bool use_lanes = scatters_to_lanes(channels);
  for (int64_t c = 0; c < width; ++c) {
    if (weight[c] == T(0) && weight[width + c] == T(0) && weight[2 * width + c] == T(0) &&
        weight[3 * width + c] == T(0)) {
      continue;
    }
    if (use_lanes) {
      // Built from scalars, not stored to memory and reloaded (a wide load of narrow stores stalls).
      const Lanes value = {in[c], in[pixels + c], channels > 2 ? in[2 * pixels + c] : T(0),
                           channels > 3 ? in[3 * pixels + c] : T(0)};
      for (int64_t t = 0; t < 4; ++t) {
        T* target = lanes + 4 * static_cast<int64_t>(index[t * width + c]);
        Lanes sum;
        std::memcpy(&sum, target, sizeof(Lanes));
        sum += weight[t * width + c] * value;
        std::memcpy(target, &sum, sizeof(Lanes));
      }
    } else {
      for (int64_t t = 0; t < 4; ++t) {
        const int32_t target = index[t * width + c];
        const T w = weight[t * width + c];
        for (int64_t ch = 0; ch < channels; ++ch) {
          planes[ch * stride + target] += w * in[ch * pixels + c];
        }
      }
    }
  }
}

// Rotate on one image, all channels a pixel row at a time. The adjoint scatters each tap back to its source in a
// buffer with 4 spare pixels (see scatter_row), where a zero-weight tap t goes to the spare pixel pixels + t: then
// no tap needs a select, and a non-finite value never reaches a real pixel. (One spare per tap, and pixels entirely
// outside skipped, keep the spares from chaining every update through one address.)
template <typename T>
FASTDD_ALWAYS_INLINE void pixel_map_image(const Stage<T>& stage, bool adjoint, const SamplingGrid<T>& grid,
                                          const T* in, T* out, int64_t channels, int64_t height, int64_t width,
                                          RunWorkspace<T>& work) {
  const int64_t pixels = height * width, stride = pixels + 4;
  const bool permute = !adjoint && permute_path<T>(width);
  T* padded = work.padded.data();
  T* lanes = work.lanes.data();
  const bool use_lanes = scatters_to_lanes(channels);
  if (adjoint && use_lanes) {
    std::fill(lanes, lanes + 4 * stride, T(0));
  } else if (adjoint) {
    std::fill(padded, padded + channels * stride, T(0));
  }
  const int32_t spare = static_cast<int32_t>(pixels);
  for (int64_t r = 0; r < height; ++r) {
    const int32_t* index = work.row_index.data();
    const T* weight = work.row_weight.data();
    if (adjoint && stage.materialised) {
      index = stage.four_index.data() + 4 * r * width;
      weight = stage.four_weight.data() + 4 * r * width;
    } else {
#if FASTDD_HAS_AVX512_PATH
      if constexpr (std::is_same<T, float>::value) {
        if (permute || (adjoint && cpu_has_avx512())) {
          const RowTapSource source = stage.materialised
                                          ? RowTapSource{&stage.pixels, r * width, nullptr, nullptr, r}
                                          : RowTapSource{nullptr, 0, &stage.affine, &grid, r};
          if (permute) {
            bilinear_row_avx512(source, in, out + r * width, channels, pixels, width);
            continue;
          }
          four_taps_avx512(source, static_cast<int32_t>(width), spare, work.row_index.data(),
                           work.row_weight.data());
          scatter_row(index, weight, width, in + r * width, pixels, channels, lanes, padded, stride);
          continue;
        }
      }
#endif
      const BilinearTaps<T>* taps = &stage.pixels;
      int64_t offset = r * width;
      if (!stage.materialised) {
        row_taps(stage.affine, grid, r, work.row_taps, 0);
        taps = &work.row_taps;
        offset = 0;
      }
      four_taps(*taps, offset, width, adjoint, spare, work.row_index.data(), work.row_weight.data());
    }
    const int32_t *i0 = index, *i1 = index + width, *i2 = index + 2 * width, *i3 = index + 3 * width;
    const T *w0 = weight, *w1 = weight + width, *w2 = weight + 2 * width, *w3 = weight + 3 * width;
    if (!adjoint) {
      for (int64_t ch = 0; ch < channels; ++ch) {
        const T* source = in + ch * pixels;
        T* line = out + ch * pixels + r * width;
        for (int64_t c = 0; c < width; ++c) {
          line[c] = (tap(w0[c], source[i0[c]]) + tap(w1[c], source[i1[c]])) +
                    (tap(w2[c], source[i2[c]]) + tap(w3[c], source[i3[c]]));
        }
      }
      continue;
    }
    scatter_row(index, weight, width, in + r * width, pixels, channels, lanes, padded, stride);
  }
  if (adjoint) {
    for (int64_t ch = 0; ch < channels; ++ch) {
      if (use_lanes) {
        for (int64_t p = 0; p < pixels; ++p) {
          out[ch * pixels + p] = lanes[4 * p + ch];
        }
      } else {
        std::memcpy(out + ch * pixels, padded + ch * stride, sizeof(T) * pixels);
      }
    }
  }
}

// Runs one image [channels, height, width] through the plan (the adjoint: the transposed stages, last first).
template <typename T>
FASTDD_CPU_CLONES void run_image(const Plan<T>& plan, bool adjoint, bool with_offset, const SamplingGrid<T>& grid,
                                 const T* in, T* out, int64_t channels, int64_t height, int64_t width,
                                 RunWorkspace<T>& work) {
  const int64_t count = plan.size, pixels = height * width, numel = channels * pixels;
  if (count == 0) {
    std::memcpy(out, in, sizeof(T) * numel);
    return;
  }
  const T* src = in;
  for (int64_t i = 0; i < count; ++i) {
    const Stage<T>& stage = plan.stages[adjoint ? count - 1 - i : i];
    T* dst = i == count - 1 ? out : work.images.data() + (i % 2) * numel;
    switch (stage.kind) {
      case StageKind::kColor:
        apply_color(stage.color, with_offset && !adjoint, src, dst, channels, pixels, work.plane.data());
        break;
      case StageKind::kSeparable:
        for (int64_t c = 0; c < channels; ++c) {
          separable_plane(stage, src + c * pixels, dst + c * pixels, height, width, work.plane.data());
        }
        break;
      case StageKind::kRectangle:  // a diagonal 0/1 map: its own adjoint
        std::memcpy(dst, src, sizeof(T) * numel);
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t r = stage.top; r < stage.bottom; ++r) {
            T* line = dst + c * pixels + r * width;
            std::fill(line + stage.left, line + stage.right, T(0));
          }
        }
        break;
      case StageKind::kPixelMap:
        pixel_map_image(stage, adjoint, grid, src, dst, channels, height, width, work);
        break;
    }
    src = dst;
  }
}

// S: the images' dtype; the plan and the arithmetic run in T = compute_t<S> (float for bfloat16 and float16, whose
// images are widened into a float image per image and narrowed back after it).
template <typename S>
void diff_augment_cpu_kernel(const at::Tensor& images, const std::vector<AugmentFamily>& families,
                             const at::Tensor& real_params, const at::Tensor& int_params, const Geometry& geometry,
                             bool adjoint, bool with_offset, at::Tensor& out) {
  using T = compute_t<S>;
  constexpr bool widened = !std::is_same_v<S, T>;
  const int64_t batch = images.size(0), channels = images.size(1);
  const int64_t pixels = geometry.height * geometry.width, numel = channels * pixels;
  const S* in_data = images.const_data_ptr<S>();
  S* out_data = out.mutable_data_ptr<S>();
  const double* real = real_params.const_data_ptr<double>();
  const int64_t* ints = int_params.const_data_ptr<int64_t>();
  const bool shared = real_params.size(0) == 1;
  const SamplingGrid<T> grid(geometry);

  Plan<T> shared_plan;
  if (shared) {
    PlanWorkspace<T> work;
    build_plan(families, real, ints, geometry, grid, true, adjoint, shared_plan, work);
  }
#if FASTDD_HAS_AVX512_PATH
  if constexpr (std::is_same<S, float>::value) {
    // Shared rotate alone: every plane of the batch takes the same taps, so 16 planes share each tap.
    if (shared && shared_plan.size == 1 && shared_plan.stages[0].kind == StageKind::kPixelMap && cpu_has_avx512()) {
      const Stage<T>& stage = shared_plan.stages[0];
      const int64_t planes = batch * channels, blocks = (planes + 15) / 16;
      const int64_t block_grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (16 * pixels));
      at::parallel_for(0, blocks, block_grain, [&](int64_t begin, int64_t end) {
        std::vector<float> side((pixels + 4) * 16), sum((pixels + 4) * 16);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t first = block * 16;
          rotate_planes_avx512(stage.four_index.data(), stage.four_weight.data(), adjoint, in_data + first * pixels,
                               out_data + first * pixels, std::min<int64_t>(16, planes - first), geometry.height,
                               geometry.width, side.data(), sum.data());
        }
      });
      return;
    }
  }
#endif
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, numel));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    RunWorkspace<T> run_work(channels, pixels, geometry.width);
    Plan<T> local_plan;
    PlanWorkspace<T> plan_work;
    std::vector<T> in_image(widened ? numel : 0), out_image(widened ? numel : 0);
    for (int64_t b = begin; b < end; ++b) {
      if (!shared) {
        build_plan(families, real + b * kNumRealParams, ints + b * kNumIntParams, geometry, grid, false, adjoint,
                   local_plan, plan_work);
      }
      const T* in = as_compute<16>(in_data + b * numel, numel, in_image.data());
      T* image_out = compute_target(out_data + b * numel, out_image.data());
      run_image(shared ? shared_plan : local_plan, adjoint, with_offset, grid, in, image_out, channels,
                geometry.height, geometry.width, run_work);
      store_computed<16>(image_out, numel, out_data + b * numel);
    }
  });
}

at::Tensor run_diff_augment(const at::Tensor& images, c10::string_view families, const at::Tensor& real_params,
                            const at::Tensor& int_params, at::IntArrayRef cutout_size, bool align_corners,
                            bool adjoint, bool with_offset) {
  check_diff_augment_inputs(images, real_params, int_params, cutout_size);
  const std::vector<AugmentFamily> parsed = parse_augment_families(families);
  const Geometry geometry{images.size(2), images.size(3), cutout_size[0], cutout_size[1], align_corners};
  // int32 pixel indices, with room for the rotate adjoint's 4 spare pixels.
  TORCH_CHECK(geometry.height * geometry.width <= std::numeric_limits<int32_t>::max() - 4,
              "diff_augment: images of ", geometry.height, " x ", geometry.width, " pixels are too large");
  const at::Tensor images_c = images.contiguous();
  const at::Tensor real_c = real_params.contiguous();
  const at::Tensor int_c = int_params.contiguous();
  at::Tensor out = at::empty_like(images_c, at::MemoryFormat::Contiguous);
  if (images_c.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images_c.scalar_type(), "diff_augment_cpu", [&] {
    diff_augment_cpu_kernel<scalar_t>(images_c, parsed, real_c, int_c, geometry, adjoint, with_offset, out);
  });
  return out;
}

at::Tensor diff_augment_cpu(const at::Tensor& images, c10::string_view families, const at::Tensor& real_params,
                            const at::Tensor& int_params, at::IntArrayRef cutout_size, bool align_corners,
                            bool with_offset) {
  return run_diff_augment(images, families, real_params, int_params, cutout_size, align_corners, false,
                          with_offset);
}

at::Tensor diff_augment_adjoint_cpu(const at::Tensor& grad, c10::string_view families, const at::Tensor& real_params,
                                    const at::Tensor& int_params, at::IntArrayRef cutout_size, bool align_corners) {
  return run_diff_augment(grad, families, real_params, int_params, cutout_size, align_corners, true, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("diff_augment", &diff_augment_cpu);
  m.impl("diff_augment_adjoint", &diff_augment_adjoint_cpu);
}

}  // namespace fastdd
