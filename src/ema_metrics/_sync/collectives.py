"""The collectives of a sync: their size, and the ``torch.distributed`` calls every protocol makes.

Every function here takes tensors and a process group, never a metric: :func:`ready`, :func:`rank` and :func:`world`
describe the group (one process without a process group), :func:`comm_device` says where its collectives take a
tensor (NCCL: CUDA only), and the collectives themselves sum or gather one flat tensor, optionally while the host
does something else (``meanwhile``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FORCE_COLLECTIVES",
    "INLINE",
    "all_gather_flat",
    "all_reduce_while",
    "comm_device",
    "gather_rows",
    "gather_while",
    "rank",
    "ready",
    "world",
]

#: Float64 values of the first collective of every sync (8 KiB): the checks, counters, exponents and, when they fit,
#: the states (an ``all_reduce``; per rank in the gather protocol). A larger ``INLINE`` would make every small sync pay
#: for it.
INLINE = 1024

#: Issue the collectives even in a group of one rank (which otherwise pools locally): for checks of the collectives
#: themselves on one device, such as ``benchmarks/gpu_check.py`` with a one-process NCCL group.
FORCE_COLLECTIVES = False


def ready(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group`` (default: the world)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return FORCE_COLLECTIVES or dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if ready(group) else 0


def world(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if ready(group) else 1


def comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective of ``group`` takes tensors of ``device``: NCCL takes CUDA tensors only.

    A metric left on the CPU while the group is NCCL (the plain quick start never moves it) is pooled through a buffer
    on the current CUDA device; every other case uses the states' own device.
    """
    if device.type == "cpu" and ready(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_gather_flat(out: Tensor, local: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Every rank's ``local`` into ``out`` (``world_size * local.numel()`` values, rank after rank): one collective.

    ``all_gather_into_tensor`` (``all_gather_single`` in the torch releases that renamed it) writes into one buffer;
    the list form of ``all_gather`` stages a flat buffer under NCCL and copies it back into ``world_size`` tensors.
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, local, group=group, async_op=async_op)


def all_reduce_while(
    local: Tensor, group: Any, meanwhile: Callable[[], Tensor] | None, distributed: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """The sum of every rank's ``local`` (on the group's device), and what ``meanwhile`` returns, run in flight.

    ``distributed``: whether :func:`ready` (when the caller knows it already).
    """
    if not (ready(group) if distributed is None else distributed):
        return local, None if meanwhile is None else meanwhile()
    buffer = local.to(comm_device(group, local.device))  # NCCL takes CUDA tensors only
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=meanwhile is not None)
    done = None if meanwhile is None else meanwhile()
    if work is not None:
        work.wait()
    return buffer, done


def gather_rows(local: Tensor, group: Any, gather: Any) -> Tensor:
    if gather is not None:
        return torch.stack(list(gather(local, group=group)))
    return gather_while(local, group, None)[0]


def gather_while(local: Tensor, group: Any, meanwhile: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """Every rank's ``local``, stacked, and what ``meanwhile`` returns, run while the ``all_gather`` is in flight."""
    if not ready(group):
        return local.unsqueeze(0), None if meanwhile is None else meanwhile()
    device = comm_device(group, local.device)
    out = torch.empty(dist.get_world_size(group) * local.numel(), dtype=local.dtype, device=device)
    work = all_gather_flat(out, local.to(device), group=group, async_op=meanwhile is not None)
    done = None if meanwhile is None else meanwhile()
    if work is not None:
        work.wait()
    return out.view(-1, local.numel()), done
