"""A rank's whole state as one float64 vector: export, validate, pool across ranks, import.

This is the interface between the metrics and the Lightning callback (checkpoints, epoch continuity, the pooled
state after a fit). A vector holds, in order, every decayed state flattened, the tick count, the replica flag (1
when the vector is the pooled state of all ranks) and the metric's summed counters. Vectors of several ranks pool
exactly by summing (the ranks decayed by the same ``beta`` at the same ticks), once the tick counts agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ema_metrics._base import DecayedSumMetric, _distributed_ready, _gather

__all__ = [
    "as_replica",
    "check_vector",
    "gather_vectors",
    "load_vector",
    "pool_vectors",
    "pooled_state_dict",
    "state_vector",
]

_F64 = torch.float64


def state_vector(metric: DecayedSumMetric) -> Tensor:
    """This rank's state as one float64 vector (a copy, on the metric's device)."""
    return metric._pack()


def gather_vectors(metrics: Sequence[DecayedSumMetric]) -> list[Tensor]:
    """Every rank's vector of each metric, as ``(world_size, n)`` CPU tensors, with **one** collective for all."""
    if not metrics:
        return []
    packed = torch.cat([state_vector(m) for m in metrics])
    rows = _gather(packed, None, None) if _distributed_ready() else packed.unsqueeze(0)
    rows = rows.detach().cpu()
    out, offset = [], 0
    for m in metrics:
        size = m._packed_size()
        out.append(rows[:, offset : offset + size].clone())
        offset += size
    return out


def check_vector(metric: DecayedSumMetric, vector: Any, where: str) -> Tensor:
    """``vector`` as float64 if it is a valid state vector of ``metric``; else a ValueError naming ``where``."""
    name = type(metric).__name__
    if not isinstance(vector, Tensor):
        raise ValueError(f"{where}: expected a tensor holding a state of {name}, but got {type(vector).__name__}")
    expected = metric._packed_size()
    if vector.dim() != 1 or vector.numel() != expected or not vector.is_floating_point():
        raise ValueError(
            f"{where}: expected a float vector of {expected} values (the state of {name} as configured now), but"
            f" got shape {tuple(vector.shape)} and dtype {vector.dtype}; was it saved by a differently configured"
            " metric?"
        )
    v = vector.to(_F64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where}: the state of {name} holds non-finite values: {v.tolist()}")
    ticks_at = metric._ticks_index()
    ticks, replica, *counters = v[ticks_at:].tolist()
    if ticks < 0 or not float(ticks).is_integer():
        raise ValueError(f"{where}: the tick count of {name} must be a non-negative integer, but got {ticks!r}")
    if replica not in (0.0, 1.0):
        raise ValueError(f"{where}: the replica flag of {name} must be 0 or 1, but got {replica!r}")
    if any(c < 0 or not float(c).is_integer() for c in counters):
        raise ValueError(f"{where}: the counters of {name} must be non-negative integers, but got {counters!r}")
    problem = metric._check_states(metric._split_vector(v))
    if problem:
        raise ValueError(f"{where}: {problem}")
    return v


def load_vector(metric: DecayedSumMetric, vector: Any, where: str) -> None:
    """Set the metric's state from a vector (validated first: on error the state is unchanged)."""
    metric._load_packed(check_vector(metric, vector, where))


def pool_vectors(metric: DecayedSumMetric, rows: Any, where: str) -> Tensor:
    """Pool the vectors of every rank (``(world_size, n)``) into the vector of the pooled state.

    Raises:
        ValueError: If a row is invalid, or the ranks ticked different numbers of times.

    """
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] < 1:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{where}: expected a (world_size, n) tensor of per-rank states, but got {shape}")
    checked = torch.stack([check_vector(metric, row, f"{where}, rank {r}") for r, row in enumerate(rows)])
    ticks_at = metric._ticks_index()
    ticks = checked[:, ticks_at].tolist()
    if len(set(ticks)) > 1:
        raise ValueError(
            f"{where}: the ranks of {type(metric).__name__} ticked different numbers of times"
            f" ({[int(t) for t in ticks]}); their states cannot be pooled"
        )
    replica = checked[:, ticks_at + 1]
    if bool((replica == 1).all()):
        pooled = checked[0].clone()
    else:
        pooled = checked.sum(dim=0)
        pooled[ticks_at] = ticks[0]
    pooled[ticks_at + 1] = 0.0
    return pooled


def pooled_state_dict(metric: DecayedSumMetric, pooled: Tensor) -> dict[str, Any]:
    """The ``state_dict`` entries (relative to the metric) of a metric holding ``pooled``, marked as a replica."""
    states = metric._split_vector(pooled)
    out: dict[str, Any] = {}
    for name, value in states.items():
        if metric._persistent.get(name, False):
            out[name] = value.to(getattr(metric, name).dtype).clone()
    ticks_at = metric._ticks_index()
    ticks, _, *counters = pooled[ticks_at:].tolist()
    extra = metric.get_extra_state()
    extra.update({"ticks": int(ticks), "replica": True})
    extra.update({k: int(v) for k, v in zip(metric._extra_counters(), counters, strict=True)})
    out["_extra_state"] = extra
    return out


def as_replica(metric: DecayedSumMetric, pooled: Tensor) -> None:
    """Give the metric the pooled state of all ranks, marked as a replica (the same on every rank)."""
    row = pooled.clone()
    row[metric._ticks_index() + 1] = 1.0
    metric._load_packed(row)

