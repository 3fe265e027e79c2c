"""A damaged or hand-edited callback entry fails with an error that names the entry and the metric, before training."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.lightning_helpers import N_FEATURES, IndexedData, loader  # noqa: E402

# an EMAMetric state vector: [num, den, finite, rejected, ticks, replica, scale, numel]
TICKS = 4


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.train_loss = EMAMetric(alpha=0.5)
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps += 1
        x, y, _ = batch
        loss = ((self.layer(x).squeeze(-1) - y) ** 2).mean()
        self.train_loss(loss)
        self.log("train_loss", self.train_loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return loader(IndexedData(8), 2)


def _fit(root: Path, epochs: int, ckpt_path: Path | None = None) -> Tiny:
    model = Tiny()
    callbacks: list[Any] = [EMAMetricsCallback()]
    if ckpt_path is None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root, filename="first"))
    pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=ckpt_path is None,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saved")
    _fit(root, epochs=1)
    return root / "first.ckpt"


def _rows(entry: dict[str, Any]) -> torch.Tensor:
    rows = entry["ranks"]["metrics"]["train_loss"]
    assert isinstance(rows, torch.Tensor)
    return rows


def _set(entry: dict[str, Any], index: tuple[int, int], value: float) -> None:
    _rows(entry)[index] = value


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "rows as lists": (
        lambda e: e["ranks"]["metrics"].update(train_loss=_rows(e).tolist()),
        r"expected a tensor of 1 rows .* but got list",
    ),
    "a row too short": (
        lambda e: e["ranks"]["metrics"].update(train_loss=_rows(e)[:, :-1]),
        r"expected a float vector of 8 values .* shape \(7,\)",
    ),
    "no world_size": (lambda e: e["ranks"].pop("world_size"), r"has no \['world_size'\]"),
    "world_size not matching the rows": (lambda e: e["ranks"].update(world_size=2), r"expected a tensor of 2 rows"),
    "world_size not an integer": (lambda e: e["ranks"].update(world_size="1"), r"'world_size' must be a positive"),
    "NaN sum": (lambda e: _set(e, (0, 0), math.nan), r"non-finite values"),
    "negative weight": (lambda e: _set(e, (0, 1), -1.0), r"must not be negative.*weight=-1\.0"),
    "fractional tick count": (lambda e: _set(e, (0, TICKS), 2.5), r"tick count of EMAMetric must be a non-negative"),
    "negative tick count": (lambda e: _set(e, (0, TICKS), -1.0), r"tick count of EMAMetric must be a non-negative"),
    "replica flag 3": (lambda e: _set(e, (0, TICKS + 1), 3.0), r"replica flag of EMAMetric must be 0 or 1"),
    "metrics not a dict": (lambda e: e["ranks"].update(metrics=[1, 2]), r"'metrics' must be a dict"),
    "tick_open not a bool": (lambda e: e["ranks"].update(tick_open="no"), r"'tick_open' and 'stepped' must be bools"),
}


@pytest.mark.lightning
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_damaged_entry_names_the_entry_and_metric(saved: Path, tmp_path: Path, edit: str) -> None:
    ckpt = torch.load(saved, weights_only=True)
    (entry,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMAMetricsCallback")]
    change, match = EDITS[edit]
    change(entry)
    damaged = tmp_path / "damaged.ckpt"
    torch.save(ckpt, damaged)
    with pytest.raises(ValueError, match=r"checkpoint entry 'EMAMetricsCallback.*'ranks'") as info:
        _fit(tmp_path, epochs=2, ckpt_path=damaged)
    assert info.match(match)
    entry_level = ("no world_size", "world_size not an integer", "metrics not a dict", "tick_open not a bool")
    if edit not in entry_level:  # a problem with one metric's rows names that metric
        assert "metric 'train_loss'" in str(info.value)


@pytest.mark.lightning
def test_undamaged_entry_resumes(saved: Path, tmp_path: Path) -> None:
    model = _fit(tmp_path, epochs=2, ckpt_path=saved)
    assert model.train_loss.ticks == 8  # 4 steps per epoch, the first epoch's from the checkpoint
