// Argument layout and checks shared by the kernels of fastdd::diff_augment and fastdd::diff_augment_adjoint. The
// Python entry point validates first with friendlier messages; these guard direct torch.ops.fastdd callers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastdd {

// Columns of the [P, 6] float64 `real_params` and [P, 5] int64 `int_params` tensors (P = 1 shared, or B per image).
// Mirrored by fastdd.ops._augment_compiled.
enum RealParam : int64_t { kBrightness, kSaturation, kContrast, kScaleX, kScaleY, kRotation, kNumRealParams };
enum IntParam : int64_t { kCropRow, kCropCol, kCutoutRow, kCutoutCol, kFlip, kNumIntParams };

enum class AugmentFamily { kColor, kCrop, kCutout, kFlip, kScale, kRotate };

// "color_crop_flip" -> {kColor, kCrop, kFlip}; an empty string is the identity.
inline std::vector<AugmentFamily> parse_augment_families(c10::string_view families) {
  std::vector<AugmentFamily> parsed;
  const std::string text(families.data(), families.size());
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('_', begin);
    if (end == std::string::npos) {
      end = text.size();
    }
    const std::string name = text.substr(begin, end - begin);
    if (name == "color") {
      parsed.push_back(AugmentFamily::kColor);
    } else if (name == "crop") {
      parsed.push_back(AugmentFamily::kCrop);
    } else if (name == "cutout") {
      parsed.push_back(AugmentFamily::kCutout);
    } else if (name == "flip") {
      parsed.push_back(AugmentFamily::kFlip);
    } else if (name == "scale") {
      parsed.push_back(AugmentFamily::kScale);
    } else if (name == "rotate") {
      parsed.push_back(AugmentFamily::kRotate);
    } else {
      TORCH_CHECK(false, "diff_augment: unknown family '", name, "' in '", text,
                  "'; valid families are color, crop, cutout, flip, scale, rotate");
    }
    begin = end + 1;
  }
  return parsed;
}

inline void check_diff_augment_inputs(const at::Tensor& images, const at::Tensor& real_params,
                                      const at::Tensor& int_params, at::IntArrayRef cutout_size) {
  TORCH_CHECK(images.dim() == 4, "diff_augment: images must be [B, C, H, W], got shape ", images.sizes());
  TORCH_CHECK(at::isFloatingType(images.scalar_type()), "diff_augment: images must be floating point, got ",
              images.scalar_type());
  const int64_t batch = images.size(0);
  TORCH_CHECK(real_params.dim() == 2 && real_params.size(1) == kNumRealParams &&
                  (real_params.size(0) == 1 || real_params.size(0) == batch),
              "diff_augment: real_params must be [1, 6] or [", batch, ", 6], got ", real_params.sizes());
  TORCH_CHECK(real_params.scalar_type() == at::kDouble, "diff_augment: real_params must be float64, got ",
              real_params.scalar_type());
  TORCH_CHECK(int_params.dim() == 2 && int_params.size(1) == kNumIntParams &&
                  int_params.size(0) == real_params.size(0),
              "diff_augment: int_params must be [", real_params.size(0), ", 5], got ", int_params.sizes());
  TORCH_CHECK(int_params.scalar_type() == at::kLong, "diff_augment: int_params must be int64, got ",
              int_params.scalar_type());
  TORCH_CHECK(real_params.device() == images.device() && int_params.device() == images.device(),
              "diff_augment: images (", images.device(), "), real_params (", real_params.device(),
              ") and int_params (", int_params.device(), ") must be on the same device");
  TORCH_CHECK(cutout_size.size() == 2 && cutout_size[0] >= 0 && cutout_size[1] >= 0,
              "diff_augment: cutout_size must be two non-negative ints (h, w), got ", cutout_size);
}

}  // namespace fastdd
