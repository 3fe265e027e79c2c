"""Every rank's EMA state as JSON for a Hugging Face ``trainer_state.json``: gather, validate, restore, pool.

The Trainer writes the state of its ``ExportableState`` callbacks into ``trainer_state.json`` (from rank 0) and every
rank reads that file back on ``resume_from_checkpoint``, so the per-rank states travel with the checkpoint without a
file of their own. A state is the metric's ``state_dict()`` (float64 tensors, and an ``_extra_state`` holding the tick
count); states of several ranks are pooled by the metric's own ``merge_state``, as a sync pools them. Python floats
survive JSON exactly (``repr`` round-trips a float64), so a resume on the same number of processes is bit-exact per
rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics import _sync
from ema_metrics.ema import EMAMetric

__all__ = ["gather_states", "gather_states_of", "restore_states", "saved_ranks", "saving_now", "state_of_step"]

_EXTRA = "_extra_state"


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
    return gather_states_of({"": metric})[""]


def gather_states_of(metrics: Mapping[str, EMAMetric]) -> dict[str, dict[str, Any]]:
    """:func:`gather_states` of several metrics by name, all gathered with **one** collective (call it on every rank).

    Each value is what :func:`restore_states` takes for that metric.
    """
    mine = {name: _encode(metric.state_dict()) for name, metric in metrics.items()}
    world = _sync.world()
    ranks: list[Any] = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {name: {"world_size": world, "ranks": [rank[name] for rank in ranks]} for name in metrics}


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


def _pooled(metric: EMAMetric, states: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The state of all saved ranks pooled, by the metric's own ``merge_state`` (exact, as a sync pools them)."""
    pooled = metric.clone()
    pooled.reset()
    pooled.load_state_dict(states[0])
    for state in states[1:]:
        try:
            pooled.merge_state(state)
        except ValueError as err:
            raise ValueError(f"{where}: the saved ranks cannot be pooled: {err}") from err
    return pooled.state_dict()  # type: ignore[no-any-return]


def _empty(metric: EMAMetric, ticks: int) -> dict[str, Any]:
    """The state of a metric with no observation that ticked ``ticks`` times (in step with the other ranks)."""
    empty = metric.clone()
    empty.reset()
    state = empty.state_dict()
    state[_EXTRA] = {**state[_EXTRA], "ticks": ticks}
    return state  # type: ignore[no-any-return]


def restore_states(metric: EMAMetric, saved: Any, where: str) -> None:
    """Load this rank's state from :func:`gather_states` data.

    On the number of processes it was saved with, each rank takes its own state back (bit-exact). On another number,
    rank 0 takes the pooled state of all saved ranks and the others start with no observation but the same tick
    count, which continues the same pooled curve. Every saved rank is validated first; on error the metric is unchanged.

    Raises:
        ValueError: If ``saved`` is not what :func:`gather_states` writes for this metric.

    """
    if not isinstance(saved, Mapping) or not isinstance(saved.get("ranks"), list) or not saved["ranks"]:
        raise ValueError(f"{where}: expected a dict with a non-empty list 'ranks', but got {saved!r}")
    states = [_decode(metric, row, f"{where}, rank {r}") for r, row in enumerate(saved["ranks"])]
    ticks = sorted({state[_EXTRA]["ticks"] for state in states})
    if len(ticks) > 1:
        raise ValueError(f"{where}: the saved ranks ticked different numbers of times ({ticks})")
    world, rank = _sync.world(), _sync.rank()
    if len(states) == world:
        metric.load_state_dict(states[rank])
    else:
        metric.load_state_dict(_pooled(metric, states, where) if rank == 0 else _empty(metric, ticks[0]))


def saving_now(args: Any, control: Any) -> bool:
    """Whether the Trainer may write a checkpoint after this step (so every rank's state must be gathered now)."""
    best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
    return bool(control.should_save or (best and control.should_evaluate))


def saved_ranks(state: Any, callback: str, arg: str, value: Any) -> Any:
    """The ``checkpoint_ranks`` that the last ``callback`` (a class name) with ``args[arg] == value`` stored, or None.

    ``state`` is the Trainer's ``TrainerState`` as read from ``trainer_state.json``; several instances of one class
    are told apart by one of their arguments (the logged name or suffix).
    """
    entries = state.stateful_callbacks.get(callback) if state.stateful_callbacks else None
    entries = entries if isinstance(entries, list) else [entries]
    mine = [e for e in entries if isinstance(e, dict) and e.get("args", {}).get(arg) == value]
    return mine[-1].get("attributes", {}).get("checkpoint_ranks") if mine else None


def state_of_step(saved: Any, step: int, where: str, restart: str) -> bool:
    """Whether ``saved`` is the state gathered at ``step``; if not, warn that ``restart`` starts again from it."""
    if isinstance(saved, dict) and saved.get("step") == step:
        return True
    found = "no state" if not isinstance(saved, dict) else f"the state of step {saved.get('step')!r}"
    warnings.warn(
        f"{where}: the checkpoint of step {step} holds {found} (was it saved without this callback, or"
        f" requested after its on_step_end?); {restart} again from this step",
        UserWarning,
        stacklevel=3,
    )
    return False
