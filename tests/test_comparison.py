"""The claims of the README's comparison table, each checked against an independent reference.

Trackers that are not dependencies of this project (ignite's ``RunningAverage``, fastai's ``AvgSmoothLoss``,
TensorBoard's smoothing) are re-implemented here from the recursions their documentation and sources give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.aggregation import RunningMean

from ema_metrics import EMAMetric

ALPHA = 0.2
STREAM = np.array([5.0, 1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.3, 0.7, 1.0])


def _ours(values: np.ndarray, adjust: bool) -> np.ndarray:
    m = EMAMetric(alpha=ALPHA, adjust=adjust)
    return np.array([float(m(float(v))) for v in values])


def test_hand_written_tracker_is_pandas_adjust_false_and_biased_to_its_first_value() -> None:
    ema = None
    hand = []
    for v in STREAM:  # the seed's tracker: ema = beta * ema + alpha * x, seeded with the first value
        ema = v if ema is None else (1 - ALPHA) * ema + ALPHA * v
        hand.append(ema)
    expected_false = pd.Series(STREAM).ewm(alpha=ALPHA, adjust=False).mean().to_numpy()
    expected_true = pd.Series(STREAM).ewm(alpha=ALPHA, adjust=True).mean().to_numpy()
    np.testing.assert_allclose(hand, expected_false, rtol=1e-12)
    np.testing.assert_allclose(_ours(STREAM, adjust=False), expected_false, rtol=1e-12)
    np.testing.assert_allclose(_ours(STREAM, adjust=True), expected_true, rtol=1e-12)
    # after the outlier first value, the seeded tracker stays further from the data than the debiased average
    later = slice(3, None)
    assert np.all(np.abs(np.array(hand)[later] - 1.0) > np.abs(expected_true[later] - 1.0))


def test_hand_written_tracker_keeps_the_graph_alive_ours_does_not() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    ema: Any = None
    ours = EMAMetric(alpha=ALPHA)
    for step in range(5):
        loss = (w * step).sum()
        ema = loss if ema is None else (1 - ALPHA) * ema + ALPHA * loss
        out = ours(loss)
    assert ema.grad_fn is not None  # the chain of every past step's graph is still referenced
    assert out.grad_fn is None
    assert not out.requires_grad


def test_ticking_per_micro_batch_changes_with_accumulation_ticking_per_step_does_not() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(2.0, 1.0, size=(12, 16))  # 12 optimizer steps of 16 samples
    curves_micro, curves_step = {}, {}
    for k in (1, 4):
        micro = EMAMetric(alpha=ALPHA)
        step_ema = EMAMetric(alpha=ALPHA)
        out_micro, out_step = [], []
        for step in samples:
            with step_ema.tick():
                for chunk in np.split(step, k):
                    micro.update(float(chunk.mean()), weight=len(chunk))
                    step_ema.update(float(chunk.mean()), weight=len(chunk))
            out_micro.append(float(micro.compute()))
            out_step.append(float(step_ema.compute()))
        curves_micro[k], curves_step[k] = out_micro, out_step
    oracle = pd.Series(samples.mean(axis=1)).ewm(alpha=ALPHA, adjust=True).mean().to_numpy()
    np.testing.assert_allclose(curves_step[1], oracle, rtol=1e-12)
    np.testing.assert_allclose(curves_step[4], oracle, rtol=1e-12)
    assert not np.allclose(curves_micro[1], curves_micro[4], rtol=1e-3)


def test_ignite_running_average_recursion_is_adjust_false() -> None:
    # ignite RunningAverage(alpha=a): value = a * value + (1 - a) * x, the first value seeds it
    a = 1 - ALPHA
    value = None
    ignite = []
    for x in STREAM:
        value = x if value is None else a * value + (1 - a) * x
        ignite.append(value)
    np.testing.assert_allclose(_ours(STREAM, adjust=False), ignite, rtol=1e-12)


def test_fastai_avg_smooth_loss_and_tensorboard_smoothing_are_adjust_true() -> None:
    beta = 1 - ALPHA
    # fastai AvgSmoothLoss: val = torch.lerp(loss, val, beta); value = val / (1 - beta**count)
    val = torch.tensor(0.0, dtype=torch.float64)
    fastai = []
    for count, x in enumerate(STREAM, start=1):
        val = torch.lerp(torch.tensor(x, dtype=torch.float64), val, beta)
        fastai.append(float(val / (1 - beta**count)))
    # TensorBoard: last = last * s + (1 - s) * x; smoothed = last / (1 - s ** n)
    last, tb = 0.0, []
    for n, x in enumerate(STREAM, start=1):
        last = last * beta + (1 - beta) * x
        tb.append(last / (1 - beta**n))
    ours = _ours(STREAM, adjust=True)
    np.testing.assert_allclose(ours, fastai, rtol=1e-12)
    np.testing.assert_allclose(ours, tb, rtol=1e-12)


def test_running_mean_is_a_window_mean_with_a_state_copy_per_slot() -> None:
    window = 4
    rm = RunningMean(window=window)
    forwarded, computed = [], []
    for x in STREAM:
        forwarded.append(float(rm(torch.tensor(x))))
        computed.append(float(rm.compute()))
    expected = pd.Series(STREAM).rolling(window, min_periods=1).mean().to_numpy()
    np.testing.assert_allclose(computed, expected, rtol=1e-6)
    # what Lightning logs on_step is `forward`'s result: the batch value, not the running mean
    np.testing.assert_allclose(forwarded, STREAM, rtol=1e-6)
    copies = [name for name in rm.metric_state if name.startswith("mean_value")]
    assert len(copies) == window  # torchmetrics keeps `window` copies of every state
    assert EMAMetric(alpha=ALPHA).sums.numel() == 4  # one packed state, whatever the horizon


pl = pytest.importorskip("lightning.pytorch", reason="needs `ema_metrics[lightning]`")


class _RawLogModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = (self.layer(x) - x).pow(2).mean()
        self.log("raw_loss", loss, on_step=True, on_epoch=False)
        self.seen.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, float(loss)))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.lightning
def test_lightning_self_log_under_accumulation_logs_the_last_micro_batch(tmp_path: Path) -> None:
    from tests.lightning_helpers import read_csv_metric

    data = torch.utils.data.TensorDataset(torch.linspace(-2, 2, 32).unsqueeze(1))
    model = _RawLogModule()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
    logged = read_csv_metric(tmp_path, "raw_loss")
    by_step: dict[int, list[float]] = {}
    for step, value in model.seen:
        by_step.setdefault(step, []).append(value)
    assert [s for s, _ in logged] == sorted(by_step)
    for step, value in logged:
        assert value == pytest.approx(by_step[step][-1], rel=1e-6)  # the last micro-batch only
        assert value != pytest.approx(float(np.mean(by_step[step])), rel=1e-3)
