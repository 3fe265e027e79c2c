"""EMAWrapper driven by the callback: one tick per optimizer step, pooled over micro-batches and ranks.

The oracle recomputes the decayed correct / total counts from the per-sample correctness recorded by every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from torchmetrics.classification import BinaryAccuracy  # noqa: E402

from ema_metrics import EMAWrapper  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.ddp_utils import require_gloo  # noqa: E402
from tests.lightning_helpers import DDP, IndexedData, loader, read_csv_metric, read_records, write_records  # noqa: E402

HALF_LIFE = 2.0
B = 4
STEPS = 8


class AccuracyModule(pl.LightningModule):
    """Classifies the sign of a noisy linear target; its smoothed accuracy is an EMAWrapper."""

    def __init__(self, record_dir: str, world_size: int, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.train_acc = EMAWrapper(BinaryAccuracy(validate_args=False), half_life=HALF_LIFE)
        self.record_dir = record_dir
        self.world_size = world_size
        self.batch_size = batch_size
        self.data = IndexedData(STEPS * 4 * B, seed=3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        logits = self.layer(x).squeeze(-1)
        target = (y > 0).long()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
        preds = (logits > 0).long()
        self.train_acc(preds, target)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        correct = (preds == target).double()
        write_records(
            self.record_dir, self.global_rank, [(step, int(i), float(c)) for i, c in zip(idx, correct, strict=True)]
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> Any:
        return loader(self.data, self.batch_size, self.world_size, self.global_rank if self.world_size > 1 else 0)


def _accuracy_oracle(per_step: dict[int, list[float]]) -> dict[int, float]:
    beta = 0.5 ** (1.0 / HALF_LIFE)
    correct = total = 0.0
    out = {}
    for step in sorted(per_step):
        values = np.asarray(per_step[step], dtype=np.float64)
        correct = beta * correct + values.sum()
        total = beta * total + len(values)
        out[step] = correct / total
    return out


@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.parametrize(("devices", "accumulate"), [(1, 4), (2, 2)])
def test_wrapper_ticks_once_per_optimizer_step(tmp_path: Path, devices: int, accumulate: int) -> None:
    if devices > 1:
        require_gloo()
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    model = AccuracyModule(str(record_dir), world_size=devices, batch_size=B)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=devices,
        strategy=DDP if devices > 1 else "auto",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=[EMAMetricsCallback()],
        use_distributed_sampler=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    per_step = read_records(record_dir)
    assert sorted(per_step) == list(range(STEPS))
    assert all(len(v) == 4 * B for v in per_step.values())  # every rank's micro-batches are in each step
    oracle = _accuracy_oracle(per_step)
    logged = read_csv_metric(tmp_path / "logs", "train_acc")
    assert [s for s, _ in logged] == list(range(STEPS))
    assert [v for _, v in logged] == pytest.approx([oracle[s] for s, _ in logged], rel=1e-9)
