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
  // sq_dist[i] = min_j ||points[i] - centers[j]||^2, computed exactly as a sum of squared differences (no
  // ||p||^2 + ||c||^2 - 2 p.c expansion), and index[i] = the lowest j attaining it. Values come before indices, as
  // in torch.min(dim); the Python API fastdd.ops.nearest_synthetic returns (index, sq_dist).
  m.def("nearest_synthetic(Tensor points, Tensor centers) -> (Tensor sq_dist, Tensor index)",
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
