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
// combines whole rows (vector operations). Rotate handles all channels per pixel row: the row's taps are loaded or
// computed once, then gathered from every channel; its adjoint scatters them (4 taps x C channels per pixel).
// Shared parameters (one row) build their stages once per call (rotate materialises its tap map); per-image
// parameters build them per image, reusing the buffers, and compute rotate's taps a row at a time.
//
// Every tap reads a valid pixel (taps outside the image have weight 0 and a clamped index) and a zero-weight tap
// contributes a selected 0 rather than 0 * value, so the hot loops have no branches and a non-finite value never
// leaks into zero-filled pixels. The per-image work is compiled for AVX-512, AVX2 and baseline x86-64 and the loader
// picks the copy for the running CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../diff_augment_checks.h"

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

// out[i] = sum over t < taps of weight[t * size + i] * in[index[t * size + i]]: along one axis (a separable stage)
// or over the pixels of an image (rotate). A tap outside the image has weight 0 and a valid, unused index.
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
  Affine2<T> affine{};  // kPixelMap
  TapMap<T> pixels;     // kPixelMap with shared parameters: the taps of every pixel
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
template <typename T>
FASTDD_ALWAYS_INLINE void linear_taps(T at, int64_t n, int32_t& low_index, int32_t& high_index, T& low_weight,
                                      T& high_weight) {
  // Both taps are outside unless -1 < at < n (also false for NaN).
  const bool useful = at > T(-1) && at < static_cast<T>(n);
  at = useful ? at : T(0);
  // floor by truncating the positive at + 1 (std::floor is a libm call on baseline x86-64).
  const int32_t low = static_cast<int32_t>(at + T(1)) - 1;
  const T frac = at - static_cast<T>(low);
  const bool low_inside = useful && low >= 0, high_inside = useful && low + 1 < n;
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
    linear_taps<T>(factor * coordinates[i] * half_extent + centre, n, map.index[i], map.index[n + i], map.weight[i],
                   map.weight[n + i]);
  }
}

// The 4 bilinear taps of the pixels of row r (tap t of column c at index[t * stride + c], weight[t * stride + c]),
// in the order (top, left), (top, right), (bottom, left), (bottom, right).
template <typename T>
FASTDD_ALWAYS_INLINE void bilinear_row(const Affine2<T>& m, const SamplingGrid<T>& grid, int64_t r, int32_t* index,
                                       T* weight, int64_t stride) {
  const int64_t height = static_cast<int64_t>(grid.v.size()), width = static_cast<int64_t>(grid.u.size());
  const T v = grid.v[r];
  const T* u = grid.u.data();
  const int32_t w32 = static_cast<int32_t>(width);
  for (int64_t c = 0; c < width; ++c) {
    int32_t col0, col1, row0, row1;
    T wc0, wc1, wr0, wr1;
    linear_taps<T>((m.m00 * u[c] + m.m01 * v) * grid.half_width + grid.centre_x, width, col0, col1, wc0, wc1);
    linear_taps<T>((m.m10 * u[c] + m.m11 * v) * grid.half_height + grid.centre_y, height, row0, row1, wr0, wr1);
    index[c] = row0 * w32 + col0;
    index[stride + c] = row0 * w32 + col1;
    index[2 * stride + c] = row1 * w32 + col0;
    index[3 * stride + c] = row1 * w32 + col1;
    weight[c] = wr0 * wc0;
    weight[stride + c] = wr0 * wc1;
    weight[2 * stride + c] = wr1 * wc0;
    weight[3 * stride + c] = wr1 * wc1;
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
          stage.pixels.resize(g.height * g.width, 4);
          for (int64_t r = 0; r < g.height; ++r) {
            bilinear_row(stage.affine, grid, r, stage.pixels.index.data() + r * g.width,
                         stage.pixels.weight.data() + r * g.width, stage.pixels.size);
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

// Sum of n values in double, in 8 independent lanes (a single running sum cannot be vectorised).
template <typename T>
FASTDD_ALWAYS_INLINE double sum_values(const T* values, int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t l = 0; l < 8; ++l) {
      lanes[l] += static_cast<double>(values[i + l]);
    }
  }
  double total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) {
    total += static_cast<double>(values[i]);
  }
  return total;
}

