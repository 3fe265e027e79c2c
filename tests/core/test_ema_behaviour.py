"""``EMAMetric`` contract: arguments, input validation, persistence, host syncs, memory, dtypes and devices.

Every value is checked against the float64 loop of ``tests.test_ema_reference`` (or the pandas formulas).
"""

from __future__ import annotations

import gc
import io
import math
import os
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import ema_metrics
from ema_metrics import EMAMetric, resolve_alpha
from tests.core.test_ema_reference import ATOL, RTOL, ema_oracle, pandas_alpha, to_f64

# ----------------------------------------------------------------------------------------------- parametrisation


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("alpha", 0.3),
        ("alpha", 1.0),
        ("alpha", 1e-6),
        ("com", 0.0),
        ("com", 9.5),
        ("com", 3),
        ("span", 1.0),
        ("span", 20),
        ("half_life", 0.5),
        ("half_life", 1000.0),
        ("half_life", np.float32(7.0)),
    ],
)
def test_parametrisation_uses_pandas_formulas(name: str, value: float) -> None:
    metric = EMAMetric(**{name: value})
    expected = pandas_alpha(name, float(value))
    # pandas' `1 - 0.5 ** (1 / half_life)` cancels (relative error about 1e-16 / alpha); the metric uses `-expm1`,
    # checked to 1e-14 against a 60-digit evaluation in tests/core/test_extremes.py
    rel = 1e-12 if name == "half_life" else 1e-14
    assert metric.alpha == pytest.approx(expected, rel=rel, abs=0)
    assert metric.beta == pytest.approx(1.0 - expected, rel=1e-12, abs=1e-16)
    assert resolve_alpha(**{name: value}) == metric.alpha
    assert isinstance(metric.alpha, float)


@pytest.mark.parametrize("attr", ["alpha", "beta"])
def test_alpha_and_beta_are_read_only(attr: str) -> None:
    metric = EMAMetric(alpha=0.25)
    with pytest.raises(AttributeError):
        setattr(metric, attr, 0.5)
    assert metric.alpha == 0.25


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"alpha": "0.5"}, "alpha", "'0.5'"),
        ({"alpha": True}, "alpha", "True"),
        ({"span": False}, "span", "False"),
        ({"com": [1.0]}, "com", "[1.0]"),
        ({"half_life": 1j}, "half_life", "1j"),
        ({"half_life": torch.tensor(2.0)}, "half_life", "tensor(2.)"),
    ],
)
def test_parametrisation_type_errors(kwargs: dict[str, Any], name: str, shown: str) -> None:
    with pytest.raises(TypeError, match=rf"`{name}`.*{re.escape(shown)}"):
        EMAMetric(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"alpha": 0.0}, "alpha", "0.0"),
        ({"alpha": -0.1}, "alpha", "-0.1"),
        ({"alpha": 1.5}, "alpha", "1.5"),
        ({"alpha": math.nan}, "alpha", "nan"),
        ({"span": 0.5}, "span", "0.5"),
        ({"span": math.inf}, "span", "inf"),
        ({"com": -1}, "com", "-1"),
        ({"half_life": 0}, "half_life", "0"),
        ({"half_life": -2.5}, "half_life", "-2.5"),
    ],
)
def test_parametrisation_value_errors(kwargs: dict[str, Any], name: str, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"`{name}`.*{re.escape(shown)}"):
        EMAMetric(**kwargs)


