"""The torchmetrics ``Metric`` contract: dtype moves, persistence, state-dict errors, plotting and ``compute``.

Values are checked against the float64 loop of ``tests.test_ema_reference`` and a float64 MSE written here; error
texts against what ``torch.nn.Module.load_state_dict`` itself says; the ``compute`` wrapper (warning, cache, sync and
its undoing, on 1 and 2 gloo processes) against torchmetrics' own wrapper around the same ``compute``.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torchmetrics import Metric
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper, _sync, synced_values
from tests.core.test_ema_reference import ATOL, RTOL, ema_oracle

VALUES = [1.0 / 3.0, 2.0 / 7.0, 5.0 / 11.0]


def _mse_oracle(pairs: list[tuple[float, float]], alpha: float) -> float:
    beta = 1.0 - alpha
    sse = n = 0.0
    for p, t in pairs:
        sse = beta * sse + (p - t) ** 2
        n = beta * n + 1.0
    return sse / n


def _fed_ema() -> tuple[Metric, float]:
    metric = EMAMetric(alpha=0.3)
    for v in VALUES:
        metric.update(v)
    return metric, float(ema_oracle([[(v, 1.0)] for v in VALUES], 0.3)[-1])


def _fed_wrapper() -> tuple[Metric, float]:
    metric = EMAWrapper(MeanSquaredError(), alpha=0.3)
    pairs = [(v, v * v) for v in VALUES]
    for p, t in pairs:
        metric.update(torch.tensor([p], dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
    return metric, _mse_oracle(pairs, 0.3)


FED = {"EMAMetric": _fed_ema, "EMAWrapper": _fed_wrapper}
MOVES: dict[str, Callable[[Metric], Any]] = {
    "half": lambda m: m.half(),
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "to-float16": lambda m: m.to(torch.float16),
    "set_dtype-bfloat16": lambda m: m.set_dtype(torch.bfloat16),
    "set_dtype-half": lambda m: m.set_dtype(torch.half),
    "float": lambda m: m.float(),
}


# ----------------------------------------------------------------------------------------------- dtype moves


@pytest.mark.parametrize("move", list(MOVES.values()), ids=list(MOVES))
@pytest.mark.parametrize("fed", list(FED.values()), ids=list(FED))
def test_dtype_move_never_rounds_the_cached_value(fed: Callable[[], tuple[Metric, float]], move: Any) -> None:
    metric, expected = fed()
    cached = metric.compute()  # torchmetrics keeps it in `_computed`
    assert cached.dtype == torch.float64
    move(metric)
    after = metric.compute()
    assert after.dtype == torch.float64
    assert float(after) == float(cached)
    np.testing.assert_allclose(float(after), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("move", list(MOVES.values()), ids=list(MOVES))
def test_dtype_move_keeps_the_forward_value_unrounded(move: Any) -> None:
    metric = EMAMetric(alpha=0.3)
    out = metric(1.0 / 3.0)
    move(metric)
    assert metric._forward_cache is not None
    assert metric._forward_cache.dtype == torch.float64
    assert float(metric._forward_cache) == float(out) == 1.0 / 3.0


# ----------------------------------------------------------------------------------------------- persistence


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def _with_nan() -> EMAMetric:
    metric = EMAMetric(alpha=0.5)
    for v in (1.0, math.nan, 3.0, math.inf):
        metric.update(v)
    return metric


@pytest.mark.parametrize("kind", ["EMAMetric", "EMAWrapper"])
def test_not_persistent_saves_nothing_and_loads_fresh(kind: str) -> None:
    used = _with_nan() if kind == "EMAMetric" else FED["EMAWrapper"]()[0]
    used.persistent(False)
    state = _round_trip(used.state_dict())
    assert state == {}
    fresh = EMAMetric(alpha=0.5) if kind == "EMAMetric" else EMAWrapper(MeanSquaredError(), alpha=0.5)
    fresh.persistent(False)
    fresh.load_state_dict(state)  # strict: nothing is expected
    assert fresh.ticks == 0
    if isinstance(fresh, EMAMetric):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no phantom non-finite values
            for v in (2.0, 6.0):
                fresh.update(v)
            value = float(fresh.compute())
        np.testing.assert_allclose(value, ema_oracle([[(2.0, 1.0)], [(6.0, 1.0)]], 0.5)[-1], rtol=RTOL, atol=ATOL)


def test_counters_without_states_are_not_loaded() -> None:
    # an older `persistent(False)` state dict carried the counters alone
    counters_only = {"_extra_state": {"format": 1, "ticks": 4, "alpha": 0.5, "numel": 4}}
    fresh = EMAMetric(alpha=0.5)
    result = fresh.load_state_dict(counters_only, strict=False)
    assert result.missing_keys == ["sums"]
    assert fresh.ticks == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.update(3.0)
        assert float(fresh.compute()) == 3.0


def test_state_dict_taken_while_synced_reloads_consistent_counters() -> None:
    # A two-rank sync in one process: the "other rank" is a second metric whose packed state the sync gathers.
    rank0, rank1 = EMAMetric(alpha=0.4), EMAMetric(alpha=0.4)
    data0 = [[1.0, math.nan], [2.0, 5.0], [math.inf, 4.0]]
    data1 = [[3.0, 3.0], [math.nan, math.nan], [0.5, 1.5]]
    for metric, data in ((rank0, data0), (rank1, data1)):
        for tick_values in data:
            metric.update(torch.tensor(tick_values))

    def gather(packed: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        return [packed, _sync.local_vector([rank1]).vector]

    with rank0.sync_context(dist_sync_fn=gather, distributed_available=lambda: True):
        state = _round_trip(rank0.state_dict())
    assert not rank0._is_synced
    pooled = EMAMetric(alpha=0.4)
    pooled.load_state_dict(state)
    assert pooled.ticks == 3
    ticks = [[(a, 1.0), (b, 1.0)] for a, b in zip(data0, data1, strict=True)]
    with pytest.warns(UserWarning, match="4 non-finite"):
        value = float(pooled.compute())
    np.testing.assert_allclose(value, ema_oracle(ticks, 0.4)[-1], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- bad state dicts


def _torch_error(shape_saved: tuple[int, ...], shape_now: tuple[int, ...], name: str) -> str:
    """What torch itself says when a buffer of the wrong shape is loaded."""
    module = torch.nn.Module()
    module.register_buffer(name, torch.zeros(shape_now))
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict({name: torch.zeros(shape_saved)})
    return str(info.value).split("\n", 1)[1]  # without the line naming the class


def _assert_unchanged(metric: Metric, before: dict[str, torch.Tensor], ticks: int) -> None:
    for name, value in before.items():
        assert torch.equal(getattr(metric, name), value)
    assert metric.ticks == ticks  # type: ignore[attr-defined]


def test_wrong_shape_is_reported_as_torch_does() -> None:
    metric, _ = _fed_ema()
    before, ticks = {"sums": metric.sums.clone()}, metric.ticks
    state = metric.state_dict()
    state["sums"] = torch.zeros(3, dtype=torch.float64)
    for strict in (True, False):
        with pytest.raises(RuntimeError) as info:
            metric.load_state_dict(state, strict=strict)
        assert str(info.value).startswith("Error(s) in loading state_dict for EMAMetric:")
        assert str(info.value).endswith(_torch_error((3,), (4,), "sums"))
        _assert_unchanged(metric, before, ticks)


def test_wrapper_of_another_class_count_is_reported_per_state() -> None:
    from torchmetrics.classification import MulticlassAccuracy

    saved = EMAWrapper(MulticlassAccuracy(num_classes=3, average="macro"), alpha=0.5)
    saved.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
    target = EMAWrapper(MulticlassAccuracy(num_classes=4, average="macro"), alpha=0.5)
    target.update(torch.tensor([3, 1]), torch.tensor([3, 1]))
    before = {name: getattr(target, name).clone() for name in target._state_names()}
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(_round_trip(saved.state_dict()))
    for name in target._names.values():  # every per-class count (not the scalar count of dropped updates)
        assert f"size mismatch for {name}: copying a param with shape torch.Size([3])" in str(info.value)
    _assert_unchanged(target, before, 1)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ({"sums": [1.0, 1.0, 1.0, 0.0]}, r'parameter named "sums".*received <class \'list\'>'),
        ({"sums": torch.zeros(4, dtype=torch.complex64)}, r'"sums".*complex64'),
        ({"_extra_state": {"ticks": -1, "numel": 1}}, r"`ticks`.*non-negative integer.*-1"),
        ({"_extra_state": {"ticks": 1.5, "numel": 1}}, r"`ticks`.*1\.5"),
        ({"_extra_state": {"ticks": 2, "numel": "3"}}, r"`numel`.*'3'"),
        ({"_extra_state": [2, 3]}, r"_extra_state.*EMAMetric.*dict.*\[2, 3\]"),
    ],
)
def test_damaged_entries_are_reported_and_leave_the_metric(edit: dict[str, Any], pattern: str) -> None:
    metric, _ = _fed_ema()
    before, ticks = {"sums": metric.sums.clone()}, metric.ticks
    state = {**metric.state_dict(), **edit}
    with pytest.raises(RuntimeError, match=rf"Error\(s\) in loading state_dict for EMAMetric:\n\t.*{pattern}"):
        metric.load_state_dict(state)
    _assert_unchanged(metric, before, ticks)


def test_missing_and_unexpected_keys_as_torch_reports_them() -> None:
    reference = torch.nn.Module()
    reference.register_buffer("sums", torch.zeros(4))
    metric, _ = _fed_ema()
    before, ticks = {"sums": metric.sums.clone()}, metric.ticks
    bogus = {"bogus": torch.zeros(1)}
    for ours_state, theirs_state in (({}, {}), ({**metric.state_dict(), **bogus}, {"sums": torch.zeros(4), **bogus})):
        with pytest.raises(RuntimeError) as ours:
            metric.load_state_dict(ours_state)
        with pytest.raises(RuntimeError) as theirs:
            reference.load_state_dict(theirs_state)
        assert str(ours.value).split("\n", 1)[1] == str(theirs.value).split("\n", 1)[1]
    _assert_unchanged(metric, before, ticks)
    # without strict, the keys come back as torch returns them and the metric is left as it was
    result = metric.load_state_dict({}, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["sums"], [])
    _assert_unchanged(metric, before, ticks)


# ----------------------------------------------------------------------------------------------- plot


@pytest.fixture
def pyplot() -> Any:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_plot_one_value_and_the_trajectory(pyplot: Any) -> None:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    values = [4.0, 2.0, 3.0, 1.0, 1.5]
    metric = EMAMetric(alpha=0.3)
    trajectory = [metric(v) for v in values]
    fig, ax = metric.plot(trajectory)
    assert isinstance(fig, Figure)
    assert isinstance(ax, Axes)
    expected = ema_oracle([[(v, 1.0)] for v in values], 0.3)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected, rtol=RTOL, atol=ATOL)
    fig, ax = metric.plot()  # one value: compute()
    assert isinstance(fig, Figure)
    assert ax.get_ylabel() == "EMAMetric"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected[-1:], rtol=RTOL, atol=ATOL)
    _, given = pyplot.subplots()
    _, drawn = metric.plot(trajectory[0], ax=given)
    assert drawn is given


def test_plot_wrapper_uses_the_wrapped_bounds(pyplot: Any) -> None:
    from torchmetrics.classification import BinaryAccuracy

    wrapper = EMAWrapper(BinaryAccuracy(), alpha=0.5)
    target = torch.tensor([0, 1, 1, 0])
    trajectory = [wrapper(target if step < 2 else 1 - target, target) for step in range(4)]
    _fig, ax = wrapper.plot(trajectory)
    # decayed correct / decayed total with beta = 0.5 and 4 samples a tick: (0.25 + 0.5) / 1.75, (0.125 + 0.25) / 1.875
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 1.0, 3.0 / 7.0, 1.0 / 5.0], rtol=1e-12)
    assert (wrapper.plot_lower_bound, wrapper.plot_upper_bound) == (0.0, 1.0)
    assert ax.get_ylim()[0] <= 0.0
    assert ax.get_ylim()[1] >= 1.0


def test_a_subclass_configuration_that_is_not_hashable_still_syncs() -> None:
    # fingerprints are memoized on the configuration; a subclass may put a list in it
    class Tagged(EMAMetric):
        def _sync_config(self) -> tuple[Any, ...]:
            return (*super()._sync_config(), ["tag", 1])

    tagged, plain = Tagged(alpha=0.5), EMAMetric(alpha=0.5)
    for x in (1.0, 4.0):
        tagged.update(x)
        plain.update(x)
    (value,) = synced_values([tagged])
    assert float(value) == float(plain.compute())
    assert _sync.fingerprint(tagged) != _sync.fingerprint(plain)
    np.testing.assert_allclose(float(value), ema_oracle([[(1.0, 1.0)], [(4.0, 1.0)]], 0.5)[-1], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ compute's wrapper, against torchmetrics' own
# `_base.DecayedSumMetric._wrap_compute` mirrors torchmetrics' `Metric._wrap_compute` to skip copies of pooled values;
# the same metric with torchmetrics' own wrapper around the same `compute` is the reference, so that a torchmetrics
# release that changes its wrapper (a warning, the cache, the sync and its undoing) shows here.
WRAPPED = {
    "EMAMetric": lambda **kw: EMAMetric(alpha=0.3, **kw),
    "EMAWrapper": lambda **kw: EMAWrapper(MeanSquaredError(), alpha=0.3, **kw),
}


def _with_torchmetrics_compute(metric: Metric) -> Metric:
    """``metric`` with torchmetrics' own ``compute`` wrapper around its class's ``compute``, instead of ours."""
    metric.compute = Metric._wrap_compute(metric, type(metric).compute.__get__(metric))  # type: ignore[method-assign]
    return metric


def _feed(metric: Metric, values: list[float]) -> None:
    for v in values:
        if isinstance(metric, EMAWrapper):
            metric.update(torch.tensor([v]), torch.tensor([v / 2]))
        else:
            metric.update(v)


def _compute_observed(metric: Metric) -> tuple[Any, list[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = metric.compute()
    return value, [(w.category, str(w.message)) for w in caught]


def _same_value(a: Any, b: Any) -> bool:
    return bool(torch.equal(a, b) or (torch.isnan(a).all() and torch.isnan(b).all()))


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "not-cached"])
@pytest.mark.parametrize("kind", list(WRAPPED))
def test_compute_wrapper_behaves_as_torchmetrics_own(kind: str, cache: bool) -> None:
    ours = WRAPPED[kind](compute_with_cache=cache)
    theirs = _with_torchmetrics_compute(WRAPPED[kind](compute_with_cache=cache))
    if kind == "EMAMetric":  # before any update: the same warning, the same (NaN) value
        (a, warned_a), (b, warned_b) = _compute_observed(ours), _compute_observed(theirs)
        assert warned_a == warned_b
        assert warned_a  # the check can fail: the warning is there
        assert warned_a[0][0] is UserWarning
        assert _same_value(a, b)
    for values in ([0.5, 2.0], [7.0]):
        _feed(ours, values)
        _feed(theirs, values)
        (a, warned_a), (b, warned_b) = _compute_observed(ours), _compute_observed(theirs)
        assert warned_a == warned_b == []
        assert _same_value(a, b)
        # cached: the same object until the next update, in both; else a new one per call
        assert (ours.compute() is a) == (theirs.compute() is b) == cache
        assert (ours._computed is None) == (theirs._computed is None) == (not cache)
        assert ours._update_count == theirs._update_count


def _compute_wrapper_worker(rank: int, world: int, kind: str) -> list[Any]:
    ours = WRAPPED[kind]()
    theirs = _with_torchmetrics_compute(WRAPPED[kind]())
    out = []
    for metric in (ours, theirs):
        _feed(metric, [float(rank + 1), 3.0 * rank])
        local = {n: getattr(metric, n).clone() for n in metric._state_names()}
        value = metric.compute()
        # the sync is undone: the local states are back, and the metric is not left synced
        restored = all(torch.equal(getattr(metric, n), t) for n, t in local.items()) and not metric._is_synced
        out.append((value.to(torch.float64).reshape(-1).tolist(), restored))  # plain numbers through the queue
    return out


@pytest.mark.parametrize("kind", list(WRAPPED))
def test_synced_compute_wrapper_behaves_as_torchmetrics_own(kind: str) -> None:
    from tests.ddp_utils import run_ddp

    results = run_ddp(_compute_wrapper_worker, 2, kind)
    for (ours, ours_restored), (theirs, theirs_restored) in results:
        assert ours_restored
        assert theirs_restored
        assert ours == theirs
    # the check can fail: the value is pooled (the ranks fed different values and see the same one, not rank 0's)
    assert results[0][0][0] == results[1][0][0]
    single = WRAPPED[kind]()
    _feed(single, [1.0, 0.0])
    assert results[0][0][0] != single.compute().to(torch.float64).reshape(-1).tolist()
