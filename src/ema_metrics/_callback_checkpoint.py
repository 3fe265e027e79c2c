"""The Lightning callback's state outside training: checkpoint entries, epoch snapshots, the pooled state after fit.

A checkpoint entry holds every rank's state vector of every metric the callback drives (see
:mod:`ema_metrics._rank_state`), so a resume on the same number of processes is bit-exact per rank; the module's own
``state_dict`` gets the pooled state, marked as a replica, so that it means the same on any number of processes.
A damaged or hand-edited entry fails with a ``ValueError`` naming the entry and the metric, never a crash inside.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics import _rank_state as rs
from ema_metrics._base import DecayedSumMetric, _distributed_ready

Named = Sequence[tuple[str, DecayedSumMetric]]


def save(
    entry: dict[str, Any],
    module_state: dict[str, Any] | None,
    named: Named,
    *,
    driven: set[str],
    tick_open: bool,
    stepped: bool,
) -> None:
    """Fill a checkpoint entry with every rank's states (one collective), and the module state with pooled ones."""
    if not named:
        return
    rows = rs.gather_vectors([m for _, m in named])
    entry["ranks"] = {
        "world_size": int(rows[0].shape[0]),
        "metrics": {name: r for (name, _), r in zip(named, rows, strict=True)},
        # With manual optimization a checkpoint can fall inside an optimizer step (for example at the end of an
        # epoch, when the user's accumulation goes on into the next one): the resumed run continues that tick.
        "tick_open": tick_open,
        "stepped": stepped,
        "tick_decayed": {name: snapshot(m)[1] for name, m in named},
    }
    if module_state is None:
        return
    for (name, m), r in zip(named, rows, strict=True):
        if name in driven:
            pooled = rs.pool_vectors(m, r, f"EMAMetricsCallback checkpoint, metric {name!r}")
            for key, value in rs.pooled_state_dict(m, pooled).items():
                if f"{name}.{key}" in module_state:
                    module_state[f"{name}.{key}"] = value


def restore(saved: Any, named: Named, state_key: str) -> bool | None:
    """Apply a checkpoint entry's per-rank states; return ``stepped`` if a tick was open at the checkpoint, else None.

    Every rank validates the whole entry first, so every rank raises the same error and none is left half-restored.
    """
    where = f"checkpoint entry {state_key!r}, key 'ranks'"
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: expected a dict, but got {type(saved).__name__}")
    missing = [k for k in ("world_size", "metrics") if k not in saved]
    if missing:
        raise ValueError(f"{where}: the entry has no {missing}; it was not written by EMAMetricsCallback")
    world_saved, metrics = saved["world_size"], saved["metrics"]
    if isinstance(world_saved, bool) or not isinstance(world_saved, int) or world_saved < 1:
        raise ValueError(f"{where}: 'world_size' must be a positive integer, but got {world_saved!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}: 'metrics' must be a dict of per-rank states, but got {type(metrics).__name__}")
    tick_open, stepped, decayed = saved.get("tick_open", False), saved.get("stepped", False), saved.get("tick_decayed")
    if not isinstance(tick_open, bool) or not isinstance(stepped, bool):
        raise ValueError(f"{where}: 'tick_open' and 'stepped' must be bools, but got {tick_open!r}, {stepped!r}")
    decayed = {} if decayed is None else decayed
    if not isinstance(decayed, Mapping) or not all(isinstance(v, bool) for v in decayed.values()):
        raise ValueError(f"{where}: 'tick_decayed' must map metric names to bools, but got {decayed!r}")
    names = {name for name, _ in named}
    unknown = sorted(set(metrics) - names)
    if unknown:
        warnings.warn(f"{where}: states of {unknown} have no metric to go to; they are ignored", stacklevel=2)
    world = dist.get_world_size() if _distributed_ready() else 1
    rank = dist.get_rank() if _distributed_ready() else 0
    plan: list[tuple[DecayedSumMetric, Tensor]] = []
    for name, m in named:
        if name not in metrics:
            warnings.warn(f"{where}: no state for metric {name!r}; it starts from scratch", stacklevel=2)
            continue
        rows = metrics[name]
        here = f"{where}, metric {name!r}"
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != world_saved:
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"{here}: expected a tensor of {world_saved} rows (one per rank), but got {shape}")
        pooled = rs.pool_vectors(m, rows, here)  # validates every row and the tick counts
        if world_saved == world:
            plan.append((m, rows[rank].to(torch.float64)))
        else:
            plan.append((m, pooled if rank == 0 else _empty_like(m, pooled)))
    for m, row in plan:
        rs.load_vector(m, row, where)
    if not tick_open:
        return None
    for name, m in named:
        restore_snapshot(m, (None, bool(decayed.get(name, False))), reopen=True)
    return stepped


def snapshot(metric: DecayedSumMetric) -> tuple[Tensor, bool]:
    """The metric's state, and whether its open tick (if any) already decayed."""
    return rs.state_vector(metric).detach().clone(), bool(metric.in_tick and metric._tick_decayed)


def restore_snapshot(metric: DecayedSumMetric, saved: tuple[Tensor | None, bool], reopen: bool = False) -> None:
    """Put back a :func:`snapshot`; the open tick must not decay a second time."""
    vector, decayed = saved
    if vector is not None:
        rs.load_vector(metric, vector, "EMAMetricsCallback epoch snapshot")
    if reopen and not metric.in_tick:
        metric.begin_tick()
    metric._tick_decayed = decayed and metric.in_tick


def pool_into_every_rank(metrics: Sequence[DecayedSumMetric]) -> None:
    """Give every rank's metrics the pooled state of all ranks, as replicas (one sync for all)."""
    rs.pool_into_replicas(metrics)


def local_value(metric: DecayedSumMetric) -> Any:
    """This rank's value, computed without a sync (warnings of an empty metric silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric._value_from_states({n: getattr(metric, n) for n in metric._state_names()})


def _empty_like(metric: DecayedSumMetric, pooled: Tensor) -> Tensor:
    """A vector with no observation but the pooled tick count (a rank that starts from zero on another layout)."""
    out = torch.zeros_like(pooled)
    at = rs.vector_size(metric) - 3 - len(metric._extra_counters())
    out[at] = pooled[at]
    return out
