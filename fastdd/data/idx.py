"""Reader for the idx file format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes, then the
values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from fastdd.errors import FastddError

# Type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one idx file, plain or gzip-compressed (recognised by its content, not its name).

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        A tensor with the file's shape (``[N, H, W]`` for images, ``[N]`` for labels) and its native dtype
        (``uint8`` for MNIST-style files), in native byte order.

    Raises:
        FastddError: the file is not an idx file or is truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise FastddError(f"{path} is a damaged gzip file ({err}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FastddError(f"{path} is not an idx file (bad header); expected an MNIST-format idx file.")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FastddError(f"{path} is truncated (its header is incomplete); download it again.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise FastddError(
            f"{path} holds {len(raw) - header} data bytes but its header announces shape {shape} "
            f"({count * dtype.itemsize} bytes); download it again."
        )
    values = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    # astype copies into a writable, native-endian array that torch can own.
    return torch.from_numpy(values.astype(dtype.newbyteorder("="))).reshape(shape)
