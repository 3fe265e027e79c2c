"""EMAMetricsCallback refuses what it cannot do, early and with a message that says what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
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
    callbacks = callback if isinstance(callback, list) else [callback]
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=callbacks,
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
        _fit(tmp_path, model, EMAMetricsCallback())
    assert "keys=" in str(info.value)  # the message shows the zero-code way out
    assert model.steps == 0


@pytest.mark.lightning
def test_everything_excluded_is_like_no_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="found no EMAMetric"):
        _fit(tmp_path, Plain(metric=True), EMAMetricsCallback(exclude=["train_loss"]))


@pytest.mark.lightning
def test_unknown_metric_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"names \['nope'\].*found \['train_loss'\]"):
        _fit(tmp_path, Plain(metric=True), EMAMetricsCallback(metrics=["nope"]))


@pytest.mark.lightning
def test_missing_output_key(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"'acc'.*available: \['loss'\]"):
        _fit(tmp_path, Plain(), EMAMetricsCallback(keys={"acc": "acc_ema"}, alpha=0.5))


@pytest.mark.lightning
def test_unsupported_strategy_is_named(tmp_path: Path) -> None:
    model = Plain(metric=True)
    with pytest.raises(ValueError, match="got UnsupportedStrategy"):
        _fit(tmp_path, model, EMAMetricsCallback(), strategy=UnsupportedStrategy())
    assert model.steps == 0


@pytest.mark.lightning
def test_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        EMAMetricsCallback(keys={"loss": "loss_ema"})  # zero-code mode needs a parametrisation
    with pytest.raises(ValueError, match="exactly one of"):
        EMAMetricsCallback(keys={"loss": "loss_ema"}, alpha=0.5, span=3)
    with pytest.raises(ValueError, match="pass `keys` too"):
        EMAMetricsCallback(alpha=0.1)
    with pytest.raises(ValueError, match="pass `keys` too"):
        EMAMetricsCallback(half_life=10)
    with pytest.raises(ValueError, match="alpha"):
        EMAMetricsCallback(keys={"loss": "loss_ema"}, alpha=1.5)
    with pytest.raises(TypeError, match="`metrics`"):
        EMAMetricsCallback(metrics="train_loss")  # type: ignore[arg-type]  # a string, not a list of names
    with pytest.raises(TypeError, match="`keys`"):
        EMAMetricsCallback(keys={"loss": 1}, alpha=0.5)  # type: ignore[dict-item]


@pytest.mark.lightning
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reset_on_epoch": "False"}, TypeError, r"`reset_on_epoch` to be a bool, but got 'False'"),
        ({"prog_bar": 1}, TypeError, r"`prog_bar` to be a bool, but got 1"),
        ({"weight_by_batch_size": None}, TypeError, r"`weight_by_batch_size` to be a bool, but got None"),
        ({"keys": {"loss": "x"}, "alpha": 0.5, "adjust": "yes"}, TypeError, r"`adjust` to be a bool"),
        ({"exclude": None}, TypeError, r"`exclude` to be a sequence of strings, but got None"),
        ({"metrics": ["ok", 3]}, TypeError, r"`metrics` to be a sequence of strings, but got \['ok', 3\]"),
        ({"metrics": ["ok", ""]}, ValueError, r"`metrics` to hold non-empty strings, but got \['ok', ''\]"),
        ({"metrics": [""]}, ValueError, r"`metrics` to hold non-empty strings, but got \[''\]"),
        ({"exclude": [""]}, ValueError, r"`exclude` to hold non-empty strings, but got \[''\]"),
        ({"keys": ["loss"]}, TypeError, r"`keys` to be a mapping"),
        ({"keys": {1: "x"}, "alpha": 0.5}, TypeError, r"`keys` to map strings to strings, but got \{1: 'x'\}"),
        ({"keys": {"": "x"}, "alpha": 0.5}, ValueError, r"`keys` to map non-empty strings .* got \{'': 'x'\}"),
        ({"keys": {"loss": ""}, "alpha": 0.5}, ValueError, r"`keys` to map non-empty strings .* \{'loss': ''\}"),
        ({"keys": {"a": "x", "b": "x"}, "alpha": 0.5}, ValueError, r"each entry under its own name"),
        ({"sync": "always"}, ValueError, r"`sync` to be one of \['step', 'logged'\], but got 'always'"),
        ({"weight_key": "ntokens"}, ValueError, r"`weight_key`='ntokens' .* pass `keys` too"),
        ({"keys": {"loss": "x"}, "alpha": 0.5, "weight_key": 3}, TypeError, r"`weight_key` to be a string or None"),
        ({"keys": {"loss": "x"}, "alpha": 0.5, "weight_key": ""}, ValueError, r"`weight_key` to be a non-empty string"),
    ],
)
def test_constructor_refuses_wrong_types_and_values(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EMAMetricsCallback(**kwargs)


class TwoMetrics(Plain):
    def __init__(self) -> None:
        super().__init__(metric=True)
        self.other = EMAMetric(alpha=0.5)


@pytest.mark.lightning
def test_two_instances_driving_the_same_metric_say_how_to_split(tmp_path: Path) -> None:
    model = TwoMetrics()
    with pytest.raises(ValueError, match=r"both drive \['train_loss'\].*metrics=\[\.\.\.\] to one and exclude"):
        _fit(tmp_path, model, [EMAMetricsCallback(), EMAMetricsCallback(metrics=["train_loss"])])
    assert model.steps == 0
    with pytest.raises(ValueError, match=r"both log \['loss_ema'\]"):
        _fit(
            tmp_path,
            Plain(),
            [
                EMAMetricsCallback(keys={"loss": "loss_ema"}, alpha=0.5),
                EMAMetricsCallback(metrics=[], keys={"loss": "loss_ema"}, alpha=0.1),
            ],
        )
    # split without overlap: fine
    split = [EMAMetricsCallback(metrics=["train_loss"]), EMAMetricsCallback(exclude=["train_loss"])]
    _fit(tmp_path, TwoMetrics(), split)


@pytest.mark.lightning
def test_missing_lightning_internal_fails_at_setup_with_the_tested_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    monkeypatch.delattr(_LoggerConnector, "should_update_logs")
    model = Plain(metric=True)
    with pytest.raises(RuntimeError, match=r"should_update_logs.*tested with Lightning 2\.\d+ to 2\.\d+"):
        _fit(tmp_path, model, EMAMetricsCallback())
    assert model.steps == 0