// Scratch of one thread for running images: two images, one plane, and the taps of one pixel row.
template <typename T>
struct RunWorkspace {
  std::vector<T> images, plane, row_weight;
  std::vector<int32_t> row_index;
  RunWorkspace(int64_t numel, int64_t pixels, int64_t width)
      : images(2 * numel), plane(pixels), row_weight(4 * width), row_index(4 * width) {}
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

// out[i] = sum over the taps of entries first .. first + n of `map` (out is overwritten).
template <typename T>
FASTDD_ALWAYS_INLINE void gather_line(const TapMap<T>& map, int64_t first, const T* in, T* out, int64_t n) {
  const int32_t* i0 = map.index_of(0) + first;
  const T* w0 = map.weight_of(0) + first;
  if (map.taps == 2) {
    const int32_t* i1 = map.index_of(1) + first;
    const T* w1 = map.weight_of(1) + first;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = tap(w0[i], in[i0[i]]) + tap(w1[i], in[i1[i]]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    out[i] = tap(w0[i], in[i0[i]]);
  }
  for (int64_t t = 1; t < map.taps; ++t) {
    const int32_t* index = map.index_of(t) + first;
    const T* weight = map.weight_of(t) + first;
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
    gather_line(cols.map, 0, in, out, width);
  }
}

// Separable stage on one plane [height, width]. With one row tap (crop, flip) each output row is its source row
// resampled (and scaled unless its weight is 1); otherwise every input row is resampled along the columns into
// `rows_done`, then each output row is a weighted sum of whole rows of it.
template <typename T>
FASTDD_ALWAYS_INLINE void separable_plane(const Stage<T>& stage, const T* in, T* out, int64_t height, int64_t width,
                                          T* rows_done) {
  const TapMap<T>& rows = stage.rows.map;
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
  for (int64_t y = 0; y < height; ++y) {
    resample_line(stage.cols, in + y * width, rows_done + y * width, width);
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

// Rotate on one image, all channels a pixel row at a time; the adjoint scatters each tap back to its source.
template <typename T>
FASTDD_ALWAYS_INLINE void pixel_map_image(const Stage<T>& stage, bool adjoint, const SamplingGrid<T>& grid,
                                          const T* in, T* out, int64_t channels, int64_t height, int64_t width,
                                          RunWorkspace<T>& work) {
  const int64_t pixels = height * width;
  if (adjoint) {
    std::fill(out, out + channels * pixels, T(0));
  }
  for (int64_t r = 0; r < height; ++r) {
    const int32_t* index;
    const T* weight;
    int64_t stride;
    if (stage.materialised) {
      index = stage.pixels.index.data() + r * width;
      weight = stage.pixels.weight.data() + r * width;
      stride = pixels;
    } else {
      bilinear_row(stage.affine, grid, r, work.row_index.data(), work.row_weight.data(), width);
      index = work.row_index.data();
      weight = work.row_weight.data();
      stride = width;
    }
    const int32_t *i0 = index, *i1 = index + stride, *i2 = index + 2 * stride, *i3 = index + 3 * stride;
    const T *w0 = weight, *w1 = weight + stride, *w2 = weight + 2 * stride, *w3 = weight + 3 * stride;
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
    for (int64_t c = 0; c < width; ++c) {
      const int64_t p = r * width + c;
      for (int64_t ch = 0; ch < channels; ++ch) {
        const T g = in[ch * pixels + p];
        T* target = out + ch * pixels;
        target[i0[c]] += tap(w0[c], g);
        target[i1[c]] += tap(w1[c], g);
        target[i2[c]] += tap(w2[c], g);
        target[i3[c]] += tap(w3[c], g);
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

template <typename T>
void diff_augment_cpu_kernel(const at::Tensor& images, const std::vector<AugmentFamily>& families,
                             const at::Tensor& real_params, const at::Tensor& int_params, const Geometry& geometry,
                             bool adjoint, bool with_offset, at::Tensor& out) {
  const int64_t batch = images.size(0), channels = images.size(1);
  const int64_t pixels = geometry.height * geometry.width, numel = channels * pixels;
  const T* in_data = images.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const double* real = real_params.data_ptr<double>();
  const int64_t* ints = int_params.data_ptr<int64_t>();
  const bool shared = real_params.size(0) == 1;
  const SamplingGrid<T> grid(geometry);

  Plan<T> shared_plan;
  if (shared) {
    PlanWorkspace<T> work;
    build_plan(families, real, ints, geometry, grid, true, adjoint, shared_plan, work);
  }
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, numel));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    RunWorkspace<T> run_work(numel, pixels, geometry.width);
    Plan<T> local_plan;
    PlanWorkspace<T> plan_work;
    for (int64_t b = begin; b < end; ++b) {
      if (!shared) {
        build_plan(families, real + b * kNumRealParams, ints + b * kNumIntParams, geometry, grid, false, adjoint,
                   local_plan, plan_work);
      }
      run_image(shared ? shared_plan : local_plan, adjoint, with_offset, grid, in_data + b * numel,
                out_data + b * numel, channels, geometry.height, geometry.width, run_work);
    }
  });
}

at::Tensor run_diff_augment(const at::Tensor& images, c10::string_view families, const at::Tensor& real_params,
                            const at::Tensor& int_params, at::IntArrayRef cutout_size, bool align_corners,
                            bool adjoint, bool with_offset) {
  check_diff_augment_inputs(images, real_params, int_params, cutout_size);
  const std::vector<AugmentFamily> parsed = parse_augment_families(families);
  const Geometry geometry{images.size(2), images.size(3), cutout_size[0], cutout_size[1], align_corners};
  TORCH_CHECK(geometry.height * geometry.width <= std::numeric_limits<int32_t>::max(),
              "diff_augment: images of ", geometry.height, " x ", geometry.width, " pixels are too large");
  const at::Tensor images_c = images.contiguous();
  const at::Tensor real_c = real_params.contiguous();
  const at::Tensor int_c = int_params.contiguous();
  at::Tensor out = at::empty_like(images_c, at::MemoryFormat::Contiguous);
  if (images_c.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(images_c.scalar_type(), "diff_augment_cpu", [&] {
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
