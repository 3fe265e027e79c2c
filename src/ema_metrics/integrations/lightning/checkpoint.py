"""The Lightning callback's state outside training: checkpoint entries, per-rank rows, epoch snapshots, after fit.

**Rows.** A rank's whole state is one float64 vector: every decayed state flattened, the tick count, the replica flag
(1 when the vector is the pooled state of all ranks), the scale exponent and the metric's summed counters. It is read
from and written to a metric through its sync interface (``sync_state()`` / ``load_sync_state()``), and the rows of
several ranks pool with the arithmetic of a sync (:func:`ema_metrics._sync.pool_rows`), once the tick counts agree.

**Entries.** A checkpoint entry holds every rank's row of every metric the callback drives, so a resume on the same
number of processes is bit-exact per rank; the module's own ``state_dict`` gets the pooled state, marked as a replica,
so that it means the same on any number of processes. A damaged or hand-edited entry fails with a ``ValueError``
naming the entry and the metric, never a crash inside.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ema_metrics import _sync
from ema_metrics._base import DecayedSumMetric

__all__ = [
    "check_vector",
    "gather_vectors",
    "load_vector",
    "local_value",
    "pool_into_every_rank",
    "pool_vectors",
    "pooled_state_dict",
    "restore",
    "restore_snapshot",
    "save",
    "snapshot",
    "state_vector",
    "vector_size",
]

_F64 = torch.float64
Named = Sequence[tuple[str, DecayedSumMetric]]


# ---------------------------------------------------------------------------------------------- rows
def vector_size(metric: DecayedSumMetric) -> int:
    """The length of the metric's state vector."""
    s = metric.sync_state()
    return s.size + 3 + len(s.counters)


def state_vector(metric: DecayedSumMetric) -> Tensor:
    """This rank's state as one float64 vector (a copy, on the metric's device)."""
    s = metric.sync_state()
    states = _sync.flat(s)
    head = torch.tensor([float(s.ticks), float(s.replica)], dtype=_F64, device=states.device)
    counters = torch.tensor([float(v) for v in s.counters.values()], dtype=_F64, device=states.device)
    return torch.cat([states, head, s.scale.reshape(1).to(_F64), counters])


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
    if _sync.ready():
        world, rank = _sync.world(), _sync.rank()
        packed = packed.to(_sync.comm_device(None, packed.device))  # NCCL takes CUDA tensors only
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
    s = metric.sync_state()
    expected = s.size + 3 + len(s.counters)
    if vector.dim() != 1 or vector.numel() != expected or not vector.is_floating_point():
        raise ValueError(
            f"{where}: expected a float vector of {expected} values (the state of {name} as configured now), but"
            f" got shape {tuple(vector.shape)} and dtype {vector.dtype}; was it saved by a differently configured"
            " metric?"
        )
    v = vector.to(_F64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where}: the state of {name} holds non-finite values: {v.tolist()}")
    ticks, replica, scale, *counters = v[s.size :].tolist()
    if ticks < 0 or not float(ticks).is_integer():
        raise ValueError(f"{where}: the tick count of {name} must be a non-negative integer, but got {ticks!r}")
    if replica not in (0.0, 1.0):
        raise ValueError(f"{where}: the replica flag of {name} must be 0 or 1, but got {replica!r}")
    if scale > 0 or not float(scale).is_integer():
        raise ValueError(f"{where}: the scale exponent of {name} must be an integer <= 0, but got {scale!r}")
    if any(c < 0 or not float(c).is_integer() for c in counters):
        raise ValueError(f"{where}: the counters of {name} must be non-negative integers, but got {counters!r}")
    problem = metric._check_states(_states(s, v))  # the metric's own check of its states (a negative weight, ...)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return v


def _states(s: _sync.SyncState, vector: Tensor) -> dict[str, Tensor]:
    """The states part of a vector, as named views of the states' shapes (on the vector's device)."""
    out: dict[str, Tensor] = {}
    offset = 0
    for name, local in s.states.items():
        out[name] = vector[offset : offset + local.numel()].reshape(local.shape)
        offset += local.numel()
    return out


def _pooled_of(s: _sync.SyncState, v: Tensor) -> tuple[_sync.Pooled, bool]:
    """A checked vector as the state it holds (a fresh copy on the metric's device) and its replica flag."""
    ticks, replica, scale, *counters = v[s.size :].tolist()
    device = s.scale.device
    states = _sync.split(s, v[: s.size].to(device=device, copy=True))
    pooled = _sync.Pooled(
        states=states,
        scale=torch.tensor(scale, dtype=_F64, device=device),
        ticks=int(ticks),
        counters={n: int(c) for n, c in zip(s.counters, counters, strict=True)},
    )
    return pooled, bool(replica)


def load_vector(metric: DecayedSumMetric, vector: Any, where: str) -> None:
    """Set the metric's state from a vector (validated first: on error the state is unchanged)."""
    v = check_vector(metric, vector, where)
    pooled, replica = _pooled_of(metric.sync_state(), v)
    metric.load_sync_state(pooled, replica)