def test_exactly_one_parametrisation() -> None:
    with pytest.raises(ValueError, match=r"exactly one.*none"):
        EMAMetric()
    with pytest.raises(ValueError, match=r"exactly one.*`alpha`=0\.5.*`span`=3"):
        EMAMetric(alpha=0.5, span=3)
    with pytest.raises(ValueError, match=r"`half_life`=2.*`com`=1"):
        EMAMetric(half_life=2, com=1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"adjust": "yes"}, TypeError, r"`adjust`.*'yes'"),
        ({"adjust": 1}, TypeError, r"`adjust`.*1"),
        ({"nan_strategy": "drop"}, ValueError, r"`nan_strategy`.*'drop'"),
        ({"nan_strategy": True}, TypeError, r"`nan_strategy`.*True"),
        ({"nan_strategy": None}, TypeError, r"`nan_strategy`.*None"),
        ({"nan_strategy": math.nan}, ValueError, r"`nan_strategy`.*nan"),
    ],
)
def test_other_argument_errors(kwargs: dict[str, Any], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        EMAMetric(alpha=0.5, **kwargs)


# ----------------------------------------------------------------------------------------------- empty metric, reset


def test_compute_before_update_warns_and_is_nan() -> None:
    metric = EMAMetric(alpha=0.5)
    with pytest.warns(UserWarning, match="before the ``update``"):
        value = metric.compute()
    assert value.dtype == torch.float64
    assert math.isnan(float(value))


@pytest.mark.parametrize("adjust", [True, False])
def test_reset_starts_a_new_stream(adjust: bool) -> None:
    metric = EMAMetric(alpha=0.4, adjust=adjust)
    for v in (5.0, math.nan, -3.0):
        metric.update(v)
    with pytest.warns(UserWarning, match="1 non-finite"):
        metric.compute()
    metric.reset()
    assert metric.ticks == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))
    values = [2.0, 4.0, math.nan, 1.0]
    got = [float(metric(v)) for v in values]
    np.testing.assert_allclose(got, ema_oracle([[(v, 1.0)] for v in values], 0.4, adjust), rtol=RTOL, atol=ATOL)
    # the counters were reset as well: the new stream's single NaN is reported as such
    with pytest.warns(UserWarning, match="1 non-finite"):
        metric.compute()


def test_tick_errors_and_closing_on_exception() -> None:
    metric = EMAMetric(alpha=0.5)
    with pytest.raises(RuntimeError, match="without an open tick"):
        metric.end_tick()
    metric.begin_tick()
    with pytest.raises(RuntimeError, match="already open"):
        metric.begin_tick()
    metric.end_tick()

    def fail_inside_tick() -> None:
        with metric.tick():
            metric.update(3.0)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_inside_tick()
    assert not metric.in_tick
    assert metric.ticks == 2
    metric.update(1.0)
    expected = ema_oracle([[], [(3.0, 1.0)], [(1.0, 1.0)]], 0.5)
    np.testing.assert_allclose(float(metric.compute()), expected[-1], rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match=r"EMA metrics or torch\.nn\.Module"):
        ema_metrics.find_ema_metrics(metric, "loss")


