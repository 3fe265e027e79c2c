"""``EMAWrapper(nan_strategy=...)``: an update with non-finite sums is dropped whole and reported by ``compute``.

The reference is a float64 loop over the decayed sums of MSE (sum of squared errors, count) in which a dropped
update contributes nothing while its tick still passes, exactly like an empty tick.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torchmetrics
from packaging.version import Version
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAWrapper, _sync
from tests.core.test_ema_behaviour import forbid_host_sync

Tick = list[tuple[list[float], list[float]]]
F64 = torch.float64


def mse_oracle(ticks: list[Tick], alpha: float, adjust: bool = True) -> float:
    """MSE of the decayed sums of the finite updates; an update with a non-finite number is left out."""
    beta = 1.0 - alpha
    sse = n = 0.0
    for t, tick in enumerate(ticks):
        sse, n = beta * sse, beta * n
        for preds, target in tick:
            sq = [(p - q) ** 2 for p, q in zip(preds, target, strict=True)]
            if all(math.isfinite(v) for v in sq):
                sse, n = sse + sum(sq), n + len(sq)
        if t == 0 and not adjust:
            sse, n = sse / alpha, n / alpha
    return sse / n


def stream() -> list[Tick]:
    rng = np.random.default_rng(11)
    ticks: list[Tick] = []
    for t in range(12):
        preds, target = rng.normal(size=3).tolist(), rng.normal(size=3).tolist()
        if t in (2, 7):
            preds[1] = math.nan
        if t == 5:
            target[0] = math.inf
        ticks.append([(preds, target)])
    ticks[9].append(([1.0, math.nan], [0.0, 0.0]))  # a grouped tick: its finite update is kept
    return ticks


def feed(wrapper: EMAWrapper, ticks: list[Tick], via: str = "update") -> None:
    for tick in ticks:
        with wrapper.tick():
            for preds, target in tick:
                getattr(wrapper, via)(torch.tensor(preds, dtype=F64), torch.tensor(target, dtype=F64))


@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("via", ["update", "forward"])
def test_warn_drops_updates_and_matches_the_oracle(via: str, adjust: bool) -> None:
    ticks = stream()
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.3, adjust=adjust)
    feed(wrapper, ticks, via)
    assert wrapper.ticks == len(ticks)
    with pytest.warns(UserWarning, match=r"EMAWrapper: 4 update\(s\) gave non-finite sums"):
        value = float(wrapper.compute())
    assert value == pytest.approx(mse_oracle(ticks, 0.3, adjust), rel=1e-12)
    # once per new batch of dropped updates
    wrapper.update(torch.tensor([0.5]), torch.tensor([0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.compute()
    wrapper.update(torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.warns(UserWarning, match=r"5 update\(s\)"):
        wrapper.compute()


def test_ignore_is_silent_and_error_raises() -> None:
    ticks = stream()
    quiet = EMAWrapper(MeanSquaredError(), alpha=0.3, nan_strategy="ignore")
    feed(quiet, ticks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(quiet.compute()) == pytest.approx(mse_oracle(ticks, 0.3), rel=1e-12)
    strict = EMAWrapper(MeanSquaredError(), alpha=0.3, nan_strategy="error")
    feed(strict, ticks)
    with pytest.raises(RuntimeError, match=r"4 update\(s\) gave non-finite sums.*nan_strategy='error'"):
        strict.compute()
    # the states hold the finite updates only
    assert torch.equal(strict.decayed_sum_squared_error, quiet.decayed_sum_squared_error)
    strict.reset()
    feed(strict, ticks[:2])
    assert float(strict.compute()) == pytest.approx(mse_oracle(ticks[:2], 0.3), rel=1e-12)


def test_disable_lets_a_nan_poison_the_average() -> None:
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.3, nan_strategy="disable")
    feed(wrapper, stream()[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(float(wrapper.compute()))


def test_dropping_makes_no_host_sync() -> None:
    ticks = stream()
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.3)
    with forbid_host_sync():
        for tick in ticks:
            with wrapper.tick():
                for preds, target in tick:
                    wrapper(torch.tensor(preds, dtype=F64), torch.tensor(target, dtype=F64))
    with pytest.warns(UserWarning, match="4 update"):
        assert float(wrapper.compute()) == pytest.approx(mse_oracle(ticks, 0.3), rel=1e-12)


@pytest.mark.skipif(
    Version(torchmetrics.__version__) < Version("1.7"),
    reason="torchmetrics < 1.7 has no SumMetric(nan_strategy='disable'): its own check drops the overflowing sum",
)
def test_an_overflowing_tick_is_dropped_and_an_overflowing_state_raises() -> None:
    total = EMAWrapper(SumMetric(nan_strategy="disable"), alpha=0.5)
    total.update(torch.tensor([1e308, 1e308], dtype=torch.float64))  # the tick's sum overflows: dropped
    total.update(torch.tensor([2.0], dtype=torch.float64))
    with pytest.warns(UserWarning, match=r"1 update\(s\).*overflow"):
        assert float(total.compute()) == 2.0
    state = EMAWrapper(SumMetric(nan_strategy="disable"), alpha=0.2)
    state.update(torch.tensor([1.5e308], dtype=torch.float64))
    state.update(torch.tensor([1.5e308], dtype=torch.float64))  # 0.8 * 1.5e308 + 1.5e308 overflows
    with pytest.raises(OverflowError, match=r"EMAWrapper: the decayed state `decayed_sum_value` overflowed"):
        state.compute()


def test_dropped_count_is_synced_and_saved() -> None:
    ticks = stream()
    rank0, rank1 = EMAWrapper(MeanSquaredError(), alpha=0.3), EMAWrapper(MeanSquaredError(), alpha=0.3)
    feed(rank0, ticks)
    feed(rank1, ticks[:6] + [[([math.nan], [1.0])]] * 6)  # 2 + 6 dropped

    def gather(packed: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        return [packed, _sync.local_vector([rank1]).vector]

    with rank0.sync_context(dist_sync_fn=gather, distributed_available=lambda: True):
        assert int(rank0.nonfinite_updates) == 4 + 8
        buffer = io.BytesIO()
        torch.save(rank0.state_dict(), buffer)
    buffer.seek(0)
    pooled = EMAWrapper(MeanSquaredError(), alpha=0.3, nan_strategy="error")
    pooled.load_state_dict(torch.load(buffer, weights_only=True))
    with pytest.raises(RuntimeError, match=r"12 update\(s\)"):
        pooled.compute()


def test_state_dict_without_the_count_still_loads() -> None:
    saved = EMAWrapper(MeanSquaredError(), alpha=0.3)
    feed(saved, stream()[:2])
    state = saved.state_dict()
    del state["nonfinite_updates"]  # as saved before the count existed
    fresh = EMAWrapper(MeanSquaredError(), alpha=0.3)
    fresh.load_state_dict(state)  # strict
    assert int(fresh.nonfinite_updates) == 0
    assert float(fresh.compute()) == pytest.approx(mse_oracle(stream()[:2], 0.3), rel=1e-12)


@pytest.mark.parametrize(
    ("nan_strategy", "exc", "pattern"),
    [
        (0.0, TypeError, r"`nan_strategy`.*cannot impute.*0\.0"),
        (None, TypeError, r"`nan_strategy`.*None"),
        ("drop", ValueError, r"`nan_strategy`.*'drop'"),
    ],
)
def test_nan_strategy_argument(nan_strategy: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        EMAWrapper(MeanSquaredError(), alpha=0.5, nan_strategy=nan_strategy)


class VectorSum(Metric):
    """Sums vectors entry by entry and counts them (an integer), in place or into new tensors: a large float state."""

    full_state_update = False

    def __init__(self, size: int, replace: bool = False) -> None:
        super().__init__()
        self.replace = replace
        self.add_state("total", torch.zeros(size, dtype=F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor) -> None:
        if self.replace:
            self.total = self.total + x
            self.count = self.count + 1
        else:
            self.total += x
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count


@pytest.mark.parametrize("replace", [False, True], ids=["in place", "new tensors"])
def test_every_kind_of_non_finite_entry_drops_the_whole_update(replace: bool) -> None:
    # NaN, +inf and -inf, alone or together, anywhere in a large state: each such update leaves the decayed sums
    # (the integer count too) exactly as an empty tick would, and the others are added whole (a float64 loop as the
    # reference).
    rng = np.random.default_rng(3)
    size, alpha = 5000, 0.2
    poisons = {3: [(7, math.nan)], 5: [(0, math.inf)], 6: [(size - 1, -math.inf)], 9: [(10, math.inf), (11, -math.inf)]}
    wrapper = EMAWrapper(VectorSum(size, replace), alpha=alpha)
    total, count = np.zeros(size), 0.0
    for t in range(12):
        x = rng.normal(size=size) * 1e3
        for i, v in poisons.get(t, []):
            x[i] = v
        wrapper.update(torch.from_numpy(x))
        total, count = (1 - alpha) * total, (1 - alpha) * count
        if np.isfinite(x).all():
            total, count = total + x, count + 1.0
    assert int(wrapper.nonfinite_updates) == len(poisons)
    assert bool(torch.isfinite(wrapper.decayed_total).all())
    np.testing.assert_allclose(wrapper.decayed_total.numpy(), total, rtol=1e-12, atol=1e-9)
    assert float(wrapper.decayed_count) == pytest.approx(count, rel=1e-15)
    with pytest.warns(UserWarning, match=rf"{len(poisons)} update\(s\)"):
        value = wrapper.compute()
    np.testing.assert_allclose(value.numpy(), total / count, rtol=1e-12, atol=1e-12)


class ReshapedSum(Metric):
    """Holds its sum in shape ``(1,)`` but puts a 0-d sum there in ``update``: a state of another shape."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(1, dtype=F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=F64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor) -> None:
        self.total = (self.total + x.sum()).reshape(())
        self.count = self.count + x.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def test_sums_of_another_shape_are_checked_and_dropped_too() -> None:
    alpha = 0.4
    batches = [[1.0, 2.0], [math.nan, 1.0], [3.0], [-math.inf], [0.5, 0.25, math.inf], [4.0, -1.0]]
    wrapper = EMAWrapper(ReshapedSum(), alpha=alpha)
    total = count = 0.0
    for batch in batches:
        wrapper.update(torch.tensor(batch, dtype=F64))
        total, count = (1 - alpha) * total, (1 - alpha) * count
        if all(math.isfinite(v) for v in batch):
            total, count = total + math.fsum(batch), count + len(batch)
    assert int(wrapper.nonfinite_updates) == 3
    with pytest.warns(UserWarning, match=r"3 update\(s\)"):
        assert float(wrapper.compute()) == pytest.approx(total / count, rel=1e-12)


