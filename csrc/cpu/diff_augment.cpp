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
// taps (flip then scale is one stage). A separable stage first resamples every row along the columns, then combines
// whole rows (vector operations), so scale costs 2 scalar taps per value and its parameters O(H + W) work. Shared
// parameters (one row) build their stages once per call; per-image parameters build them per image, reusing the
// buffers.
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

namespace fastdd {
namespace {

// out[i] = sum over t < taps of weight[i * taps + t] * in[index[i * taps + t]]: along one axis (a separable
// stage) or over the pixels of an image (rotate). A tap outside the image has weight 0 and a valid, unused index.
template <typename T>
struct TapMap {
  int64_t taps = 0;
  std::vector<int32_t> index;
  std::vector<T> weight;

  void resize(int64_t size, int64_t tap_count) {
    taps = tap_count;
    index.resize(size * tap_count);
    weight.resize(size * tap_count);
  }
};

struct ColorFactors {
  double brightness;
  double saturation;
  double contrast;
};

enum class StageKind { kColor, kSeparable, kRectangle, kPixelMap };

template <typename T>
struct Stage {
  StageKind kind = StageKind::kColor;
  ColorFactors color{};
  TapMap<T> rows, cols;  // kSeparable: out[r, c] = sum_a sum_b rows.w[r, a] cols.w[c, b] in[rows.i[r, a], cols.i[c, b]]
  TapMap<T> pixels;      // kPixelMap
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

// The two bilinear taps of pixel coordinate `at` along an axis of n pixels (zero padding): first index and weights.
template <typename T>
inline void linear_taps(T at, int64_t n, int32_t* index, T* weight) {
  // Both taps are outside unless -1 < at < n (also false for NaN).
  const bool useful = at > T(-1) && at < static_cast<T>(n);
  at = useful ? at : T(0);
  // floor by truncating the positive at + 1 (std::floor is a libm call on baseline x86-64).
  const int64_t low = static_cast<int64_t>(at + T(1)) - 1;
  const T frac = at - static_cast<T>(low);
  const bool low_inside = useful && low >= 0, high_inside = useful && low + 1 < n;
  index[0] = low_inside ? static_cast<int32_t>(low) : 0;
  index[1] = high_inside ? static_cast<int32_t>(low + 1) : 0;
  weight[0] = low_inside ? T(1) - frac : T(0);
  weight[1] = high_inside ? frac : T(0);
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
    linear_taps<T>(factor * coordinates[i] * half_extent + centre, n, map.index.data() + 2 * i,
                   map.weight.data() + 2 * i);
  }
}

// Output coordinate (u, v) samples the input at (m00 u + m01 v, m10 u + m11 v), bilinearly with zero padding.
template <typename T>
void fill_pixel_bilinear(T m00, T m01, T m10, T m11, const SamplingGrid<T>& grid, TapMap<T>& map) {
  const int64_t height = static_cast<int64_t>(grid.v.size()), width = static_cast<int64_t>(grid.u.size());
  map.resize(height * width, 4);
  int32_t* index = map.index.data();
  T* weight = map.weight.data();
  for (int64_t r = 0; r < height; ++r) {
    for (int64_t c = 0; c < width; ++c, index += 4, weight += 4) {
      const T u = grid.u[c], v = grid.v[r];
      int32_t col[2], row[2];
      T wc[2], wr[2];
      linear_taps<T>((m00 * u + m01 * v) * grid.half_width + grid.centre_x, width, col, wc);
      linear_taps<T>((m10 * u + m11 * v) * grid.half_height + grid.centre_y, height, row, wr);
      for (int64_t dy = 0; dy < 2; ++dy) {
        for (int64_t dx = 0; dx < 2; ++dx) {
          index[dy * 2 + dx] = static_cast<int32_t>(row[dy] * width + col[dx]);
          weight[dy * 2 + dx] = wr[dy] * wc[dx];
        }
      }
    }
  }
}

// out = later after earlier: each tap of `later` continues through the taps of `earlier` (weights multiply).
template <typename T>
void compose(const TapMap<T>& later, const TapMap<T>& earlier, TapMap<T>& out) {
  const int64_t ka = later.taps, kb = earlier.taps;
  const int64_t size = static_cast<int64_t>(later.index.size()) / ka;
  out.resize(size, ka * kb);
  for (int64_t i = 0; i < size; ++i) {
    for (int64_t a = 0; a < ka; ++a) {
      const int32_t middle = later.index[i * ka + a];
      const T w = later.weight[i * ka + a];
      for (int64_t b = 0; b < kb; ++b) {
        const int64_t slot = (i * ka + a) * kb + b;
        out.index[slot] = earlier.index[middle * kb + b];
        out.weight[slot] = w * earlier.weight[middle * kb + b];
      }
    }
  }
}

// Scratch of one thread for building plans.
template <typename T>
struct PlanWorkspace {
  TapMap<T> rows, cols, composed;
};

// Appends the separable stage (rows, cols), composing it into the previous stage when that one is separable too
// and each axis keeps at most 2 taps.
template <typename T>
void add_separable(Plan<T>& plan, PlanWorkspace<T>& work) {
  Stage<T>* last = plan.last();
  if (last != nullptr && last->kind == StageKind::kSeparable && last->rows.taps * work.rows.taps <= 2 &&
      last->cols.taps * work.cols.taps <= 2) {
    compose(work.rows, last->rows, work.composed);
    std::swap(last->rows, work.composed);
    compose(work.cols, last->cols, work.composed);
    std::swap(last->cols, work.composed);
    return;
  }
  Stage<T>& stage = plan.add(StageKind::kSeparable);
  std::swap(stage.rows, work.rows);
  std::swap(stage.cols, work.cols);
}

template <typename T>
void build_plan(const std::vector<AugmentFamily>& families, const double* real, const int64_t* ints,
                const Geometry& g, const SamplingGrid<T>& grid, Plan<T>& plan, PlanWorkspace<T>& work) {
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
        fill_pixel_bilinear<T>(cos, -sin, sin, cos, grid, plan.add(StageKind::kPixelMap).pixels);
        break;
      }
    }
  }
}

