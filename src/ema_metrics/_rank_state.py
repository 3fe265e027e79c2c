"""A rank's whole state as one float64 vector: export, validate, pool across ranks, import.

This is the interface between the metrics and the Lightning callback (checkpoints, epoch continuity, the pooled
state after a fit). A vector holds, in order, every decayed state flattened, the tick count, the replica flag (1
when the vector is the pooled state of all ranks), the scale exponent and the metric's summed counters. Vectors of
several ranks pool with the arithmetic of a sync (:func:`ema_metrics._sync_rows.pool_rows`), once the tick counts agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ema_metrics import _decay, _sync, _sync_rows
from ema_metrics._base import DecayedSumMetric, _distributed_ready

__all__ = [
    "pool_into_replicas",
    "vector_size",
    "check_vector",
    "gather_vectors",
    "load_vector",
    "pool_vectors",
    "pooled_state_dict",
    "state_vector",
]

_F64 = torch.float64


def vector_size(metric: DecayedSumMetric) -> int:
    """The length of the metric's state vector."""
    return _sync_rows.size(metric) + 3 + len(metric._extra_counters())


def state_vector(metric: DecayedSumMetric) -> Tensor:
    """This rank's state as one float64 vector (a copy, on the metric's device)."""
    states = _sync_rows.flat(metric)
    head = torch.tensor([float(metric.ticks), float(metric._replica)], dtype=_F64, device=states.device)
    counters = torch.tensor([float(v) for v in metric._extra_counters().values()], dtype=_F64, device=states.device)
    return torch.cat([states, head, metric.scale.reshape(1).to(_F64), counters])


def gather_vectors(metrics: Sequence[DecayedSumMetric]) -> list[Tensor]:
    """Every rank's vector of each metric, as ``(world_size, n)`` CPU tensors on rank 0 (for a checkpoint).

    The checks of a sync run first (its fixed-size first collective), so ranks whose metrics differ raise the same
    error instead of waiting in a gather of another size. The vectors are then gathered to rank 0 only, which writes
    the checkpoint: the other ranks hold no more than their own row (returned as a single row).
    """
    if not metrics:
        return []
    _sync.check_alike(metrics)
    packed = torch.cat([state_vector(m) for m in metrics])
    if _distributed_ready():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        targets = list(packed.new_empty((world, packed.numel())).unbind(0)) if rank == 0 else None
        torch.distributed.gather(packed, targets, dst=0)
        rows = torch.stack(targets) if targets is not None else packed.unsqueeze(0)
    else:
        rows = packed.unsqueeze(0)
    rows = rows.detach().cpu()
    out, offset = [], 0
    for m in metrics:
        size = vector_size(m)
        out.append(rows[:, offset : offset + size].clone())
        offset += size
    return out


def check_vector(metric: DecayedSumMetric, vector: Any, where: str) -> Tensor:
    """``vector`` as float64 if it is a valid state vector of ``metric``; else a ValueError naming ``where``."""
    name = type(metric).__name__
    if not isinstance(vector, Tensor):
        raise ValueError(f"{where}: expected a tensor holding a state of {name}, but got {type(vector).__name__}")
    expected = vector_size(metric)
    if vector.dim() != 1 or vector.numel() != expected or not vector.is_floating_point():
        raise ValueError(
            f"{where}: expected a float vector of {expected} values (the state of {name} as configured now), but"
            f" got shape {tuple(vector.shape)} and dtype {vector.dtype}; was it saved by a differently configured"
            " metric?"
        )
    v = vector.to(_F64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where}: the state of {name} holds non-finite values: {v.tolist()}")
    ticks_at = _sync_rows.size(metric)
    ticks, replica, scale, *counters = v[ticks_at:].tolist()
    if ticks < 0 or not float(ticks).is_integer():
        raise ValueError(f"{where}: the tick count of {name} must be a non-negative integer, but got {ticks!r}")
    if replica not in (0.0, 1.0):
        raise ValueError(f"{where}: the replica flag of {name} must be 0 or 1, but got {replica!r}")
    if scale > 0 or not float(scale).is_integer():
        raise ValueError(f"{where}: the scale exponent of {name} must be an integer <= 0, but got {scale!r}")
    if any(c < 0 or not float(c).is_integer() for c in counters):
        raise ValueError(f"{where}: the counters of {name} must be non-negative integers, but got {counters!r}")
    problem = metric._check_states(_states(metric, v))
    if problem:
        raise ValueError(f"{where}: {problem}")
    return v


