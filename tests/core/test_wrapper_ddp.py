"""EMAWrapper on 2 and 3 gloo ranks: the synced value is the oracle over the pooled data, with one collective.

Each rank gets its own random batches (sizes differ between ranks, and a rank sometimes has no data for a tick and
closes an empty tick). The parent computes the float64 numpy oracle of the decayed statistics of all ranks pooled,
then the metric's formula (see ``tests/core/test_wrapper.py``). One process group is spawned per world size; every
check runs inside it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ema_metrics import EMAMetric, EMAWrapper, synced_values
from tests.core.test_wrapper import KINDS, oracle_values
from tests.ddp_utils import run_ddp

pytestmark = pytest.mark.ddp

CASES: list[tuple[str, bool, dict[str, Any]]] = [
    ("binary_accuracy", True, {"half_life": 3.0}),
    ("binary_f1", False, {"span": 4.0}),
    ("multiclass_micro", False, {"alpha": 0.3}),
    ("multiclass_macro", True, {"half_life": 1.5}),
    ("mse", False, {"half_life": 5.0}),
    ("mae", True, {"com": 2.0}),
    ("sum", True, {"alpha": 0.2}),
    ("mean", False, {"half_life": 2.0}),
]
N_TICKS = 9
COLLECTIVES = (
    "all_gather",
    "all_reduce",
    "all_gather_into_tensor",
    "all_gather_single",
    "broadcast",
    "all_gather_object",
    "barrier",
)


def make_streams(world_size: int, seed: int) -> dict[str, list[list[list[Any]]]]:
    """Per case, per tick, per rank: the micro-batches of that rank (an empty list: no data this tick)."""
    rng = np.random.default_rng([seed, world_size])
    streams = {}
    for name, _, _ in CASES:
        kind = KINDS[name]
        ticks = []
        for t in range(N_TICKS):
            per_rank = []
            for rank in range(world_size):
                n_micro = 1 if t == 0 and rank == 0 else int(rng.choice([0, 1, 1, 2]))
                per_rank.append([kind.draw(rng, int(rng.integers(1, 4 + 4 * rank))) for _ in range(n_micro)])
            ticks.append(per_rank)
        streams[name] = ticks
    return streams


def _count_collectives(counts: dict[str, int]) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, functools.wraps(original)(counted))


def _worker(rank: int, world_size: int, streams: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    _count_collectives(counts)

    def collectives(fn: Callable[[], Any]) -> tuple[Any, int]:
        counts.clear()
        out = fn()
        return out, sum(counts.values())

    results: dict[str, Any] = {}
    for name, adjust, kw in CASES:
        kind = KINDS[name]
        wrapper = EMAWrapper(kind.make(), adjust=adjust, **kw)
        ema = EMAMetric(adjust=adjust, **kw) if name == "mean" else None
        mids: list[float] = []
        n_coll: list[int] = []
        for t, per_rank in enumerate(streams[name]):
            batches = per_rank[rank]
            if len(batches) == 1 and t % 2:
                wrapper(*kind.to_args(batches[0]))  # forward outside a group: one tick
                if ema is not None:
                    ema(torch.from_numpy(batches[0][0]), weight=torch.from_numpy(batches[0][1]))
            else:
                with wrapper.tick():
                    for batch in batches:
                        wrapper.update(*kind.to_args(batch))
                if ema is not None:
                    with ema.tick():
                        for values, weights in batches:
                            ema.update(torch.from_numpy(values), weight=torch.from_numpy(weights))
            if t >= 2:  # compute mid-stream: the local states must be left untouched for the next ticks
                value, n = collectives(wrapper.compute)
                mids.append(float(value))
                n_coll.append(n)
        out: dict[str, Any] = {"values": mids, "collectives": n_coll, "ticks": wrapper.ticks}
        if ema is not None:
            pair, n = collectives(functools.partial(synced_values, [wrapper, ema]))
            out["synced_values"] = [float(v) for v in pair]
            out["synced_values_collectives"] = n
        if name == "binary_accuracy":  # forward with sync_on_forward: the synced value, with one collective
            wrapper.sync_on_forward = True
            batch = kind.draw(np.random.default_rng([99, rank]), 3 + rank)
            value, n = collectives(functools.partial(wrapper, *kind.to_args(batch)))
            out["forward_synced"] = float(value)
            out["forward_collectives"] = n
        results[name] = out
    return results


def _pooled(ticks: list[list[list[Any]]]) -> list[list[Any]]:
    return [[batch for batches in per_rank for batch in batches] for per_rank in ticks]


@pytest.mark.parametrize("world_size", [2, 3])
def test_synced_compute_is_the_pooled_oracle_with_one_collective(world_size: int) -> None:
    streams = make_streams(world_size, seed=5)
    results = run_ddp(_worker, world_size, streams)
    for name, adjust, kw in CASES:
        kind = KINDS[name]
        alpha = EMAWrapper(kind.make(), **kw).alpha
        pooled = _pooled(streams[name])
        expected = oracle_values(kind, pooled, alpha, adjust)[2:]
        for rank, result in enumerate(results):
            got = result[name]
            assert got["ticks"] == N_TICKS
            assert got["collectives"] == [1] * len(expected), (name, rank)
            assert np.allclose(got["values"], expected, rtol=1e-9, atol=1e-9), (name, rank, got["values"], expected)
            if name == "mean":
                assert got["synced_values_collectives"] == 1
                wrapped, ema = got["synced_values"]
                assert math.isclose(wrapped, expected[-1], rel_tol=1e-9, abs_tol=1e-9)
                assert math.isclose(ema, expected[-1], rel_tol=1e-9, abs_tol=1e-9)
                assert math.isclose(wrapped, ema, rel_tol=1e-12, abs_tol=1e-12)
            if name == "binary_accuracy":
                extra = [[kind.draw(np.random.default_rng([99, r]), 3 + r) for r in range(world_size)]]
                want = oracle_values(kind, [*pooled, *extra], alpha, adjust)[-1]
                assert got["forward_collectives"] == 1
                assert math.isclose(got["forward_synced"], want, rel_tol=1e-9, abs_tol=1e-9)
