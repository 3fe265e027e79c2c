"""What torchmetrics and torch expect of a metric whose states are decayed sums: compute groups, dtype moves, pickling.

:class:`MetricContract` is mixed into :class:`~ema_metrics._base.DecayedSumMetric` only; its methods reach
torchmetrics' ``Metric`` through ``super()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MetricContract"]

_STATE_DTYPE = torch.float64
_GROUP_TAG = "instance_tag"
_SCALE = "scale"


def _follow_device(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device=device)


class MetricContract(Metric):
    """The compute-group guard, the dtype moves and the pickling of a ``DecayedSumMetric``."""

    _factor_cache: dict[tuple[str, float], Tensor]  # set by DecayedSumMetric

    # ------------------------------------------------------------------ compute groups
    def _add_group_tag(self) -> None:
        """Register the first state: a NaN, so that this metric is never merged into a compute group.

        torchmetrics' ``MetricCollection`` merges metrics whose states are all ``allclose`` after the first update into
        one compute group: they would share one state tensor but not the tick count, and a tick would decay it once per
        member (and two EMAs of different alpha hold equal sums after one tick). ``allclose`` is False for NaN in
        every floating dtype, so no clone, copy, dtype move, loaded state dict or number of instances can make two EMA
        metrics equal. Being registered first, it ends the comparison at once. It is never synced, decayed, saved,
        loaded or converted to another dtype (it only follows the device).
        """
        self.add_state(_GROUP_TAG, torch.tensor(math.nan, dtype=_STATE_DTYPE), persistent=False)

    def persistent(self, mode: bool = False) -> None:
        """Change whether the states are saved in ``state_dict`` (the compute-group tag never is)."""
        super().persistent(mode)
        self._persistent[_GROUP_TAG] = False

    def _apply(self, fn: Any, exclude_state: Any = "") -> torch.nn.Module:
        """Apply ``fn`` as torchmetrics does, except to what must stay float64 and only follows the device.

        The decayed states and the scale exponent accumulate in float64 whatever ``set_dtype`` or ``.to(dtype)`` asks
        for (a round trip through half precision would round them), the group tag keeps its NaN, and the cached
        ``compute``/``forward`` values are not rounded either (torchmetrics converts them with ``fn``).
        """
        excluded = (exclude_state,) if isinstance(exclude_state, str) else tuple(exclude_state)
        cached = {key: self.__dict__.get(key) for key in ("_computed", "_forward_cache")}
        own = (*self.__dict__.get("_decay_masks", {}), _SCALE, _GROUP_TAG)
        this = super()._apply(fn, (*excluded, *own))
        if isinstance(this, MetricContract):
            for key, value in cached.items():
                if value is not None:
                    setattr(this, key, apply_to_collection(value, Tensor, _follow_device, this.device))
            for name in own:
                if name in excluded or name not in this._defaults:
                    continue
                if name == _GROUP_TAG:
                    value = torch.tensor(math.nan, dtype=_STATE_DTYPE, device=this.device)
                else:
                    value = getattr(this, name).to(device=this.device)
                setattr(this, name, value)
                default = this._defaults[name]
                if isinstance(default, Tensor):
                    this._defaults[name] = default.to(device=this.device)
            this._factor_cache.clear()
        return this

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the per-device caches (they are rebuilt on first use)."""
        state = super().__getstate__()
        state.pop("_hot", None)
        state["_factor_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle with private copies of the states.

        ``torch.multiprocessing`` (``ddp_spawn``, ``mp.spawn``) unpickles tensors into memory *shared* with the
        parent and the sibling processes. The states are updated in place, so each process must own its copy.
        """
        super().__setstate__(state)
        self.__dict__.setdefault("_hot", None)
        for name, default in self._defaults.items():
            if isinstance(default, Tensor):
                self._defaults[name] = default.clone()
                setattr(self, name, getattr(self, name).clone())
