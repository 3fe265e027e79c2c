"""EMACallback refuses what it cannot do, early and with a message that says what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMACallback  # noqa: E402
from tests.lightning_helpers import N_FEATURES, IndexedData, loader  # noqa: E402


class Plain(pl.LightningModule):
    """A module with no EMA metric, or with one (``metric=True``)."""

    def __init__(self, metric: bool = False, output: str = "loss") -> None:
        super().__init__()
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        if metric:
            self.train_loss = EMAMetric(alpha=0.5)
        self.output = output
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps += 1
        x, y, _ = batch
        return {self.output: ((self.layer(x).squeeze(-1) - y) ** 2).mean()}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return loader(IndexedData(8), 2)


class UnsupportedStrategy(pl.strategies.Strategy):
    """A single-process strategy that is none of single-device, DDP or FSDP."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def is_global_zero(self) -> bool:
        return True

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor


def _fit(tmp_path: Path, model: Any, callback: Any, **kwargs: Any) -> None:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(model)


@pytest.mark.lightning
def test_module_without_ema_metric_and_no_keys(tmp_path: Path) -> None:
    model = Plain()
    with pytest.raises(ValueError, match=r"found no EMAMetric .* in Plain") as info:
        _fit(tmp_path, model, EMACallback())
    assert "keys=" in str(info.value)  # the message shows the zero-code way out
    assert model.steps == 0


@pytest.mark.lightning
def test_everything_excluded_is_like_no_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="found no EMAMetric"):
        _fit(tmp_path, Plain(metric=True), EMACallback(exclude=["train_loss"]))


@pytest.mark.lightning
def test_unknown_metric_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"names \['nope'\].*found \['train_loss'\]"):
        _fit(tmp_path, Plain(metric=True), EMACallback(metrics=["nope"]))


@pytest.mark.lightning
def test_missing_output_key(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"'acc'.*available: \['loss'\]"):
        _fit(tmp_path, Plain(), EMACallback(keys={"acc": "acc_ema"}, alpha=0.5))


@pytest.mark.lightning
def test_unsupported_strategy_is_named(tmp_path: Path) -> None:
    model = Plain(metric=True)
    with pytest.raises(ValueError, match="got UnsupportedStrategy"):
        _fit(tmp_path, model, EMACallback(), strategy=UnsupportedStrategy())
    assert model.steps == 0


@pytest.mark.lightning
def test_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        EMACallback(keys={"loss": "loss_ema"})  # zero-code mode needs a parametrisation
    with pytest.raises(ValueError, match="exactly one of"):
        EMACallback(keys={"loss": "loss_ema"}, alpha=0.5, span=3)
    with pytest.raises(ValueError, match="pass `keys` too"):
        EMACallback(alpha=0.1)
    with pytest.raises(ValueError, match="pass `keys` too"):
        EMACallback(half_life=10)
    with pytest.raises(ValueError, match="alpha"):
        EMACallback(keys={"loss": "loss_ema"}, alpha=1.5)
    with pytest.raises(TypeError, match="`metrics`"):
        EMACallback(metrics="train_loss")  # type: ignore[arg-type]  # a string, not a list of names
    with pytest.raises(TypeError, match="`keys`"):
        EMACallback(keys={"loss": 1}, alpha=0.5)  # type: ignore[dict-item]