class WeightedCount(Metric):
    """An integer count, but a float sum there when the update is weighted (as in the plain metric)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        self.total += x.sum() if weight is None else (x * weight).sum()
        self.count = self.count + (x.numel() if weight is None else weight.sum())

    def compute(self) -> torch.Tensor:
        return self.total / self.count


@pytest.mark.parametrize("nan_strategy", ["warn", "disable"])
def test_integer_counts_and_float_sums_put_in_their_place(nan_strategy: str) -> None:
    # The count stays an integer in unweighted updates and becomes a float sum in weighted ones; either way the
    # decayed states follow a float64 loop, and a dropped update leaves out its count too.
    alpha, drop = 0.25, nan_strategy != "disable"
    batches: list[tuple[list[float], list[float] | None]] = [
        ([1.0, 2.0, 4.0], None),
        ([3.0, 1.0], [0.5, 2.5]),
        ([math.nan if drop else 5.0, 1.0], None),
        ([2.0], [math.inf if drop else 1.5]),
        ([0.5, 0.25], None),
        ([6.0, 1.0], [1.0, 0.25]),
    ]
    wrapper = EMAWrapper(WeightedCount(), alpha=alpha, nan_strategy=nan_strategy)
    total = count = 0.0
    for x, w in batches:
        weight = None if w is None else torch.tensor(w, dtype=F64)
        wrapper.update(torch.tensor(x, dtype=F64), weight)
        weights = [1.0] * len(x) if w is None else w
        total, count = (1 - alpha) * total, (1 - alpha) * count
        if all(math.isfinite(v) for v in x + weights):
            total += math.fsum(a * b for a, b in zip(x, weights, strict=True))
            count += math.fsum(weights)
    assert int(wrapper.nonfinite_updates) == (2 if drop else 0)
    assert float(wrapper.decayed_total) == pytest.approx(total, rel=1e-14)
    assert float(wrapper.decayed_count) == pytest.approx(count, rel=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert float(wrapper.compute()) == pytest.approx(total / count, rel=1e-12)
