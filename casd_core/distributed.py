"""torch.distributed for the CLI's jobs: the process group ``torchrun`` describes, and the few
collectives training and batch inference need.

``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` reads them, joins the group (NCCL
when the ranks compute on CUDA GPUs, gloo on CPU) and leaves it at the end. Outside
``torchrun`` (or with one process) there is no group, and every function here degrades to
the single-process answer (rank 0 of 1, reductions return their input), so callers never
branch on whether they run distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from casd_core.errors import CasdError, param
from casd_core.runtime import resolve_device

# Long enough for rank 0 alone to validate, calibrate and write the package while the other
# ranks wait at a barrier; a dead peer is noticed by torchrun, which stops the others, sooner.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job: ``rank`` of ``world_size``, ``local_rank`` on its
    node, and the ``device`` it computes on (``cuda:local_rank`` on a GPU node)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started for this job (1 when not under torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 when not under torchrun); unlike
    :func:`rank` it needs no group, so it also holds before joining and after leaving one."""
    return _env_int("RANK", 0)


def processes_per_node() -> int:
    """Processes ``torchrun`` started on this node (``LOCAL_WORLD_SIZE``; 1 when not under
    torchrun): they share its CPU cores, e.g. for data-loading workers."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active in this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the job (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node, from torchrun's ``LOCAL_RANK`` (0 without one)."""
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes shared outputs."""
    return rank() == 0


def rank_device(device: str = "auto") -> torch.device:
    """The device this rank computes on: ``device`` resolved as in a single process, and on
    CUDA the GPU of index ``LOCAL_RANK`` (one GPU per process, as torchrun's
    ``--nproc-per-node`` assumes), whatever index ``device`` named."""
    resolved = resolve_device(device)
    if resolved.type != "cuda" or launched_world_size() == 1:
        return resolved
    index = _env_int("LOCAL_RANK", 0)
    if index >= torch.cuda.device_count():
        raise CasdError(f"this node runs local rank {index} but has {torch.cuda.device_count()} CUDA GPU(s); "
                        f"start at most that many processes per node, or use {param('device')} cpu")
    return torch.device("cuda", index)


def _group_device() -> torch.device:
    """Where collective tensors must live: on this rank's GPU for NCCL, on the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Rank]:
    """Join the group torchrun describes for the duration of the block, and leave it after.

    NCCL when the ranks compute on CUDA, gloo otherwise. With one process (plain ``casd``, or
    ``torchrun --nproc-per-node 1``) no group is created and the block runs as always. A group
    that is already active (a caller joined it) is used as is and left to that caller.
    """
    target = rank_device(device)
    created = False
    if launched_world_size() > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise CasdError("this PyTorch build has no torch.distributed; run a single process "
                            "(without torchrun)")
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": target} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
        created = True
    try:
        yield Rank(rank(), world_size(), local_rank(), target)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op without a group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over ranks (``"sum"``, ``"max"``, ``"min"`` or ``"mean"``), returned
    as a new tensor on ``tensor``'s device; the input is left as it was. Sums keep the dtype,
    so int64 counts stay exact; a mean is floating point."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; use one of {', '.join(ops)}")
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_group_device(), copy=True)
    dist.all_reduce(work, op=ops[op])
    if op == "mean":
        work = work / world_size()
    return work.to(tensor.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small: summaries, not tensors of data), in rank order;
    ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` is ignored on the others); ``obj``
    itself without a group."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- batch inference: results that wait on long, uneven work --------------------------------

# Ranks of a batch may finish hours apart (one rank drew the largest raster): the results meet
# on a gloo group that waits that long, whatever the default group's backend and timeout.
LONG_WAIT = datetime.timedelta(days=7)


@contextlib.contextmanager
def patient_group() -> Iterator[Any]:
    """A gloo group over every rank whose collectives wait up to :data:`LONG_WAIT`, for the
    block; ``None`` without a group (the functions below then answer as one process)."""
    if not is_distributed():
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def gather_object_on(group: Any, obj: Any) -> list[Any] | None:
    """Every rank's picklable ``obj`` in rank order on rank 0 (``None`` on the others), over
    ``group``; ``[obj]`` when ``group`` is ``None``."""
    if group is None:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0, group=group)
    return gathered


def broadcast_object_on(group: Any, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank, over ``group`` (``obj`` itself when ``None``)."""
    if group is None:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