def _states(metric: DecayedSumMetric, vector: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    for name in metric._state_names():
        local = getattr(metric, name)
        out[name] = vector[offset : offset + local.numel()].reshape(local.shape)
        offset += local.numel()
    return out


def load_vector(metric: DecayedSumMetric, vector: Any, where: str) -> None:
    """Set the metric's state from a vector (validated first: on error the state is unchanged)."""
    v = check_vector(metric, vector, where)
    at = _sync_rows.size(metric)
    ticks, replica, scale, *counters = v[at:].tolist()
    device = metric.scale.device
    for name, value in _states(metric, v).items():
        setattr(metric, name, value.to(device=device, dtype=_F64).clone())
    metric.scale = torch.tensor(scale, dtype=_F64, device=device)
    metric._ticks = int(ticks)
    metric._replica = bool(replica)
    metric._renorm_at = metric._ticks + metric._renorm_every
    metric._set_extra_counters({n: int(c) for n, c in zip(metric._extra_counters(), counters, strict=True)})
    metric._update_count = max(metric._update_count, metric._ticks)
    metric._computed = None


def pool_vectors(metric: DecayedSumMetric, rows: Any, where: str) -> Tensor:
    """Pool the vectors of every rank (``(world_size, n)``) into the vector of the pooled state.

    Raises:
        ValueError: If a row is invalid, or the ranks ticked different numbers of times.

    """
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] < 1:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{where}: expected a (world_size, n) tensor of per-rank states, but got {shape}")
    checked = torch.stack([check_vector(metric, row, f"{where}, rank {r}") for r, row in enumerate(rows)])
    at = _sync_rows.size(metric)
    ticks = checked[:, at].tolist()
    if len(set(ticks)) > 1:
        raise ValueError(
            f"{where}: the ranks of {type(metric).__name__} ticked different numbers of times"
            f" ({[int(t) for t in ticks]}); their states cannot be pooled"
        )
    masks = [None if m is None else m.cpu() for m in metric._masks()]
    scales = torch.stack(
        [_decay.effective_scale(list(_states(metric, row).values()), masks, row[at + 2]) for row in checked]
    )
    replica = bool((checked[:, at + 1] == 1).all())
    pooled = _sync_rows.pool_rows(metric, checked[:, :at], scales, replica)
    counters = checked[:1, at + 3 :] if replica else checked[:, at + 3 :]
    head = torch.tensor([ticks[0], 0.0], dtype=_F64)
    flat = torch.cat([pooled.states[n].reshape(-1).cpu() for n in metric._state_names()])
    return torch.cat([flat, head, pooled.scale.reshape(1).cpu(), counters.sum(dim=0)])


def pooled_state_dict(metric: DecayedSumMetric, pooled: Tensor) -> dict[str, Any]:
    """The ``state_dict`` entries (relative to the metric) of a metric holding ``pooled``, marked as a replica."""
    states = _states(metric, pooled)
    out: dict[str, Any] = {}
    for name, value in states.items():
        if metric._persistent.get(name, False):
            out[name] = value.to(getattr(metric, name).dtype).clone()
    at = _sync_rows.size(metric)
    ticks, _, scale, *counters = pooled[at:].tolist()
    if metric._persistent.get("scale", False):
        out["scale"] = torch.tensor(scale, dtype=_F64)
    extra = metric.get_extra_state()
    extra.update({"ticks": int(ticks), "replica": True})
    extra.update({k: int(v) for k, v in zip(metric._extra_counters(), counters, strict=True)})
    out["_extra_state"] = extra
    return out


def pool_into_replicas(metrics: Sequence[DecayedSumMetric]) -> None:
    """Give every rank's metrics the pooled state of all ranks, marked as replicas (one sync for all)."""
    for m, pooled in zip(metrics, _sync.pool(metrics), strict=True):
        m._adopt(pooled)
        m._set_extra_counters(pooled.counters)
        m._replica = True
        m._computed = None
