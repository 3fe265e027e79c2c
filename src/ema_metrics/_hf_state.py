"""Every rank's EMA state as JSON for a Hugging Face ``trainer_state.json``: gather, validate, restore, pool.

The Trainer writes the state of its ``ExportableState`` callbacks into ``trainer_state.json`` (from rank 0) and every
rank reads that file back on ``resume_from_checkpoint``, so the per-rank states travel with the checkpoint without a
file of their own. A state is the metric's ``state_dict()``: its tensors are decayed float64 sums (and counts) that
add across ranks, and its ``_extra_state`` holds the tick count, which must agree across ranks, and counters that add.
Python floats survive JSON exactly (``repr`` round-trips a float64), so a resume on the same number of processes is
bit-exact per rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics.ema import EMAMetric

__all__ = ["gather_states", "restore_states"]

_EXTRA = "_extra_state"
# entries of `_extra_state` that describe the state instead of counting observations: kept, not summed
_NOT_SUMMED = frozenset({"format", "ticks", "alpha", "replica"})


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _encode(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            t = value.detach().cpu()
            out[key] = {"shape": list(t.shape), "values": t.flatten().tolist()}
        else:
            out[key] = value
    return out


def gather_states(metric: EMAMetric) -> dict[str, Any]:
    """Every rank's ``metric.state_dict()`` as JSON data, gathered with **one** collective (call it on every rank)."""
    mine = _encode(metric.state_dict())
    world, _ = _world()
    ranks: list[Any] = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {"world_size": world, "ranks": ranks}


def _decode(metric: EMAMetric, row: Any, where: str) -> dict[str, Any]:
    """A saved rank's state as a ``state_dict`` for ``metric``, checked against the metric's own keys and shapes."""
    expected = metric.state_dict()
    if not isinstance(row, Mapping) or set(row) != set(expected):
        keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise ValueError(f"{where}: expected a state with keys {sorted(expected)}, but got {keys}")
    out: dict[str, Any] = {}
    for key, ref in expected.items():
        value = row[key]
        if isinstance(ref, Tensor):
            try:
                t = torch.tensor(value["values"], dtype=ref.dtype).reshape(value["shape"])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{where}: entry {key!r} is not a saved tensor: {value!r}") from err
            if t.shape != ref.shape or not bool(torch.isfinite(t).all()):
                shape = tuple(ref.shape)
                raise ValueError(f"{where}: entry {key!r} must be a finite tensor of shape {shape}, but got {value!r}")
            out[key] = t
        elif key == _EXTRA:
            if not isinstance(value, Mapping) or not isinstance(value.get("ticks"), int) or value.get("replica"):
                raise ValueError(f"{where}: entry {key!r} must hold a tick count (and no pooled replica): {value!r}")
            out[key] = dict(value)
        else:
            out[key] = value
    return out


def _pooled(states: list[dict[str, Any]], keep: bool, where: str) -> dict[str, Any]:
    """The sum of several ranks' states (``keep=True``), or a state with no observation (``keep=False``)."""
    ticks = {s[_EXTRA]["ticks"] for s in states if _EXTRA in s}
    if len(ticks) > 1:
        raise ValueError(f"{where}: the saved ranks ticked different numbers of times ({sorted(ticks)})")
    out: dict[str, Any] = {}
    for key, first in states[0].items():
        if isinstance(first, Tensor):
            total = torch.stack([s[key].to(torch.float64) for s in states]).sum(0).to(first.dtype)
            out[key] = total if keep else torch.zeros_like(first)
        elif key == _EXTRA:
            out[key] = {
                k: v if k in _NOT_SUMMED or not isinstance(v, int) else (sum(s[key][k] for s in states) if keep else 0)
                for k, v in first.items()
            }
        else:
            out[key] = first
    return out


def restore_states(metric: EMAMetric, saved: Any, where: str) -> None:
    """Load this rank's state from :func:`gather_states` data.

    On the number of processes it was saved with, each rank takes its own state back (bit-exact). On another number,
    rank 0 takes the sum of all saved ranks and the others start with no observation but the same tick count, which
    continues the same pooled curve. Every saved rank is validated first; on error the metric is unchanged.

    Raises:
        ValueError: If ``saved`` is not what :func:`gather_states` writes for this metric.

    """
    if not isinstance(saved, Mapping) or not isinstance(saved.get("ranks"), list) or not saved["ranks"]:
        raise ValueError(f"{where}: expected a dict with a non-empty list 'ranks', but got {saved!r}")
    states = [_decode(metric, row, f"{where}, rank {r}") for r, row in enumerate(saved["ranks"])]
    world, rank = _world()
    pooled = _pooled(states, keep=rank == 0, where=where)
    metric.load_state_dict(states[rank] if len(states) == world else pooled)
