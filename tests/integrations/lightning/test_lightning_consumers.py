"""Everything the Trainer acts on is the pooled EMA, identical on every rank (issue: monitors, checkpoints, after fit).

One real fit per world size (1 process, and 2 ``ddp_spawn`` gloo processes), ``accumulate_grad_batches=2``, the EMA
logged as ``train_loss`` and monitored by ``ModelCheckpoint(every_n_train_steps=2)``, ``EarlyStopping`` (train-epoch
end) and ``ReduceLROnPlateau`` (step interval). A recorder callback, listed *before* ``EMAMetricsCallback``, and the
module's own ``on_train_batch_end`` record what they read after every optimizer step. Everything is compared with a
float64 oracle built from the per-sample losses that every rank recorded during training.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.ddp_utils import require_gloo  # noqa: E402
from tests.lightning_helpers import (  # noqa: E402
    DDP,
    N_FEATURES,
    IndexedData,
    ema_oracle,
    loader,
    read_csv_metric,
    read_records,
    write_records,
)

HALF_LIFE = 2.0
B, K = 2, 2  # batch size, accumulate_grad_batches
STEPS_PER_EPOCH, EPOCHS = 6, 2
REL = 1e-6  # float32 batch means against float64 per-sample sums


class Monitored(pl.LightningModule):
    """Linear regression; ``train_loss`` is an EMAMetric monitored by a ReduceLROnPlateau on every step."""

    def __init__(self, record_dir: str, world_size: int = 1, n_samples: int = 0, late: str = "") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.record_dir = record_dir
        self.world_size = world_size
        self.late = late
        if not late:
            self.train_loss = EMAMetric(half_life=HALF_LIFE)
        self.data = IndexedData(n_samples or STEPS_PER_EPOCH * K * B * world_size)
        self.seen: list[tuple[int, float]] = []
        self.plateau_inputs: list[float] = []

    def setup(self, stage: str) -> None:
        if self.late == "setup":
            self.train_loss = EMAMetric(half_life=HALF_LIFE)

    def configure_model(self) -> None:
        if self.late == "configure_model" and not hasattr(self, "train_loss"):
            self.train_loss = EMAMetric(half_life=HALF_LIFE)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, idx = batch
        per_sample = (self.layer(x).squeeze(-1) - y) ** 2
        loss = per_sample.mean()
        self.train_loss(loss, weight=len(idx))
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        rows = [(int(step), int(i), float(v)) for i, v in zip(idx, per_sample.detach(), strict=True)]
        folder = Path(self.record_dir) / "step"
        folder.mkdir(parents=True, exist_ok=True)
        write_records(str(folder), self.global_rank, rows)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if "train_loss" in self.trainer.callback_metrics and not self.trainer.fit_loop._should_accumulate():
            self.seen.append((_step(self.trainer), float(self.trainer.callback_metrics["train_loss"])))

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        self.plateau_inputs.append(float(metric))  # what ReduceLROnPlateau is fed
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.7, patience=1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss", "interval": "step"}}

    def train_dataloader(self) -> Any:
        return loader(self.data, B, self.world_size, self.global_rank if self.world_size > 1 else 0)


def _step(trainer: Any) -> int:
    """The optimizer step that just ended (read in ``on_train_batch_end``, before Lightning increments it)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class Recorder(pl.Callback):
    """Listed before EMAMetricsCallback: records what callbacks and the progress bar read after each step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.fit_loop._should_accumulate():
            self.rows.append(
                {
                    "step": _step(trainer),
                    "callback": float(trainer.callback_metrics["train_loss"]),
                    "pbar": float(trainer.progress_bar_metrics["train_loss"]),
                }
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        checkpoint = next(cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.ModelCheckpoint))
        stopping = next(cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.EarlyStopping))
        result = {
            "rows": self.rows,
            "plateau": pl_module.plateau_inputs,
            "module": pl_module.seen,
            "best_model_score": float(checkpoint.best_model_score),
            "best_model_path": checkpoint.best_model_path,
            "early_stopping_best": float(stopping.best_score),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "weights": [float(v) for v in torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])],
            "compute_after_fit": float(pl_module.train_loss.compute()),
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _trainer(
    root: Path, devices: int, callbacks: list[Any], epochs: int = EPOCHS, strategy: str = DDP, **kwargs: Any
) -> Any:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_epochs=epochs,
        accumulate_grad_batches=K,
        log_every_n_steps=3,
        logger=pl.loggers.CSVLogger(root / "logs", name="csv"),
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class Fit:
    """One monitored fit on ``devices`` processes, and what every rank recorded."""

    def __init__(self, root: Path, devices: int) -> None:
        self.root = root
        self.model = Monitored(str(root / "records"), world_size=devices)
        callbacks = [
            Recorder(str(root / "seen")),
            EMAMetricsCallback(),
            pl.callbacks.ModelCheckpoint(
                dirpath=root / "ckpt", monitor="train_loss", every_n_train_steps=2, save_top_k=1, mode="min"
            ),
            pl.callbacks.EarlyStopping(monitor="train_loss", check_on_train_epoch_end=True, patience=100),
        ]
        # spawned: what the main process holds after fit is rank 0's module, pickled back from a fresh interpreter
        _trainer(root, devices, callbacks, strategy="ddp_spawn").fit(self.model)
        self.ranks = [json.loads(p.read_text()) for p in sorted((root / "seen").glob("rank*.json"))]
        assert len(self.ranks) == devices
        self.per_step = read_records(root / "records" / "step")
        self.oracle = ema_oracle(self.per_step, HALF_LIFE)


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("consumers")

    @functools.cache
    def fit(devices: int) -> Fit:
        if devices > 1:
            require_gloo()
        return Fit(root / f"fit{devices}", devices)

    return fit


DEVICES = [
    pytest.param(1, marks=pytest.mark.lightning),
    pytest.param(2, marks=[pytest.mark.lightning, pytest.mark.ddp]),
]


@pytest.mark.parametrize("devices", DEVICES)
def test_every_consumer_sees_the_pooled_value_after_every_step(fits: Any, devices: int) -> None:
    fit = fits(devices)
    n_steps = STEPS_PER_EPOCH * EPOCHS
    assert sorted(fit.per_step) == list(range(n_steps))
    assert all(len(v) == K * B * devices for v in fit.per_step.values())  # every rank's samples of every step
    oracle = [fit.oracle[s] for s in range(n_steps)]
    for rank, seen in enumerate(fit.ranks):
        label = f"rank {rank} of {devices}"
        assert [r["step"] for r in seen["rows"]] == list(range(n_steps)), label
        # a callback listed before EMAMetricsCallback, the progress bar and the module's own hook
        assert [r["callback"] for r in seen["rows"]] == pytest.approx(oracle, rel=REL), label
        assert [r["pbar"] for r in seen["rows"]] == pytest.approx(oracle, rel=REL), label
        assert [v for _, v in seen["module"]] == pytest.approx(oracle, rel=REL), label
        # ReduceLROnPlateau (step interval) was fed the pooled value of every step
        assert seen["plateau"] == pytest.approx(oracle, rel=REL), label
    # the ranks received identical numbers, so they took identical decisions
    for key in ("rows", "plateau", "best_model_score", "early_stopping_best", "lr", "weights"):
        assert all(seen[key] == fit.ranks[0][key] for seen in fit.ranks), key


@pytest.mark.parametrize("devices", DEVICES)
def test_checkpoint_early_stopping_and_scheduler_decisions(fits: Any, devices: int) -> None:
    fit = fits(devices)
    n_steps = STEPS_PER_EPOCH * EPOCHS
    checked = [s for s in range(n_steps) if (s + 1) % 2 == 0]  # every_n_train_steps=2 checks after these steps
    best_step = min(checked, key=lambda s: fit.oracle[s])
    epoch_ends = [STEPS_PER_EPOCH * (e + 1) - 1 for e in range(EPOCHS)]
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05), mode="max", factor=0.7, patience=1
    )
    for s in range(n_steps):
        reference.step(fit.oracle[s])
    for seen in fit.ranks:
        assert seen["best_model_score"] == pytest.approx(fit.oracle[best_step], rel=REL)
        assert Path(seen["best_model_path"]).name == f"epoch={best_step // STEPS_PER_EPOCH}-step={best_step + 1}.ckpt"
        assert seen["early_stopping_best"] == pytest.approx(min(fit.oracle[s] for s in epoch_ends), rel=REL)
        assert seen["lr"] == reference.optimizer.param_groups[0]["lr"]
        assert seen["compute_after_fit"] == pytest.approx(fit.oracle[n_steps - 1], rel=REL)
    assert fit.ranks[0]["lr"] < 0.05  # the plateau scheduler did act


@pytest.mark.parametrize("devices", DEVICES)
def test_compute_after_fit_and_load_from_checkpoint_give_the_pooled_value(fits: Any, devices: int) -> None:
    fit = fits(devices)
    n_steps = STEPS_PER_EPOCH * EPOCHS
    # in this (main) process: the module ddp_spawn returned, or the one that was trained
    assert float(fit.model.train_loss.compute()) == pytest.approx(fit.oracle[n_steps - 1], rel=REL)
    path = fit.ranks[0]["best_model_path"]
    best_step = int(Path(path).stem.split("step=")[1]) - 1
    loaded = Monitored.load_from_checkpoint(path, record_dir=str(fit.root / "unused"))
    assert loaded.train_loss.ticks == best_step + 1
    assert float(loaded.train_loss.compute()) == pytest.approx(fit.oracle[best_step], rel=REL)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"]["train_loss._extra_state"]["replica"] is True


@pytest.mark.parametrize("saved_on", DEVICES)
@pytest.mark.parametrize("devices", [pytest.param(1), pytest.param(2, marks=pytest.mark.ddp)])
@pytest.mark.lightning
def test_fine_tune_from_a_checkpoint_continues_the_pooled_curve(
    fits: Any, tmp_path: Path, saved_on: int, devices: int
) -> None:
    if devices > 1:
        require_gloo()
    fit = fits(saved_on)
    path = fit.ranks[0]["best_model_path"]
    best_step = int(Path(path).stem.split("step=")[1]) - 1
    model = Monitored.load_from_checkpoint(
        path, record_dir=str(tmp_path / "records"), world_size=devices, n_samples=4 * K * B * devices
    )
    _trainer(tmp_path, devices, [EMAMetricsCallback()], epochs=1, enable_checkpointing=False).fit(model)
    new = read_records(tmp_path / "records" / "step")
    assert sorted(new) == list(range(4))
    history = {s: v for s, v in fit.per_step.items() if s <= best_step}
    history.update({best_step + 1 + s: v for s, v in new.items()})
    oracle = ema_oracle(history, HALF_LIFE)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert [s for s, _ in curve] == [2]  # log_every_n_steps=3
    assert [v for _, v in curve] == pytest.approx([oracle[best_step + 3]], rel=REL)
    assert float(model.train_loss.compute()) == pytest.approx(oracle[best_step + 4], rel=REL)
    if devices > 1:  # the test tells the pooled continuation from every rank keeping the checkpoint's past
        kept_everywhere = {s: v * (devices if s <= best_step else 1) for s, v in history.items()}
        wrong = ema_oracle(kept_everywhere, HALF_LIFE)[best_step + 4]
        assert float(model.train_loss.compute()) != pytest.approx(wrong, rel=1e-4)


@pytest.mark.lightning
@pytest.mark.parametrize("late", ["setup", "configure_model"])
def test_metrics_created_late_are_driven(tmp_path: Path, late: str) -> None:
    model = Monitored(str(tmp_path / "records"), late=late)
    assert not hasattr(model, "train_loss")
    _trainer(tmp_path, 1, [EMAMetricsCallback()], epochs=1, enable_checkpointing=False).fit(model)
    oracle = ema_oracle(read_records(tmp_path / "records" / "step"), HALF_LIFE)
    assert model.train_loss.ticks == STEPS_PER_EPOCH  # one tick per optimizer step, not per micro-batch
    assert [v for _, v in model.seen] == pytest.approx([oracle[s] for s in range(STEPS_PER_EPOCH)], rel=REL)
    assert np.isfinite(float(model.train_loss.compute()))


@pytest.mark.lightning
@pytest.mark.ddp
def test_rank_spread_is_logged_from_the_same_sync(tmp_path: Path) -> None:
    require_gloo()
    model = Monitored(str(tmp_path / "records"), world_size=2)
    _trainer(tmp_path, 2, [EMAMetricsCallback(rank_spread=True)], epochs=1, enable_checkpointing=False).fit(model)
    own = []
    for rank in range(2):
        path = tmp_path / "records" / "step" / f"rank{rank}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        per_step: dict[int, list[float]] = {}
        for step, _, loss in rows:
            per_step.setdefault(step, []).append(loss)
        own.append(ema_oracle(per_step, HALF_LIFE))
    logged = [2, 5]  # log_every_n_steps=3
    low = read_csv_metric(tmp_path / "logs", "train_loss/rank_min")
    high = read_csv_metric(tmp_path / "logs", "train_loss/rank_max")
    assert [s for s, _ in low] == [s for s, _ in high] == logged
    assert [v for _, v in low] == pytest.approx([min(o[s] for o in own) for s in logged], rel=REL)
    assert [v for _, v in high] == pytest.approx([max(o[s] for o in own) for s in logged], rel=REL)
    assert own[0][5] != pytest.approx(own[1][5], rel=1e-3)  # the ranks' EMAs differ