def _on_cpu(s: _sync.SyncState) -> _sync.SyncState:
    """The same sync state with its tensors on the CPU, where checkpoint rows are pooled."""
    return dataclasses.replace(
        s,
        states={n: t.detach().cpu() for n, t in s.states.items()},
        masks=[None if m is None else m.cpu() for m in s.masks],
        scale=s.scale.detach().cpu(),
    )


def pool_vectors(metric: DecayedSumMetric, rows: Any, where: str) -> Tensor:
    """Pool the vectors of every rank (``(world_size, n)``) into the vector of the pooled state (on the CPU).

    Raises:
        ValueError: If a row is invalid, or the ranks ticked different numbers of times.

    """
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] < 1:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{where}: expected a (world_size, n) tensor of per-rank states, but got {shape}")
    checked = torch.stack([check_vector(metric, row, f"{where}, rank {r}").cpu() for r, row in enumerate(rows)])
    s = _on_cpu(metric.sync_state())
    at = s.size
    ticks = checked[:, at].tolist()
    if len(set(ticks)) > 1:
        raise ValueError(
            f"{where}: the ranks of {type(metric).__name__} ticked different numbers of times"
            f" ({[int(t) for t in ticks]}); their states cannot be pooled"
        )
    scales = [float(s.effective_scale(list(_states(s, row).values()), row[at + 2])) for row in checked]
    replica = bool((checked[:, at + 1] == 1).all())
    pooled = _sync.pool_rows(s, checked[:, :at], scales, replica)
    counters = checked[:1, at + 3 :] if replica else checked[:, at + 3 :]
    head = torch.tensor([ticks[0], 0.0], dtype=_F64)
    flat = torch.cat([t.reshape(-1) for t in pooled.states.values()])
    return torch.cat([flat, head, pooled.scale.reshape(1), counters.sum(dim=0)])


def pooled_state_dict(metric: DecayedSumMetric, pooled: Tensor) -> dict[str, Any]:
    """The ``state_dict`` entries (relative to the metric) of a metric holding ``pooled``, marked as a replica."""
    s = metric.sync_state()
    persistent = metric._persistent  # torchmetrics' record of which states `state_dict` saves
    out: dict[str, Any] = {}
    for name, value in _states(s, pooled).items():
        if persistent.get(name, False):
            out[name] = value.to(s.states[name].dtype).clone()
    ticks, _, scale, *counters = pooled[s.size :].tolist()
    if persistent.get("scale", False):
        out["scale"] = torch.tensor(scale, dtype=_F64)
    extra = metric.get_extra_state()
    extra.update({"ticks": int(ticks), "replica": True})
    extra.update({k: int(v) for k, v in zip(s.counters, counters, strict=True)})
    out["_extra_state"] = extra
    return out


def pool_into_every_rank(metrics: Sequence[DecayedSumMetric]) -> None:
    """Give every rank's metrics the pooled state of all ranks, marked as replicas (one sync for all)."""
    for m, pooled in zip(metrics, _sync.pool(metrics), strict=True):
        m.load_sync_state(pooled, replica=True)


# ---------------------------------------------------------------------------------------------- entries and snapshots
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
    rows = gather_vectors([m for _, m in named])
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
            pooled = pool_vectors(m, r, f"EMAMetricsCallback checkpoint, metric {name!r}")
            for key, value in pooled_state_dict(m, pooled).items():
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
    world, rank = _sync.world(), _sync.rank()
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
        pooled = pool_vectors(m, rows, here)  # validates every row and the tick counts
        if world_saved == world:
            plan.append((m, rows[rank].to(torch.float64)))
        else:
            plan.append((m, pooled if rank == 0 else _empty_like(m, pooled)))
    for m, row in plan:
        load_vector(m, row, where)
    if not tick_open:
        return None
    for name, m in named:
        restore_snapshot(m, (None, bool(decayed.get(name, False))), reopen=True)
    return stepped


def snapshot(metric: DecayedSumMetric) -> tuple[Tensor, bool]:
    """The metric's state, and whether its open tick (if any) already decayed."""
    # `_tick_decayed`: whether the open tick's decay was applied (the metric has no public reader for it)
    return state_vector(metric).detach().clone(), bool(metric.in_tick and metric._tick_decayed)


def restore_snapshot(metric: DecayedSumMetric, saved: tuple[Tensor | None, bool], reopen: bool = False) -> None:
    """Put back a :func:`snapshot`; the open tick must not decay a second time."""
    vector, decayed = saved
    if vector is not None:
        load_vector(metric, vector, "EMAMetricsCallback epoch snapshot")
    if reopen and not metric.in_tick:
        metric.begin_tick()
    metric._tick_decayed = decayed and metric.in_tick


def local_value(metric: DecayedSumMetric) -> Any:
    """This rank's value, computed without a sync (warnings of an empty metric silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric._value_from_states(metric.sync_state().states)  # the value of given states (the metric's hook)


def _empty_like(metric: DecayedSumMetric, pooled: Tensor) -> Tensor:
    """A vector with no observation but the pooled tick count (a rank that starts from zero on another layout)."""
    out = torch.zeros_like(pooled)
    at = metric.sync_state().size
    out[at] = pooled[at]
    return out
