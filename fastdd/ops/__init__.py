"""The public kernel API of fastdd: one function per op; each validates its inputs and picks a backend.

Backends: ``"reference"`` (pure PyTorch, the test oracle), ``"cpp"`` (the compiled extension ``fastdd._C``),
``"triton"`` (GPU kernels; runs on CPU only under ``TRITON_INTERPRET=1``) and ``"auto"`` (the fastest available for
the tensors' device).

dtypes: every op takes float32, float64, bfloat16 and float16 inputs on every backend; bfloat16 / float16 ones (what
``torch.autocast`` hands the ops) are computed and accumulated in float32 and the results returned in the input's
dtype. ``instance_norm_relu_pool`` also takes float32 weight and bias with a half-precision x.
"""

from fastdd.ops.augment import AugmentParams, diff_augment, sample_augment_params
from fastdd.ops.cvar import cluster_cvar, group_cvar_loss
from fastdd.ops.nearest import nearest_synthetic
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool

__all__ = [
    "AugmentParams",
    "diff_augment",
    "sample_augment_params",
    "nearest_synthetic",
    "cluster_cvar",
    "group_cvar_loss",
    "instance_norm_relu_pool",
]
