"""The acceptance test of the callback: the same optimisation under three layouts logs one and the same curve.

(a) 1 process, accumulate 4, batch b; (b) 1 process, accumulate 1, batch 4b; (c) 2 gloo processes, accumulate 2,
batch b, with a sequential DistributedSampler so every optimizer step sees the same samples. The smoothed curves
read back from the CSV and TensorBoard files agree with each other and with a float64 oracle recomputed from the
per-sample losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.ddp_utils import require_gloo  # noqa: E402
from tests.lightning_helpers import (  # noqa: E402
    DDP,
    IndexedData,
    ema_oracle,
    loader,
    read_csv_metric,
    read_records,
    read_tb_metric,
    write_records,
)

HALF_LIFE = 3.0
B = 4
STEPS = 12
LOG_EVERY = 2


class RegressionModule(pl.LightningModule):
    """A linear regression whose training loss is smoothed by an EMAMetric."""

    def __init__(self, record_dir: str | None = None, world_size: int = 1, batch_size: int = B) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.train_loss = EMAMetric(half_life=HALF_LIFE)
        self.record_dir = record_dir
        self.world_size = world_size
        self.batch_size = batch_size
        self.data = IndexedData(STEPS * 4 * B)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        per_sample = (self.layer(x).squeeze(-1) - y) ** 2
        loss = per_sample.mean()
        self.train_loss(loss, weight=len(y))
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        rows = [(step, int(i), float(v)) for i, v in zip(idx, per_sample.detach(), strict=True)]
        write_records(self.record_dir, self.global_rank, rows)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> Any:
        return loader(self.data, self.batch_size, self.world_size, self.global_rank if self.world_size > 1 else 0)


def _fit(tmp: Path, accumulate: int, batch_size: int, devices: int) -> tuple[Path, Path]:
    log_dir = tmp / "logs"
    record_dir = tmp / "records"
    record_dir.mkdir(parents=True)
    model = RegressionModule(str(record_dir), world_size=devices, batch_size=batch_size)
    trainer = pl.Trainer(
        default_root_dir=tmp,
        accelerator="cpu",
        devices=devices,
        strategy=DDP if devices > 1 else "auto",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=LOG_EVERY,
        logger=[pl.loggers.CSVLogger(log_dir, name="csv"), pl.loggers.TensorBoardLogger(log_dir, name="tb")],
        callbacks=[EMAMetricsCallback()],
        use_distributed_sampler=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return log_dir, record_dir


@pytest.mark.lightning
@pytest.mark.slow
def test_same_curve_whatever_accumulation_and_world_size(tmp_path: Path) -> None:
    require_gloo()
    runs = {
        "a: 1 proc, accumulate 4, batch b": _fit(tmp_path / "a", accumulate=4, batch_size=B, devices=1),
        "b: 1 proc, accumulate 1, batch 4b": _fit(tmp_path / "b", accumulate=1, batch_size=4 * B, devices=1),
        "c: 2 procs, accumulate 2, batch b": _fit(tmp_path / "c", accumulate=2, batch_size=B, devices=2),
    }
    expected_steps = [s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0]
    curves = {}
    for label, (log_dir, record_dir) in runs.items():
        csv_curve = read_csv_metric(log_dir, "train_loss")
        tb_curve = read_tb_metric(log_dir, "train_loss")
        # exactly one point per logged optimizer step, never one per micro-batch
        assert [s for s, _ in csv_curve] == expected_steps, label
        assert [s for s, _ in tb_curve] == expected_steps, label
        assert [v for _, v in tb_curve] == pytest.approx([v for _, v in csv_curve], rel=1e-6), label
        per_step = read_records(record_dir)
        assert sorted(per_step) == list(range(STEPS)), label
        assert all(len(v) == 4 * B for v in per_step.values()), label
        oracle = ema_oracle(per_step, HALF_LIFE)
        assert [v for _, v in csv_curve] == pytest.approx([oracle[s] for s in expected_steps], rel=1e-6), label
        curves[label] = csv_curve
    reference = next(iter(curves.values()))
    for label, curve in curves.items():
        assert [s for s, _ in curve] == [s for s, _ in reference], label
        assert [v for _, v in curve] == pytest.approx([v for _, v in reference], rel=1e-5), label


class StoppingModule(RegressionModule):
    """Sets ``should_stop`` in its own ``on_train_batch_end``, after the callbacks' hooks ran."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loop = self.trainer.fit_loop
        if loop.epoch_loop._batches_that_stepped == STOP_AT and not loop._should_accumulate():
            self.trainer.should_stop = True


STOP_AT = 6  # not a multiple of LOG_EVERY - 1: Lightning logs this step only because it stops


@pytest.mark.lightning
@pytest.mark.slow
def test_a_late_stop_still_logs_the_pooled_value(tmp_path: Path) -> None:
    require_gloo()
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    model = StoppingModule(str(record_dir), world_size=2, batch_size=B)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy=DDP,
        max_epochs=1,
        accumulate_grad_batches=2,
        log_every_n_steps=LOG_EVERY,
        logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=[EMAMetricsCallback()],
        use_distributed_sampler=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    oracle = ema_oracle(read_records(record_dir), HALF_LIFE)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert curve[-1][0] == STOP_AT
    assert [v for _, v in curve] == pytest.approx([oracle[s] for s, _ in curve], rel=1e-6)