def test_forward_outputs_are_detached_snapshots() -> None:
    metric = EMAMetric(alpha=0.3)
    w = torch.nn.Parameter(torch.tensor(2.0))
    values = [1.0, 4.0, -2.0, 8.0]
    outputs = [metric(w * v) for v in values]
    for out in outputs:
        assert not out.requires_grad
        assert out.grad_fn is None
        assert out.dtype == torch.float64
    # values returned earlier are not views of the state that later updates would change
    got = [float(o) for o in outputs]
    np.testing.assert_allclose(got, ema_oracle([[(2.0 * v, 1.0)] for v in values], 0.3), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- rejected input

BAD_INPUTS = [
    pytest.param(torch.tensor(1.0), -1.0, ValueError, r"`weight`.*-1\.0", id="negative-weight"),
    pytest.param(torch.tensor(1.0), -2, ValueError, r"`weight`.*-2", id="negative-int-weight"),
    pytest.param(2.0, math.nan, ValueError, r"`weight`.*nan", id="nan-weight"),
    pytest.param(torch.ones(3), math.inf, ValueError, r"`weight`.*inf", id="inf-weight"),
    pytest.param(torch.ones(3), np.float64(-0.5), ValueError, r"`weight`.*-0\.5", id="numpy-negative-weight"),
    pytest.param(torch.ones(3), True, TypeError, r"`weight`.*True", id="bool-weight"),
    pytest.param(torch.ones(3), "2", TypeError, r"`weight`.*'2'", id="str-weight"),
    pytest.param(torch.ones(2), torch.tensor([1j, 1j]), TypeError, r"`weight`.*complex", id="complex-weight"),
    pytest.param(torch.ones(2), torch.ones(3), ValueError, r"`weight`.*broadcastable.*\(2,\).*\(3,\)", id="shape"),
    pytest.param(torch.tensor(1.0), torch.ones(2), ValueError, r"`weight`.*broadcastable", id="shape-0d"),
    pytest.param(torch.ones(2, 3), torch.ones(2), ValueError, r"`weight`.*broadcastable", id="shape-2d"),
    pytest.param(torch.ones(3), torch.ones(2, 3), ValueError, r"`weight`.*broadcastable", id="shape-grows"),
    pytest.param("1.0", 1.0, TypeError, r"`value`.*'1.0'", id="str-value"),
    pytest.param(None, 1.0, TypeError, r"`value`.*None", id="none-value"),
    pytest.param(True, 1.0, TypeError, r"`value`.*True", id="bool-value"),
    pytest.param(1j, 1.0, TypeError, r"`value`.*1j", id="complex-value"),
    pytest.param(torch.tensor([1.0 + 2.0j]), 1.0, TypeError, r"`value`.*complex", id="complex-tensor"),
    pytest.param(torch.tensor([True, False]), 1.0, TypeError, r"`value`.*bool", id="bool-tensor"),
    pytest.param(["a"], 1.0, TypeError, r"`value`", id="list-of-str"),
]


@pytest.mark.parametrize("in_tick", [False, True])
@pytest.mark.parametrize("via", ["update", "forward"])
@pytest.mark.parametrize(("value", "weight", "exc", "pattern"), BAD_INPUTS)
def test_rejected_input_leaves_state_unchanged(
    value: Any, weight: Any, exc: type[Exception], pattern: str, via: str, in_tick: bool
) -> None:
    metric = EMAMetric(alpha=0.5, adjust=False)
    metric.update(torch.tensor([1.0, 3.0]))
    metric.update(5.0, weight=2.0)
    if in_tick:
        metric.begin_tick()
    sums, ticks = metric.sums.clone(), metric.ticks
    with pytest.raises(exc, match=pattern):
        getattr(metric, via)(value, weight=weight)
    assert torch.equal(metric.sums, sums)
    assert metric.ticks == ticks
    metric.update(7.0)
    if in_tick:
        metric.end_tick()
    metric.update(-1.0)
    ticks_in = [[([1.0, 3.0], 1.0)], [(5.0, 2.0)], [(7.0, 1.0)], [(-1.0, 1.0)]]
    np.testing.assert_allclose(float(metric.compute()), ema_oracle(ticks_in, 0.5, False)[-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("via", ["update", "forward"])
@pytest.mark.parametrize(
    "bad_weight",
    [
        torch.tensor(-1.0),
        torch.tensor([1.0, -0.5, 2.0]),
        torch.tensor([1.0, math.nan, 2.0]),
        torch.tensor([math.inf, 1.0, 1.0]),
        torch.tensor([-1, 2, 3]),
    ],
)
def test_invalid_tensor_weight_rejected_on_device(bad_weight: torch.Tensor, via: str) -> None:
    metric = EMAMetric(alpha=0.5)
    metric.update(torch.tensor([2.0, 4.0, 6.0]))
    metric.update(1.0)
    sums = metric.sums.clone()
    getattr(metric, via)(torch.tensor([10.0, 20.0, 30.0]), weight=bad_weight)
    # no observation was added and nothing decayed (the decayed sums and the count of finite values are unchanged)
    assert torch.equal(metric.sums[:3], sums[:3])
    with pytest.raises(ValueError, match="`weight`"):
        metric.compute()
    metric.update(3.0)
    with pytest.raises(ValueError, match=r"1 update.*`weight`"):
        metric.compute()
    metric.reset()
    values = [1.0, 2.0, 3.0]
    for v in values:
        metric.update(torch.tensor(v), weight=torch.tensor(2.0))
    expected = ema_oracle([[(v, 2.0)] for v in values], 0.5)
    np.testing.assert_allclose(float(metric.compute()), expected[-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("via", ["update", "forward"])
@pytest.mark.parametrize(
    ("value", "weight"),
    [
        (torch.tensor(2.0, device="meta"), 1.0),
        (torch.ones(3, device="meta"), 1.0),
        (torch.ones(3), torch.ones(3, device="meta")),
        (torch.tensor(2.0), torch.tensor(1.0, device="meta")),
    ],
    ids=["meta-scalar", "meta-vector", "meta-weight", "meta-scalar-weight"],
)
def test_input_on_another_device_is_rejected(value: torch.Tensor, weight: Any, via: str) -> None:
    metric = EMAMetric(alpha=0.5)
    metric.update(1.0)
    metric.begin_tick()
    metric.update(3.0)
    sums, ticks = metric.sums.clone(), metric.ticks
    with pytest.raises(RuntimeError, match="device"):
        getattr(metric, via)(value, weight=weight)
    assert torch.equal(metric.sums, sums)
    assert metric.ticks == ticks
    metric.update(5.0)
    metric.end_tick()
    expected = ema_oracle([[(1.0, 1.0)], [(3.0, 1.0), (5.0, 1.0)]], 0.5)
    np.testing.assert_allclose(float(metric.compute()), expected[-1], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- persistence


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("break_at", [0, 1, 17])
@pytest.mark.parametrize("adjust", [True, False])
def test_state_dict_round_trip_continues_the_curve(adjust: bool, break_at: int) -> None:
    rng = np.random.default_rng(5)
    stream: list[tuple[Any, Any]] = []
    for t in range(30):
        x = rng.normal(size=3) * 4
        if t in (3, 20):
            x[1] = np.nan
        stream.append((torch.from_numpy(x), torch.from_numpy(rng.uniform(0.0, 2.0, size=3))))
    kwargs: dict[str, Any] = {"half_life": 3.0, "adjust": adjust}

    whole = EMAMetric(**kwargs)
    curve_whole = [float(whole(x, weight=w)) for x, w in stream]

    first = EMAMetric(**kwargs)
    curve = [float(first(x, weight=w)) for x, w in stream[:break_at]]
    state = _round_trip(first.state_dict())
    assert set(state) == {"sums", "scale", "_extra_state"}
    resumed = EMAMetric(**kwargs)
    resumed.load_state_dict(state)
    assert resumed.ticks == break_at
    curve += [float(resumed(x, weight=w)) for x, w in stream[break_at:]]

    assert curve == curve_whole
    expected = ema_oracle([[(to_f64(x), to_f64(w))] for x, w in stream], pandas_alpha("half_life", 3.0), adjust)
    np.testing.assert_allclose(curve, expected, rtol=RTOL, atol=ATOL)
    # the count of dropped values survived the trip as well
    with pytest.warns(UserWarning, match="2 non-finite"):
        resumed.compute()


def test_state_dict_inside_a_module() -> None:
    model = torch.nn.Module()
    model.loss = EMAMetric(alpha=0.2)
    for v in (1.0, 2.0, 3.0):
        model.loss.update(v)
    state = _round_trip(model.state_dict())
    fresh = torch.nn.Module()
    fresh.loss = EMAMetric(alpha=0.2)
    fresh.load_state_dict(state)
    fresh.loss.update(4.0)
    expected = ema_oracle([[(v, 1.0)] for v in (1.0, 2.0, 3.0, 4.0)], 0.2)
    np.testing.assert_allclose(float(fresh.loss.compute()), expected[-1], rtol=RTOL, atol=ATOL)
    assert fresh.loss.ticks == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_conversion_keeps_float64_states(dtype: torch.dtype) -> None:
    metric = EMAMetric(alpha=0.1)
    metric.update(1.0 / 3.0)
    metric.set_dtype(dtype)
    assert metric.sums.dtype == torch.float64
    metric.to(dtype)
    assert metric.sums.dtype == torch.float64
    metric.update(2.0 / 3.0)
    expected = ema_oracle([[(1.0 / 3.0, 1.0)], [(2.0 / 3.0, 1.0)]], 0.1)
    np.testing.assert_allclose(float(metric.compute()), expected[-1], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- no host sync

SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every Tensor -> Python conversion raise inside the block."""

    def forbidden(name: str) -> Callable[..., Any]:
        def raiser(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host sync: Tensor.{name} was called")

        return raiser

    with pytest.MonkeyPatch.context() as patch:
        for name in SYNC_METHODS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        yield


def test_update_and_forward_make_no_host_sync() -> None:
    gen = torch.Generator().manual_seed(0)
    strategies: list[str | float] = ["warn", "ignore", "error", "disable", 0.0]
    metrics = {s: EMAMetric(alpha=0.2, nan_strategy=s) for s in strategies}
    metrics["adjust=False"] = EMAMetric(span=4, adjust=False)
    metrics["sync_on_forward"] = EMAMetric(com=3)
    metrics["sync_on_forward"].sync_on_forward = True
    param = torch.nn.Parameter(torch.ones(4))
    ticks: list[list[tuple[Any, Any]]] = []

    with forbid_host_sync():
        with pytest.raises(AssertionError, match="host sync"):
            float(torch.tensor(1.0))
        with pytest.raises(AssertionError, match="host sync"):
            bool(torch.tensor(True))
        for step in range(12):
            x = torch.randn(4, generator=gen)
            w = torch.rand(4, generator=gen)
            updates: list[tuple[Any, Any]] = [
                (x[0], 1.0),  # 0-d float32 tensor, default Python weight
                (x, 3),  # vector, Python int weight
                (float(step), 0.5 + step),  # Python value, a new Python weight every step
                (x, w),  # per-element tensor weights
                (x[1].double(), w[2]),  # 0-d tensor weight
                ((param * x).sum(), 2.0),  # requires grad
                (x.half(), w.half()),
            ]
            tick_updates = updates[step % len(updates) :][:3]
            if step % 3 == 0:
                with ema_metrics.tick(*metrics.values()):
                    for m in metrics.values():
                        for value, weight in tick_updates:
                            m(value, weight=weight)
            elif step % 3 == 1:
                for m in metrics.values():
                    m.begin_tick()
                    for value, weight in tick_updates:
                        m.update(value, weight=weight)
                    m.end_tick()
            else:
                tick_updates = tick_updates[:1]
                for m in metrics.values():
                    for value, weight in tick_updates:
                        m(value, weight=weight)
            ticks.append(tick_updates)

    # restored: the values are right
    assert bool(torch.tensor(True))
    ticks = [[(to_f64(v), to_f64(w)) for v, w in tick] for tick in ticks]
    for key, m in metrics.items():
        adjust = key != "adjust=False"
        expected = ema_oracle(ticks, m.alpha, adjust)
        np.testing.assert_allclose(float(m.compute()), expected[-1], rtol=RTOL, atol=ATOL)
        assert m.ticks == len(ticks)


# ----------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_forward_with_autograd_inputs_keeps_memory_flat() -> None:
    n_warm, n_total = 10_000, 100_000
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(97, 8, generator=gen)
    w = torch.nn.Parameter(torch.randn(8, generator=gen))
    batch_sizes = [float(16 + k) for k in range(80)]  # more distinct Python weights than any cache should keep
    metric = EMAMetric(half_life=50)

    def run(start: int, stop: int) -> torch.Tensor:
        out = torch.zeros(())
        for i in range(start, stop):
            loss = (w * data[i % 97]).sum()
            out = metric(loss, weight=batch_sizes[i % 80])
        return out

    run(0, n_warm)
    gc.collect()
    rss_warm = _rss_bytes()
    out = run(n_warm, n_total)
    gc.collect()
    growth = _rss_bytes() - rss_warm

    assert not out.requires_grad
    assert out.grad_fn is None
    loss = (w * data[0]).sum()
    metric(loss)
    probe = weakref.ref(loss)
    del loss
    assert probe() is None, "the metric kept a reference to its autograd input"
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over {n_total - n_warm} calls"

    with torch.no_grad():
        per_sample = [float((w * data[j]).sum()) for j in range(97)]  # the float32 losses the metric saw
    beta = 0.5 ** (1.0 / 50)
    num = den = 0.0
    for i in range(n_total):
        num = beta * num + batch_sizes[i % 80] * per_sample[i % 97]
        den = beta * den + batch_sizes[i % 80]
    np.testing.assert_allclose(float(out), num / den, rtol=RTOL)
