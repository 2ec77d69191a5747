"""Triton kernels of fastdd, installed as ``fastdd.kernels`` (the top-level ``kernels/`` folder of the source tree).

Each module holds one op's ``@triton.jit`` kernel and its launcher; the public API in ``fastdd.ops`` imports them
lazily. To run them on CPU, set ``TRITON_INTERPRET=1`` before the first kernel module is imported.
"""
