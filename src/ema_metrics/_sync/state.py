"""What a sync reads of a metric (:class:`SyncState`, through :class:`Poolable`) and what it returns (:class:`Pooled`).

Also what both protocols derive from a :class:`SyncState` alone: its :func:`fingerprint` (class, configuration and
state layout, as a 48-bit hash exact in float64), its states as one flat float64 vector (:func:`flat`) and back
(:func:`split`), and the :func:`probe` of a large state (its largest magnitude and its counts).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ema_metrics.utilities import decay

__all__ = [
    "Poolable",
    "Pooled",
    "SyncState",
    "fingerprint",
    "flat",
    "flat_parts",
    "hash_of",
    "probe",
    "split",
    "states_of",
]

_F64 = torch.float64


@dataclass
class SyncState:
    """What a sync reads of one metric (its states are the metric's own tensors, not copies).

    Attributes:
        kind: the metric's class (qualified name); only metrics of one kind pool.
        config: what else must agree between ranks (alpha, adjust, nan_strategy, ...).
        states: the decayed states by name, in sync order.
        masks: for each state, which entries decay (``None``: all of them; the others are counters, never rescaled).
        scale: the power-of-two exponent the decayed entries are stored at (a 0-d float64 tensor, at most 0).
        ticks: completed ticks.
        replica: whether the states are the pooled state of all ranks, identical on each (counted once).
        counters: Python-side counters, summed across ranks.
        count_positions: where the never-decayed entries (counts kept in the states) are in the flattened states.

    """

    kind: str
    config: tuple[Any, ...]
    states: dict[str, Tensor]
    masks: list[Tensor | None]
    scale: Tensor
    ticks: int
    replica: bool
    counters: dict[str, int]
    count_positions: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """How many values the decayed states hold together."""
        return sum(s.numel() for s in self.states.values())

    def flat_mask(self, device: torch.device) -> Tensor:
        """Which of the flattened values decay (the others are counters, never rescaled)."""
        parts = [
            torch.ones(s.numel(), dtype=torch.bool, device=device) if m is None else m.reshape(-1).to(device)
            for s, m in zip(self.states.values(), self.masks, strict=True)
        ]
        return torch.cat(parts)

    def effective_scale(self, states: Sequence[Tensor] | None = None, scale: Tensor | None = None) -> Tensor:
        """The exponent ``states`` (default: the metric's) are at: 0 once data arrived, -inf when empty."""
        values = list(self.states.values()) if states is None else list(states)
        return decay.effective_scale(values, self.masks, self.scale if scale is None else scale)


class Poolable(Protocol):
    """What the sync needs of a metric: its :class:`SyncState`."""

    def sync_state(self) -> SyncState:
        """The metric's states and bookkeeping, as the sync reads them."""
        ...


@dataclass
class Pooled:
    """The pooled state of one metric: decayed states (mantissas at ``scale``), tick count and summed counters."""

    states: dict[str, Tensor]
    scale: Tensor
    ticks: int
    counters: dict[str, int]
    ranks: list[dict[str, Tensor]] | None = None  # each rank's own states (at scale 0 or its own), when inline
    #: What the sync's one read-back tells the host about the pooled states, so that the checks of ``compute`` need
    #: no read of their own: the flattened states themselves (small states), or whether they are all finite
    #: (``None``: not known) and their never-decayed entries (``count_positions``) summed.
    values: list[float] | None = None
    finite: bool | None = None
    counts: list[float] | None = None


def states_of(metrics: Sequence[Poolable] | Sequence[SyncState]) -> list[SyncState]:
    return [m if isinstance(m, SyncState) else m.sync_state() for m in metrics]


def fingerprint(metric: Poolable | SyncState) -> float:
    """A 48-bit hash (exact in float64) of what must agree between ranks: class, configuration, state layout."""
    s = metric if isinstance(metric, SyncState) else metric.sync_state()
    layout = tuple((n, tuple(t.shape)) for n, t in s.states.items())
    return hash_of((s.kind, s.config, layout, tuple(s.counters)))


def hash_of(obj: tuple[object, ...]) -> float:
    """A 48-bit hash of ``repr(obj)``, exact in float64 (so it travels in a float64 collective); memoized."""
    try:
        return _memo(obj)
    except TypeError:  # an unhashable part (a subclass's configuration, say): no memo
        return _digest(obj)


def _digest(obj: object) -> float:
    return float(int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=6).digest(), "big"))


_memo = functools.lru_cache(maxsize=1024)(_digest)


def flat_parts(states: Sequence[SyncState]) -> list[Tensor]:
    """The decayed states as flat float64 tensors (views where they are float64 already), in sync order."""
    return [t.reshape(-1).to(_F64) for s in states for t in s.states.values()]


def flat(*states: SyncState) -> Tensor:
    """The decayed states, flattened into one fresh float64 vector (one copy)."""
    return torch.cat(flat_parts(states))


def split(state: SyncState, values: Tensor) -> dict[str, Tensor]:
    """A flat vector of a metric's states as named states of their own shapes (views, on the states' device)."""
    out: dict[str, Tensor] = {}
    offset = 0
    device = state.scale.device  # the metric's
    if values.device != device:
        values = values.to(device)
    for name, local in state.states.items():
        # a view of the fresh buffer (no copy); torch.save and pickling store a shared buffer once
        k = local.numel()
        out[name] = values[offset : offset + k].view(local.shape)
        offset += k
    return out


def probe(s: SyncState) -> Tensor:
    """What the host must learn of a large state in the first collective: its largest magnitude and its counts.

    With every rank's largest magnitude (NaN or inf if it holds one) the host knows without another read-back that the
    pooled states are finite when the magnitudes add up to less than ``2 ** 1023``; the never-decayed entries (counts
    such as dropped updates) add up exactly.
    """
    values = [t.reshape(-1).to(_F64) for t in s.states.values()]
    peak = decay.peak_magnitude(values, [None] * len(values)).reshape(1)  # every entry, counts included
    if not s.count_positions:
        return peak
    # the counts as views of their states (no copy of a large state to read a few entries)
    return torch.cat([peak, *(values[i][a:b] for i, a, b in _runs(s.count_positions, [v.numel() for v in values]))])


def _runs(positions: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``positions`` in states of ``sizes`` flattened together, as runs ``(state, start, stop)``, in their order.

    Example:
        >>> _runs([4, 5, 1, 6], [2, 3, 2])  # last of the 2nd state, 1st of the 3rd, last of the 1st, last of the 3rd
        [(1, 2, 3), (2, 0, 1), (0, 1, 2), (2, 1, 2)]

    """
    ends = list(itertools.accumulate(sizes))
    runs: list[tuple[int, int, int]] = []
    for p in positions:
        i = bisect.bisect_right(ends, p)
        local = p - (ends[i - 1] if i else 0)
        if runs and runs[-1][0] == i and runs[-1][2] == local:
            runs[-1] = (i, runs[-1][1], local + 1)
        else:
            runs.append((i, local, local + 1))
    return runs
