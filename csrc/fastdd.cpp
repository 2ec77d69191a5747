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
