"""The two flavours of EMAMetricsCallback: ``ema_metrics.pytorch_lightning`` works like ``ema_metrics.lightning``, and a
callback of one package in a Trainer of the other fails at once with a message that names the right class.

From Lightning 2.6 on, Lightning accepts a callback of the other package without complaint (it only calls its hooks),
so the check is the callback's own, in ``setup``. Older releases refuse it themselves when the ``Trainer`` is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")
ptl = pytest.importorskip("pytorch_lightning", reason="the flavour tests need the `pytorch_lightning` package")

import ema_metrics.lightning  # noqa: E402
import ema_metrics.pytorch_lightning  # noqa: E402
from ema_metrics import EMAMetric  # noqa: E402
from tests.lightning_helpers import (  # noqa: E402
    N_FEATURES,
    IndexedData,
    ema_oracle,
    loader,
    read_csv_metric,
    read_records,
    write_records,
)

HALF_LIFE = 2.0
B = 3


def _module_class(package: Any) -> Any:
    class Module(package.LightningModule):
        def __init__(self, record_dir: str | None = None, n_samples: int = 4 * B) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(N_FEATURES, 1)
            self.train_loss = EMAMetric(half_life=HALF_LIFE)
            self.record_dir = record_dir
            self.data = IndexedData(n_samples)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y, idx = batch
            per_sample = (self.layer(x).squeeze(-1) - y) ** 2
            loss = per_sample.mean()
            self.train_loss(loss, weight=len(y))
            self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
            if self.record_dir is not None:
                step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
                rows = [(step, int(i), float(v)) for i, v in zip(idx, per_sample.detach(), strict=True)]
                write_records(self.record_dir, 0, rows)
            return {"loss": loss}

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> Any:
            return loader(self.data, B)

    return Module


LitModule = _module_class(pl)  # a lightning.pytorch.LightningModule
PtlModule = _module_class(ptl)  # a pytorch_lightning.LightningModule


def _trainer(package: Any, root: Path, callback: Any, **kwargs: Any) -> Any:
    return package.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=package.loggers.CSVLogger(root / "logs", name="csv"),
        callbacks=[callback],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.lightning
def test_pytorch_lightning_flavour_matches_the_oracle(tmp_path: Path) -> None:
    """pytorch_lightning.Trainer + ema_metrics.pytorch_lightning.EMAMetricsCallback, accumulate 2, and zero-code."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    n_steps, k = 5, 2
    model = PtlModule(str(record_dir), n_samples=n_steps * k * B)
    callback = ema_metrics.pytorch_lightning.EMAMetricsCallback(keys={"loss": "loss_ema"}, half_life=HALF_LIFE)
    trainer = _trainer(ptl, tmp_path, callback, accumulate_grad_batches=k, log_every_n_steps=1)
    trainer.fit(model)
    per_step = read_records(record_dir)
    assert sorted(per_step) == list(range(n_steps))
    assert all(len(v) == k * B for v in per_step.values())
    oracle = ema_oracle(per_step, HALF_LIFE)
    for name in ("train_loss", "loss_ema"):
        curve = read_csv_metric(tmp_path / "logs", name)
        assert [s for s, _ in curve] == list(range(n_steps)), name
        assert [v for _, v in curve] == pytest.approx([oracle[s] for s in range(n_steps)], rel=1e-6), name
    assert model.train_loss.ticks == n_steps


@pytest.mark.lightning
@pytest.mark.parametrize(
    ("trainer_package", "module_class", "callback_class", "right_class"),
    [
        (pl, LitModule, ema_metrics.pytorch_lightning.EMAMetricsCallback, "ema_metrics.lightning.EMAMetricsCallback"),
        (ptl, PtlModule, ema_metrics.lightning.EMAMetricsCallback, "ema_metrics.pytorch_lightning.EMAMetricsCallback"),
    ],
    ids=["lightning-trainer-with-pytorch_lightning-callback", "pytorch_lightning-trainer-with-lightning-callback"],
)
def test_mixing_flavours_fails_clearly(
    tmp_path: Path, trainer_package: Any, module_class: Any, callback_class: Any, right_class: str
) -> None:
    model = module_class()
    if Version(trainer_package.__version__) < Version("2.6"):
        # Lightning < 2.6 checks every callback's class when the Trainer is built, before any hook of ours runs
        with pytest.raises(ValueError, match="Expected a parent"):
            _trainer(trainer_package, tmp_path, callback_class())
        assert model.train_loss.ticks == 0
        return
    trainer = _trainer(trainer_package, tmp_path, callback_class())  # Lightning itself accepts the foreign callback
    with pytest.raises(TypeError, match=f"use `{right_class}`"):
        trainer.fit(model)
    assert model.train_loss.ticks == 0  # it failed before training