// Sum of n values in double, in 8 independent lanes (a single running sum cannot be vectorised).
template <typename T>
double sum_values(const T* values, int64_t n) {
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

// Scratch of one thread for running images: two images and one plane.
template <typename T>
struct RunWorkspace {
  std::vector<T> images, plane;
  RunWorkspace(int64_t numel, int64_t pixels) : images(2 * numel), plane(pixels) {}
};

// The color map on one image [channels, pixels]; its linear part (with_offset false) is symmetric, hence also the
// adjoint.
template <typename T>
void apply_color(const ColorFactors& f, bool with_offset, const T* src, T* dst, int64_t channels, int64_t pixels,
                 T* pixel_mean) {
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

// y += w * x over n values; nothing when w is 0, so a non-finite value does not leak into zero-filled pixels.
template <typename T>
inline void axpy(T w, const T* x, T* y, int64_t n) {
  if (w == T(0)) {
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    y[i] += w * x[i];
  }
}

// out[i] = sum over taps of weight * in[index] for i < n (zero-weight taps skipped, as in axpy).
template <typename T, int64_t K>
inline void gather_line(const TapMap<T>& map, const T* in, T* out, int64_t n) {
  const int32_t* index = map.index.data();
  const T* weight = map.weight.data();
  for (int64_t i = 0; i < n; ++i, index += K, weight += K) {
    T acc = T(0);
    for (int64_t t = 0; t < K; ++t) {
      acc += weight[t] != T(0) ? weight[t] * in[index[t]] : T(0);
    }
    out[i] = acc;
  }
}

// The transpose of gather_line: out[index] += weight * in[i] (out is not cleared).
template <typename T, int64_t K>
inline void scatter_line(const TapMap<T>& map, const T* in, T* out, int64_t n) {
  const int32_t* index = map.index.data();
  const T* weight = map.weight.data();
  for (int64_t i = 0; i < n; ++i, index += K, weight += K) {
    for (int64_t t = 0; t < K; ++t) {
      if (weight[t] != T(0)) {
        out[index[t]] += weight[t] * in[i];
      }
    }
  }
}

template <typename T>
inline void gather_taps(const TapMap<T>& map, const T* in, T* out, int64_t n) {
  switch (map.taps) {
    case 1:
      return gather_line<T, 1>(map, in, out, n);
    case 2:
      return gather_line<T, 2>(map, in, out, n);
    default:
      return gather_line<T, 4>(map, in, out, n);
  }
}

template <typename T>
inline void scatter_taps(const TapMap<T>& map, const T* in, T* out, int64_t n) {
  switch (map.taps) {
    case 1:
      return scatter_line<T, 1>(map, in, out, n);
    case 2:
      return scatter_line<T, 2>(map, in, out, n);
    default:
      return scatter_line<T, 4>(map, in, out, n);
  }
}

// Separable stage on one plane [height, width]: every input row resampled along the columns into `rows_done`,
// then each output row is a weighted sum of whole rows of it.
// With one row tap (crop, flip) each output row is its source row resampled: one pass, no intermediate.
template <typename T>
void separable_forward(const Stage<T>& stage, const T* in, T* out, int64_t height, int64_t width, T* rows_done) {
  if (stage.rows.taps == 1) {
    for (int64_t r = 0; r < height; ++r) {
      if (stage.rows.weight[r] == T(0)) {
        std::fill(out + r * width, out + (r + 1) * width, T(0));
      } else {
        gather_taps(stage.cols, in + stage.rows.index[r] * width, out + r * width, width);
      }
    }
    return;
  }
  for (int64_t y = 0; y < height; ++y) {
    gather_taps(stage.cols, in + y * width, rows_done + y * width, width);
  }
  const int64_t kr = stage.rows.taps;
  for (int64_t r = 0; r < height; ++r) {
    T* line = out + r * width;
    std::fill(line, line + width, T(0));
    for (int64_t a = 0; a < kr; ++a) {
      axpy(stage.rows.weight[r * kr + a], rows_done + stage.rows.index[r * kr + a] * width, line, width);
    }
  }
}

template <typename T>
void separable_adjoint(const Stage<T>& stage, const T* in, T* out, int64_t height, int64_t width, T* rows_done) {
  if (stage.rows.taps == 1) {  // the one-tap row map is injective: each output row receives at most one row
    std::fill(out, out + height * width, T(0));
    for (int64_t r = 0; r < height; ++r) {
      if (stage.rows.weight[r] != T(0)) {
        scatter_taps(stage.cols, in + r * width, out + stage.rows.index[r] * width, width);
      }
    }
    return;
  }
  std::fill(rows_done, rows_done + height * width, T(0));
  const int64_t kr = stage.rows.taps;
  for (int64_t r = 0; r < height; ++r) {
    for (int64_t a = 0; a < kr; ++a) {
      axpy(stage.rows.weight[r * kr + a], in + r * width, rows_done + stage.rows.index[r * kr + a] * width, width);
    }
  }
  std::fill(out, out + height * width, T(0));
  for (int64_t y = 0; y < height; ++y) {
    scatter_taps(stage.cols, rows_done + y * width, out + y * width, width);
  }
}

// Runs one image [channels, height, width] through the plan (the adjoint: the transposed stages, last first).
template <typename T>
void run_image(const Plan<T>& plan, bool adjoint, bool with_offset, const T* in, T* out, int64_t channels,
               int64_t height, int64_t width, RunWorkspace<T>& work) {
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
          (adjoint ? separable_adjoint<T> : separable_forward<T>)(stage, src + c * pixels, dst + c * pixels, height,
                                                                   width, work.plane.data());
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
        for (int64_t c = 0; c < channels; ++c) {
          if (adjoint) {
            std::fill(dst + c * pixels, dst + (c + 1) * pixels, T(0));
            scatter_taps(stage.pixels, src + c * pixels, dst + c * pixels, pixels);
          } else {
            gather_taps(stage.pixels, src + c * pixels, dst + c * pixels, pixels);
          }
        }
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
    build_plan(families, real, ints, geometry, grid, shared_plan, work);
  }
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, numel));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    RunWorkspace<T> run_work(numel, pixels);
    Plan<T> local_plan;
    PlanWorkspace<T> plan_work;
    for (int64_t b = begin; b < end; ++b) {
      if (!shared) {
        build_plan(families, real + b * kNumRealParams, ints + b * kNumIntParams, geometry, grid, local_plan,
                   plan_work);
      }
      run_image(shared ? shared_plan : local_plan, adjoint, with_offset, in_data + b * numel, out_data + b * numel,
                channels, geometry.height, geometry.width, run_work);
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
