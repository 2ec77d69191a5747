"""Several processes on one run: the process group from torchrun's environment, the local launcher behind
``--nproc``, and the few explicit collectives the distillers use.

The design keeps a distributed run equal to the single-process run with the same seed:

- Every rank holds the same synthetic set, optimisers and run generator, and makes every random draw the
  single-process run makes, in the same order, including the draws of work it does not do itself.
- Only work whose results are summed is split: the classes of dc/dsa/dm (group ``g`` on rank ``g % world``, the
  outlier group of TrustDD counting as group ``num_classes``), the students of mtt/tesla (student ``i`` on rank
  ``i % world``; with fewer tesla/tesla-compat students than ranks, the rows of every student step's minibatch
  instead, with the step's parameter gradient all-reduced at every step) and the experts of ``fastdd experts``.
  Each rank computes its part of the image (and step-size) gradient; one ``all_reduce(SUM)`` gives every rank the
  full gradient, and every rank applies the same optimiser step. There is no DDP wrapper.
- Rank 0 alone writes run outputs (metrics, checkpoints, synthetic set, experts.json).

The sums are the same as in one process up to the order of floating-point additions, so results agree to float
tolerance (dc/dsa, whose classes touch disjoint images, agree bit for bit on the CPU).

Outside a process group every function here is the single-process no-op (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from typing import Any, Callable, Iterator, Sequence

import torch

from fastdd.errors import FastddError

# torchrun's variables; the launcher sets the same ones.
_ENV_WORLD = "WORLD_SIZE"
_ENV_RANK = "RANK"
_ENV_LOCAL_RANK = "LOCAL_RANK"


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True inside a process group (of any size)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 outside a process group."""
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes of the run, 1 outside a process group."""
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes outputs (rank 0; the only process of a single-process run)."""
    return rank() == 0


def owns(index: int) -> bool:
    """True when work item ``index`` (a class, a student, an expert) is this rank's: ``index % world == rank``."""
    return index % world_size() == rank()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        _dist().barrier()


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: the current CUDA device under NCCL, else the CPU."""
    if is_initialized() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor by its sum over the ranks, in place (one collective per dtype and device)."""
    if world_size() == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    target = _collective_device()
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(target)
        _dist().all_reduce(flat)
        offset = 0
        for t in group:
            n = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def sum_float(value: float) -> float:
    """``value`` summed over the ranks (in float64); ``value`` itself in one process."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    _dist().all_reduce(t)
    return float(t.item())


def check_same(text: str, what: str) -> None:
    """Raise FastddError on every rank unless all ranks hold the same ``text`` (compared by a 62-bit digest)."""
    if world_size() == 1:
        return
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**62 - 1)
    low = torch.tensor([digest], dtype=torch.int64, device=_collective_device())
    high = low.clone()
    _dist().all_reduce(low, op=_dist().ReduceOp.MIN)
    _dist().all_reduce(high, op=_dist().ReduceOp.MAX)
    if int(low.item()) != int(high.item()):
        raise FastddError(
            f"the {world_size()} processes of this run hold different {what}; start every process with the same "
            "command and options."
        )


def tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    """A hex SHA-256 of the bytes of ``tensors`` (for :func:`check_same` on model state)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def launched_world_size() -> int | None:
    """The world size torchrun (or :func:`launch`) gave this process through ``WORLD_SIZE``, else None."""
    value = os.environ.get(_ENV_WORLD)
    return int(value) if value else None


def launched_rank() -> int:
    """The rank torchrun (or :func:`launch`) gave this process through ``RANK`` (0 outside a launched group), known
    before the process group is joined."""
    return int(os.environ.get(_ENV_RANK) or 0)


def backend_for(device: str | torch.device) -> str:
    """"nccl" for a CUDA device (when NCCL is built in), "gloo" otherwise."""
    if torch.device(device).type == "cuda" and _dist().is_nccl_available():
        return "nccl"
    return "gloo"


@contextlib.contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[int]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) for the duration of the block; yields the world size.

    Without those variables (or with ``WORLD_SIZE`` 1), or when a group already exists, nothing is set up or torn
    down. With a CUDA ``device`` the group uses NCCL and this process's current device becomes ``cuda:LOCAL_RANK``
    (so ``--device cuda`` means one GPU per process); otherwise Gloo.
    """
    world = launched_world_size()
    if is_initialized() or world is None or world <= 1:
        yield world_size()
        return
    dist = _dist()
    if not dist.is_available():
        raise FastddError("this build of torch has no torch.distributed; run with one process.")
    if torch.device(device).type == "cuda":
        local_rank, gpus = int(os.environ.get(_ENV_LOCAL_RANK, "0")), torch.cuda.device_count()
        if gpus == 0:
            raise FastddError("--device cuda was given but no GPU is visible; use --device cpu (Gloo).")
        if local_rank >= gpus:
            raise FastddError(
                f"process {local_rank} of this machine needs a GPU of its own but {gpus} are visible; start at most "
                f"{gpus} processes per machine (--nproc or torchrun --nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
    backend = backend_for(device)
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        yield world_size()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LaunchFailed(Exception):
    """A launched process failed; ``exit_code`` is its exit status (its error was printed by that process)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launch(fn: Callable[..., Any], args: tuple = (), *, nproc: int, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes that form one process group, and wait for them.

    Each process gets torchrun's environment (``MASTER_ADDR`` 127.0.0.1, a free ``MASTER_PORT``, ``RANK`` =
    ``LOCAL_RANK`` = its index, ``WORLD_SIZE`` = ``LOCAL_WORLD_SIZE`` = ``nproc``), so ``fn`` joins the group with
    :func:`session`, exactly as under ``torchrun --nproc_per_node nproc``. ``fn`` must be importable (a module-level
    function). ``threads`` sets each process's torch CPU threads.

    Raises:
        LaunchFailed: a process exited with a non-zero status (the others are then stopped).
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise FastddError(f"--nproc must be at least 1, got {nproc}.")
    port = free_port()
    # torch warns when it stops the other processes after one failed; the failed one has said why.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        mp.start_processes(
            _child, args=(fn, args, nproc, port, threads), nprocs=nproc, join=True, start_method="spawn"
        )
    except mp.ProcessExitedException as exc:
        raise LaunchFailed(f"process {exc.error_index} of {nproc} exited with status {exc.exit_code}",
                           exc.exit_code or 1) from None
    except mp.ProcessRaisedException as exc:
        raise LaunchFailed(f"process {exc.error_index} of {nproc} failed:\n{exc}", 1) from None
    finally:
        spawn_log.setLevel(level)


def _child(index: int, fn: Callable[..., Any], args: tuple, nproc: int, port: int, threads: int | None) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            _ENV_RANK: str(index),
            _ENV_LOCAL_RANK: str(index),
            _ENV_WORLD: str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
        }
    )
    if threads is not None:
        torch.set_num_threads(threads)
    fn(*args)


__all__ = [
    "LaunchFailed",
    "all_reduce_sum_",
    "backend_for",
    "barrier",
    "check_same",
    "free_port",
    "is_initialized",
    "is_main",
    "launch",
    "launched_rank",
    "launched_world_size",
    "owns",
    "rank",
    "session",
    "sum_float",
    "tensor_digest",
    "world_size",
]
