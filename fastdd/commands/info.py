"""``fastdd info``: versions, compiled backends and threads of this installation."""

from __future__ import annotations

import platform

import typer


def info() -> None:
    """Versions, compiled backends and threads of this installation."""
    import torch

    import fastdd
    from fastdd import _extension

    rows: list[tuple[str, str]] = [
        ("fastdd", fastdd.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    for module in ("torchvision", "triton", "kornia"):
        try:
            rows.append((module, __import__(module).__version__))
        except Exception as exc:  # optional pieces: report rather than fail
            rows.append((module, f"unavailable ({exc.__class__.__name__})"))
    rows.append(("cuda available", f"{torch.cuda.is_available()} ({torch.cuda.device_count()} devices)"))
    built = _extension.built_against()
    cpp = ("loaded" + (f" (built against torch {built})" if built else "") if _extension.has_cpp()
           else f"not loaded: {_extension.load_error()}")
    rows.append(("C++ extension fastdd._C", cpp))
    rows.append(("CUDA kernels compiled", str(_extension.has_cuda_kernels())))
    rows.append(("torch threads", str(torch.get_num_threads())))
    rows.append(("platform", f"{platform.platform()} ({platform.machine()})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


# The commands `--nproc` can start in several processes (the functions behind `fastdd distill` / `fastdd experts`).
