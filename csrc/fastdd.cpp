// The compiled extension fastdd._C: the schemas of every fastdd operator, and the Python module that loads them.
//
// Kernels live next to this file (cpu/*.cpp, cuda/*.cu) and register themselves per dispatch key. Fake (meta)
// implementations and autograd formulas are registered from Python, next to each op's public function.
#include <Python.h>

#include <torch/library.h>

#ifdef FASTDD_WITH_CUDA
#define FASTDD_CUDA_KERNELS 1
#else
#define FASTDD_CUDA_KERNELS 0
#endif

TORCH_LIBRARY(fastdd, m) {
  // dtypes: every floating-point input may be float32, float64, bfloat16 or float16 (csrc/half_precision.h): the
  // half-precision ones are loaded as they are, computed on and accumulated in float32, and results come back in
  // the input's dtype. Where the ops mix dtypes, their comments say so.
  // sq_dist[i] = min_j ||points[i] - centers[j]||^2, computed exactly as a sum of squared differences (no
  // ||p||^2 + ||c||^2 - 2 p.c expansion), and index[i] = the lowest j attaining it. With group labels (both or
  // neither), j ranges over the centers with center_groups[j] == point_groups[i] only (a point whose group has no
  // center is a ValueError) and index stays an index into centers. Values come before indices, as in
  // torch.min(dim); the Python API fastdd.ops.nearest_synthetic returns (index, sq_dist).
  m.def(
      "nearest_synthetic(Tensor points, Tensor centers, Tensor? point_groups=None, Tensor? center_groups=None)"
      " -> (Tensor sq_dist, Tensor index)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of sq_dist: grad_points = 2 (p - c_index) g, grad_centers[j] = -sum over {i: index[i] = j} of the same.
  m.def(
      "nearest_synthetic_backward(Tensor grad_sq_dist, Tensor points, Tensor centers, Tensor index)"
      " -> (Tensor grad_points, Tensor grad_centers)",
      {at::Tag::pt2_compliant_tag});
  // Upper-tail CVaR per cluster: cvar[g] = mean of the ceil(alpha * n_g) largest losses[i] with assign[i] = g (0 for
  // an empty cluster; equal losses select the lower index first; NaN counts as the largest). weight[i] = 1 / k_g
  // for a selected sample, else 0: the gradient of cvar[assign[i]] w.r.t. losses[i].
  m.def("cluster_cvar(Tensor losses, Tensor assign, int num_clusters, float alpha) -> (Tensor cvar, Tensor weight)",
        {at::Tag::pt2_compliant_tag});
  // y = pool(relu(weight[c] * (x - mean) * rstd + bias[c])) per (image, channel) instance of x [N, C, H, W]:
  // GroupNorm with one group per channel (biased variance, eps), ReLU, then a 2x2 average pool (floor) when pool
  // is true. mean and rstd [N, C] are returned for the derivatives, which are ops of their own so that the fused
  // block is differentiable twice (trajectory matching differentiates a student step's gradient). Mixed precision:
  // weight and bias may be float32 with a bfloat16 / float16 x (autocast's activations); mean and rstd are then
  // float32, grad_y, gg_x and the x-shaped results take x's dtype, gg_weight, gg_bias and the per-channel results
  // weight's.
  m.def("instance_norm_relu_pool(Tensor x, Tensor weight, Tensor bias, float eps, bool pool)"
        " -> (Tensor y, Tensor mean, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "instance_norm_relu_pool_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
      " Tensor rstd, bool pool) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // Derivatives of <gg_x, grad_x> + <gg_weight, grad_weight> + <gg_bias, grad_bias> w.r.t. grad_y, x and weight
  // (bias has none: the ReLU mask is piecewise constant). A missing gg_* counts as zeros.
  m.def(
      "instance_norm_relu_pool_double_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
      " Tensor rstd, Tensor? gg_x, Tensor? gg_weight, Tensor? gg_bias, bool pool)"
      " -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)",
      {at::Tag::pt2_compliant_tag});
  // DSA augmentation of images [B, C, H, W] by the families in `families` ("color_crop_flip", applied in that order)
  // with parameter rows real_params [P, 6] float64 (brightness, saturation, contrast, scale_x, scale_y, rotation)
  // and int_params [P, 5] int64 (crop_row, crop_col, cutout_row, cutout_col, flip); P = 1 (shared) or B. The map is
  // affine in the images: with_offset=False leaves out the brightness offset (its linear part).
  m.def(
      "diff_augment(Tensor images, str families, Tensor real_params, Tensor int_params, int[2] cutout_size,"
      " bool align_corners, bool with_offset=True) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The transpose of diff_augment's linear part applied to grad [B, C, H, W]: the gradient w.r.t. the images.
  m.def(
      "diff_augment_adjoint(Tensor grad, str families, Tensor real_params, Tensor int_params, int[2] cutout_size,"
      " bool align_corners) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

// Importing fastdd._C loads this shared library, and loading it runs the static registrations above and in the
// kernel files. The module object itself only carries `cuda_kernels` (1 when csrc/cuda was compiled in).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "fastdd._C",
      "Compiled fastdd operators, registered under torch.ops.fastdd.",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "cuda_kernels", FASTDD_CUDA_KERNELS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
