"""Zero-code mode, several callback instances and ``update()``-fed metrics, against float64 oracles.

The zero-code metric smooths the ``training_step`` output exactly as returned (Lightning divides the loss by
``accumulate_grad_batches`` only afterwards), skips batches whose ``training_step`` returns ``None``, and can take each
micro-batch's weight from an output entry. The oracle is rebuilt from the values the module recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.ddp_utils import require_gloo  # noqa: E402
from tests.lightning_helpers import DDP, N_FEATURES, IndexedData, loader, read_csv_metric  # noqa: E402

HALF_LIFE = 2.0


class ZeroCode(pl.LightningModule):
    """Returns ``{"loss", "ntokens"}``; records (step, raw loss, weight) per micro-batch; may skip or use bf16."""

    def __init__(
        self, record_dir: str, n_samples: int, batch_size: int = 3, world_size: int = 1, skip: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.record_dir = record_dir
        self.batch_size = batch_size
        self.world_size = world_size
        self.skip = skip
        self.data = IndexedData(n_samples)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, idx = batch
        loss = ((self.layer(x.to(self.dtype)).squeeze(-1) - y.to(self.dtype)) ** 2).mean()
        ntokens = (idx % 4 + 1).sum()  # a per-sample "token count", different in every micro-batch
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        skipped = batch_idx in self.skip
        row = [int(step), float(loss.detach().double()), len(idx), int(ntokens), skipped]
        with (Path(self.record_dir) / f"rank{self.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return None if skipped else {"loss": loss, "ntokens": ntokens}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> Any:
        return loader(self.data, self.batch_size, self.world_size, self.global_rank if self.world_size > 1 else 0)


def _rows(record_dir: Path) -> list[list[Any]]:
    return [json.loads(line) for p in sorted(record_dir.glob("rank*.jsonl")) for line in p.read_text().splitlines()]


def _oracle(rows: list[list[Any]], weight: str, k: int = 1) -> dict[int, float]:
    """Float64 EMA over optimizer steps of the weighted micro-batch losses (skipped micro-batches left out)."""
    beta = 0.5 ** (1.0 / HALF_LIFE)
    steps = sorted({r[0] for r in rows})
    s = w = 0.0
    out = {}
    for step in steps:
        for _, loss, n, ntokens, skipped in (r for r in rows if r[0] == step):
            if not skipped:
                wt = {"batch": n, "tokens": ntokens}[weight]
                s, w = s + wt * loss, w + wt
        out[step] = s / w
        s, w = beta * s, beta * w
    return out


def _trainer(
    root: Path, callbacks: list[Any], accumulate: int, devices: int = 1, max_epochs: int = 1, **kwargs: Any
) -> Any:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=DDP if devices > 1 else "auto",
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(root / "logs", name="csv"),
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.lightning
def test_bf16_loss_is_smoothed_exactly_as_returned(tmp_path: Path) -> None:
    """bf16-true, accumulate 3: the smoothed loss is the returned bf16 value, not Lightning's loss / 3 times 3."""
    (tmp_path / "rec").mkdir()
    model = ZeroCode(str(tmp_path / "rec"), n_samples=90)  # 30 micro-batches of 3, 10 optimizer steps
    callback = EMAMetricsCallback(keys={"loss": "loss_ema"}, half_life=HALF_LIFE)
    _trainer(tmp_path, [callback], accumulate=3, precision="bf16-true").fit(model)
    rows = _rows(tmp_path / "rec")
    oracle = _oracle(rows, "batch")
    curve = read_csv_metric(tmp_path / "logs", "loss_ema")
    assert [s for s, _ in curve] == list(range(10))
    assert [v for _, v in curve] == pytest.approx([oracle[s] for s in range(10)], rel=1e-12)
    # the test can tell: re-multiplying Lightning's bf16 division rounds
    divided = [float((torch.tensor(r[1], dtype=torch.bfloat16) / 3 * 3).double()) for r in rows]
    assert divided != [r[1] for r in rows]


@pytest.mark.lightning
def test_skipped_batches_are_no_observation_and_weights_come_from_a_key(tmp_path: Path) -> None:
    (tmp_path / "rec").mkdir()
    model = ZeroCode(str(tmp_path / "rec"), n_samples=24, skip=(1, 4, 5))  # batch 5 skips a whole step's second half
    callbacks = [
        EMAMetricsCallback(keys={"loss": "loss_by_tokens"}, weight_key="ntokens", half_life=HALF_LIFE),
        EMAMetricsCallback(metrics=[], keys={"loss": "loss_by_batch"}, half_life=HALF_LIFE),
    ]
    _trainer(tmp_path, callbacks, accumulate=2).fit(model)
    rows = _rows(tmp_path / "rec")
    assert sum(r[4] for r in rows) == 3
    for name, weight in (("loss_by_tokens", "tokens"), ("loss_by_batch", "batch")):
        oracle = _oracle(rows, weight)
        curve = read_csv_metric(tmp_path / "logs", name)
        assert [s for s, _ in curve] == [0, 1, 2, 3], name
        assert [v for _, v in curve] == pytest.approx([oracle[s] for s in range(4)], rel=1e-6), name
    by_tokens, by_batch = (read_csv_metric(tmp_path / "logs", n)[-1][1] for n in ("loss_by_tokens", "loss_by_batch"))
    assert by_tokens != pytest.approx(by_batch, rel=1e-4)  # the weights matter


@pytest.mark.lightning
@pytest.mark.ddp
@pytest.mark.slow
def test_token_weighted_zero_code_on_two_processes(tmp_path: Path) -> None:
    require_gloo()
    (tmp_path / "rec").mkdir()
    model = ZeroCode(str(tmp_path / "rec"), n_samples=48, world_size=2)
    callback = EMAMetricsCallback(keys={"loss": "loss_ema"}, weight_key="ntokens", half_life=HALF_LIFE)
    _trainer(tmp_path, [callback], accumulate=2, devices=2).fit(model)
    rows = _rows(tmp_path / "rec")
    oracle = _oracle(rows, "tokens")
    curve = read_csv_metric(tmp_path / "logs", "loss_ema")
    assert [s for s, _ in curve] == [0, 1, 2, 3]
    assert [v for _, v in curve] == pytest.approx([oracle[s] for s in range(4)], rel=1e-6)


class UpdateFed(pl.LightningModule):
    """Feeds its EMA with ``update()`` (never called) and logs the metric object."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.train_loss = EMAMetric(half_life=HALF_LIFE)
        self.losses: dict[int, list[tuple[float, int]]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, idx = batch
        loss = ((self.layer(x).squeeze(-1) - y) ** 2).mean()
        self.train_loss.update(loss, weight=len(idx))
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.losses.setdefault(int(step), []).append((float(loss.detach()), len(idx)))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> Any:
        return loader(IndexedData(12), 2)


@pytest.mark.lightning
def test_update_fed_metric_logs_every_logged_step_of_every_epoch(tmp_path: Path) -> None:
    model = UpdateFed()
    _trainer(tmp_path, [EMAMetricsCallback()], accumulate=2, max_epochs=2).fit(model)
    beta = 0.5 ** (1.0 / HALF_LIFE)
    s = w = 0.0
    oracle = []
    for step in sorted(model.losses):
        s = beta * s + sum(v * n for v, n in model.losses[step])
        w = beta * w + sum(n for _, n in model.losses[step])
        oracle.append(s / w)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert [st for st, _ in curve] == list(range(6))  # 3 steps per epoch; epoch 2's first step too
    assert [v for _, v in curve] == pytest.approx(oracle, rel=1e-6)
