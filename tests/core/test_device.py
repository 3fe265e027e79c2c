"""The hot path on a stand-in accelerator: every documented input form works, and nothing is read back or copied.

torch's ``meta`` device stands in for CUDA (see ``tests/device_utils.py``): a meta kernel refuses a CPU tensor with
dims as CUDA does, holds no data, and a dispatch mode sees every read-back and every copy between host and device.
Each test runs the call forms of one row of the GPU issue's table on a metric that lives on the stand-in device and
asserts that the recorder saw no read-back, no copy of host data and no mixed-device op. The values themselves are
checked against the CPU (where the same code runs on real data) by the rest of the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper, tick
from tests.device_utils import recording

DEV = torch.device("meta")


def _on_device(**kwargs: Any) -> EMAMetric:
    metric = EMAMetric(alpha=0.5, **kwargs).to(DEV)
    assert metric.sums.device == DEV
    return metric


def _assert_clean(fn: Callable[[], Any]) -> None:
    with recording() as record:
        fn()
    assert not record, record.summary()


X = torch.tensor(0.5, device=DEV)
XS = torch.ones(5, device=DEV)
W = torch.tensor(2.0, device=DEV)
WS = torch.ones(5, device=DEV)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.update(0.25), id="update(python float)"),
        pytest.param(lambda m: m(0.25), id="forward(python float)"),
        pytest.param(lambda m: m(3), id="forward(python int)"),
        pytest.param(lambda m: m(float("nan")), id="forward(python nan)"),
        pytest.param(lambda m: m(1e308, weight=4.0), id="python value, weight > 1"),
        pytest.param(lambda m: m(0.25, weight=0.5), id="python value, weight < 1"),
        pytest.param(lambda m: m(X, weight=32), id="device value, python weight"),
        pytest.param(lambda m: m(X, weight=0.5), id="device value, python weight < 1"),
        pytest.param(lambda m: m(XS, weight=3.0), id="device vector, python weight"),
        pytest.param(lambda m: m(X, weight=W), id="device value, device weight"),
        pytest.param(lambda m: m(XS, weight=WS), id="device vector, device weights"),
        pytest.param(lambda m: m(0.25, weight=W), id="python value, device weight"),
        pytest.param(lambda m: m(X, weight=torch.tensor(32)), id="device value, CPU 0-d weight"),
        pytest.param(lambda m: m(torch.tensor(0.3), weight=2.0), id="CPU 0-d value"),
        pytest.param(lambda m: m.update(torch.tensor(0.3, dtype=torch.float16)), id="CPU 0-d float16 value"),
    ],
)
@pytest.mark.parametrize("nan_strategy", ["warn", "disable", 0.0])
def test_every_input_form_runs_on_the_device_without_a_read_back_or_a_host_copy(
    call: Callable[[EMAMetric], Any], nan_strategy: Any
) -> None:
    metric = _on_device(nan_strategy=nan_strategy)
    metric(X)  # the first update: the constants are made on the device, from scalars
    _assert_clean(lambda: call(metric))
    assert metric.ticks == 2


def test_python_weights_that_change_at_every_call_copy_nothing() -> None:
    metric = _on_device()
    metric(X)
    _assert_clean(lambda: [metric(X, weight=float(n)) for n in range(1, 200)])  # beyond the 64 kept coefficients
    _assert_clean(lambda: [metric(0.5, weight=n / 7) for n in range(1, 20)])


def test_the_very_first_update_copies_no_host_data() -> None:
    metric = _on_device()
    _assert_clean(lambda: metric(0.25, weight=3))


@pytest.mark.parametrize(
    "replace",
    [
        pytest.param(lambda m: m.reset(), id="reset"),
        pytest.param(lambda m: setattr(m, "sums", m.sums.clone()), id="state replaced (compute's unsync)"),
        pytest.param(lambda m: m.load_state_dict(EMAMetric(alpha=0.5).state_dict()), id="load_state_dict"),
    ],
)
def test_the_first_update_after_the_state_is_replaced_copies_nothing(replace: Callable[[EMAMetric], Any]) -> None:
    metric = _on_device()
    metric(X, weight=2.0)
    replace(metric)
    _assert_clean(lambda: metric(X, weight=2.0))
    _assert_clean(lambda: metric(0.5, weight=7.0))


def test_the_first_update_after_a_move_to_the_device_copies_nothing() -> None:
    metric = EMAMetric(alpha=0.5, adjust=False)
    metric(0.5, weight=2.0)  # the constants and masks are made on the CPU first
    metric.to(DEV)  # the move itself copies the states (and the decay masks) once
    _assert_clean(lambda: [metric(X, weight=2.0), metric(0.5), metric.begin_tick(), metric.end_tick()])


def test_ticks_copy_nothing() -> None:
    metric = _on_device(adjust=False)
    other = _on_device()

    def run() -> None:
        for step in range(300):  # past the renormalization interval of alpha 0.5 (256 ticks)
            with tick(metric, other):
                if step % 50 == 0:
                    metric.update(X, weight=2)
                    other.update(0.5)
        metric.begin_tick()
        metric.end_tick()

    _assert_clean(run)
    assert metric.ticks == 301
    assert other.ticks == 300


@pytest.mark.parametrize("value", [torch.ones(3), torch.ones(1, 1)])
def test_a_cpu_tensor_with_dims_is_refused_naming_the_argument_and_both_devices(value: torch.Tensor) -> None:
    metric = _on_device()
    metric(X)
    state, ticks = metric.sums, metric.ticks
    for call in (metric, metric.update):
        with pytest.raises(RuntimeError, match=r"`value` to be on the metric's device \(meta\).* on cpu"):
            call(value)
        with pytest.raises(RuntimeError, match=r"`weight` to be on the metric's device \(meta\).* on cpu"):
            call(XS[:3], weight=value.reshape(-1))
    assert metric.sums is state
    assert metric.ticks == ticks
    assert metric._numel == 1


def test_the_wrapper_adds_no_read_back_or_host_copy() -> None:
    # MeanSquaredError's own update is device work only; the wrapper's scratch, check and decay add nothing
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.5).to(DEV)
    preds, target = torch.ones(4, device=DEV), torch.zeros(4, device=DEV)
    _assert_clean(lambda: wrapper.update(preds, target))
    _assert_clean(lambda: [wrapper(preds, target) for _ in range(3)])

    def grouped() -> None:
        with wrapper.tick():
            wrapper.update(preds, target)
            wrapper.update(preds, target)
        with wrapper.tick():
            pass

    _assert_clean(grouped)
    wrapper.reset()
    _assert_clean(lambda: wrapper.update(preds, target))


def test_the_recorder_sees_what_the_old_hot_path_did() -> None:
    # the checks above can fail: a CPU 0-d tensor in addcmul's tensor1 slot, a copy of host data, a read-back
    with recording() as record:
        torch.addcmul(torch.zeros(4, device=DEV), torch.tensor(1.0), torch.ones(4, device=DEV))
        torch.tensor([0.0, 2.0], device=DEV)
        torch.ones(2).to(DEV)
    assert record.mixed
    assert len(record.copies) == 2
    with recording() as record, pytest.raises(RuntimeError, match="meta"):  # meta holds no data: the read fails
        float(torch.ones((), device=DEV))
    assert record.reads


@pytest.mark.parametrize("where", ["update", "forward", "end_tick", "wrapper"])
def test_capture_in_a_cuda_graph_is_refused_with_the_state_unchanged(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the refusal is what a CUDA stream capture meets (the GPU check captures for real)
    import ema_metrics._base
    import ema_metrics.ema

    monkeypatch.setattr(ema_metrics.ema, "capturing", lambda device: True)
    monkeypatch.setattr(ema_metrics._base, "capturing", lambda device: True)
    metric = _on_device()
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.5).to(DEV)
    metric.begin_tick()
    calls = {
        "update": lambda: metric.update(X),
        "forward": lambda: metric(X),
        "end_tick": metric.end_tick,
        "wrapper": lambda: wrapper.update(torch.ones(2, device=DEV), torch.zeros(2, device=DEV)),
    }
    with pytest.raises(RuntimeError, match=r"cannot be captured in a CUDA graph"):
        calls[where]()
    assert metric.ticks == 0
    assert metric._numel == 0
    assert wrapper.ticks == 0
