"""``EMAMetric`` across gloo processes: the synced value is the float64 EMA of the data pooled over all ranks.

Each world size runs in ONE spawn: the worker feeds several metrics from a plan made here, counts the collectives
it issues, and returns what it saw; the parent compares with :func:`tests.test_ema_reference.ema_oracle` over the
pooled data.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ema_metrics import EMAMetric, synced_values
from tests.ddp_utils import run_ddp

# The oracle module imports pandas and hypothesis: the parent imports it inside the tests, so that the spawned
# workers (which import this module to find their function) start faster.

# An update is (values, weights): float64 arrays, or a float weight; "empty" marks a rank without data.
Update = tuple[Any, Any]

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)

SINGLE_METRICS: dict[str, dict[str, Any]] = {
    "alpha": {"alpha": 0.3},
    "span_no_adjust": {"span": 5, "adjust": False},
    "forward_sync": {"half_life": 3.0},
    "forward_step": {"com": 2.0, "dist_sync_on_step": True},
    "forward_local": {"alpha": 0.3},
}
GROUPED_METRICS: dict[str, dict[str, Any]] = {
    "grouped": {"half_life": 2.0},
    "grouped_no_adjust": {"half_life": 2.0, "adjust": False},
}


def _alpha(kwargs: dict[str, Any]) -> float:
    from tests.core.test_ema_reference import pandas_alpha

    ((name, value),) = ((k, v) for k, v in kwargs.items() if k in ("alpha", "com", "span", "half_life"))
    return pandas_alpha(name, float(value))


class CollectiveCounter:
    """Counts the top-level calls of every collective of ``torch.distributed`` (nested calls are not counted)."""

    def __init__(self) -> None:
        self.count = 0
        self._depth = 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.count += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _to_torch(update: Update) -> tuple[Any, Any]:
    values, weight = update
    if isinstance(values, str):  # a rank without data this tick
        return (torch.empty(0), 1.0) if values == "empty-tensor" else (0.0, 0)
    x = torch.from_numpy(values)
    return x, (torch.from_numpy(weight) if isinstance(weight, np.ndarray) else weight)


def _ddp_worker(
    rank: int, world_size: int, single: list[list[Update]], grouped: list[list[list[Update]]]
) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*before the ``update``")  # ranks without data on the first ticks
    counter = CollectiveCounter()
    out: dict[str, Any] = defaultdict(list)
    single_metrics = {key: EMAMetric(**kwargs) for key, kwargs in SINGLE_METRICS.items()}
    single_metrics["forward_sync"].sync_on_forward = True

    for tick in single:
        value, weight = _to_torch(tick[rank])
        for key in ("alpha", "span_no_adjust"):
            single_metrics[key].update(value, weight=weight)
        for key in ("forward_sync", "forward_step", "forward_local"):
            before = counter.count
            out[key].append(float(single_metrics[key](value, weight=weight)))
            out[f"{key}_collectives"].append(counter.count - before)
        for key in ("alpha", "span_no_adjust"):
            local = single_metrics[key].sums.clone()
            before = counter.count
            out[key].append(float(single_metrics[key].compute()))
            out[f"{key}_collectives"].append(counter.count - before)
            out[f"{key}_local_kept"].append(torch.equal(single_metrics[key].sums, local))

    pair = [single_metrics["alpha"], single_metrics["span_no_adjust"]]
    local = [m.sums.clone() for m in pair]
    before = counter.count
    out["synced_values"] = [float(v) for v in synced_values(pair)]
    out["synced_values_collectives"] = counter.count - before
    out["synced_values_local_kept"] = all(torch.equal(m.sums, s) for m, s in zip(pair, local, strict=True))

    grouped_metrics = {key: EMAMetric(**kwargs) for key, kwargs in GROUPED_METRICS.items()}
    for tick in grouped:
        for m in grouped_metrics.values():
            with m.tick():
                for update in tick[rank]:
                    value, weight = _to_torch(update)
                    m.update(value, weight=weight)
        for key, m in grouped_metrics.items():
            out[key].append(float(m.compute()))

    # Rank 0 ticks once more than the others: every rank must refuse to add the sums, and keep its own state.
    mismatched = EMAMetric(alpha=0.5)
    for _ in range(2 if rank == 0 else 1):
        mismatched.update(float(rank + 1))
    state, ticks = mismatched.sums.clone(), mismatched.ticks
    try:
        mismatched.compute()
        out["mismatch_error"] = None
    except RuntimeError as err:
        out["mismatch_error"] = str(err)
    out["mismatch_state_kept"] = torch.equal(mismatched.sums, state) and mismatched.ticks == ticks
    return dict(out)


def _random_update(rng: np.random.Generator) -> Update:
    kind = int(rng.integers(0, 6))
    n = int(rng.integers(1, 6))
    values = rng.normal(3.0, 10.0, size=n)
    if kind == 0:
        return ("empty-tensor", 1.0)
    if kind == 1:
        return ("no-data", 0.0)
    if kind == 2:  # per-element weights, some of them zero
        weights = rng.uniform(0.0, 4.0, size=n)
        weights[rng.random(n) < 0.3] = 0.0
        return (values, weights)
    if kind == 3:  # a zero-weight rank
        return (values, np.zeros(n))
    if kind == 4:
        return (values, float(rng.integers(0, 9)))
    return (values[:1].reshape(()), rng.uniform(0.5, 2.0, size=()).astype(np.float64))


def _make_plans(world_size: int, seed: int) -> tuple[list[list[Update]], list[list[list[Update]]]]:
    rng = np.random.default_rng([world_size, seed])
    single = [[_random_update(rng) for _ in range(world_size)] for _ in range(14)]
    # the last rank holds data on the first tick, so the pooled first tick always seeds adjust=False
    single[0][-1] = (rng.normal(size=3), 1.0)
    grouped = [
        [[_random_update(rng) for _ in range(int(rng.integers(0, 4)))] for _ in range(world_size)] for _ in range(10)
    ]
    return single, grouped


def _pooled(updates: list[Update]) -> list[tuple[Any, Any]]:
    return [(np.asarray(v), np.asarray(w)) for v, w in updates if not isinstance(v, str)]


@pytest.mark.ddp
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_synced_ema_equals_pooled_oracle(world_size: int) -> None:
    from tests.core.test_ema_reference import ATOL, RTOL, ema_oracle

    single, grouped = _make_plans(world_size, seed=0)
    results = run_ddp(_ddp_worker, world_size, single, grouped)
    single_ticks = [_pooled(tick) for tick in single]
    grouped_ticks = [[u for rank_updates in tick for u in _pooled(rank_updates)] for tick in grouped]

    for rank, res in enumerate(results):
        for key in ("alpha", "span_no_adjust", "forward_sync", "forward_step"):
            kwargs = SINGLE_METRICS[key]
            expected = ema_oracle(single_ticks, _alpha(kwargs), kwargs.get("adjust", True))
            np.testing.assert_allclose(res[key], expected, rtol=RTOL, atol=ATOL, err_msg=f"{key} on rank {rank}")
            # one collective per compute() / per synced forward, and it leaves the local state alone
            assert res[f"{key}_collectives"] == [1] * len(single), key
        for key in ("alpha", "span_no_adjust"):
            assert all(res[f"{key}_local_kept"]), key
        # a forward without sync is the rank's own EMA
        local = ema_oracle([_pooled([tick[rank]]) for tick in single], 0.3)
        np.testing.assert_allclose(res["forward_local"], local, rtol=RTOL, atol=ATOL, equal_nan=True)
        assert res["forward_local_collectives"] == [0] * len(single)

        np.testing.assert_allclose(res["synced_values"], [res["alpha"][-1], res["span_no_adjust"][-1]], rtol=RTOL)
        assert res["synced_values_collectives"] == 1
        assert res["synced_values_local_kept"]

        for key, kwargs in GROUPED_METRICS.items():
            expected = ema_oracle(grouped_ticks, _alpha(kwargs), kwargs.get("adjust", True))
            np.testing.assert_allclose(res[key], expected, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=key)

        assert res["mismatch_error"] is not None, f"rank {rank} accepted mismatched tick counts"
        assert "ticked different numbers of times" in res["mismatch_error"]
        assert res["mismatch_state_kept"], f"rank {rank}: a failed sync changed the local state"

    # the synced values are the same on every rank
    for key in ("alpha", "span_no_adjust", "forward_sync", "forward_step", "grouped", "grouped_no_adjust"):
        for res in results[1:]:
            np.testing.assert_array_equal(res[key], results[0][key], err_msg=key)


def test_synced_values_without_process_group_is_local() -> None:
    from tests.core.test_ema_reference import ATOL, RTOL, ema_oracle

    a, b = EMAMetric(alpha=0.5), EMAMetric(span=4, adjust=False)
    values = [1.0, -2.0, 4.0]
    for v in values:
        a.update(v)
        b.update(v)
    got = [float(v) for v in synced_values([a, b])]
    expected = [
        ema_oracle([[(v, 1.0)] for v in values], alpha, adjust)[-1] for alpha, adjust in ((0.5, True), (0.4, False))
    ]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert synced_values([]) == []
