"""Lightning demo: the raw per-micro-batch loss, the loss logged by ``EMAMetric`` + ``EMAMetricsCallback``, and the
validation loss, on one optimizer-step axis.

A real Lightning run on CPU: 2 processes (``strategy="ddp_spawn"``, gloo), ``accumulate_grad_batches=4``, a small
MLP on noisy synthetic regression data, over 2 epochs. The module smooths its training loss with
``self.train_loss = EMAMetric(half_life=...)`` logged ``on_step``; ``EMAMetricsCallback`` makes every logged point the
exact EMA over optimizer steps of the loss pooled over all micro-batches of all processes, continuous across the epoch
boundary. Every process also records its raw loss of every micro-batch in ``<out>/raw_losses/rank<r>.jsonl``
(Lightning itself logs nothing on accumulating micro-batches). After ``fit`` the main process reads the CSV log back
and draws ``<out>/ema_demo.png``.

Run:
    python examples/lightning_demo.py                     # 2 processes, accumulate 4, into runs/demo
    python examples/lightning_demo.py --devices 1 --accumulate 8 --out runs/demo1
    tensorboard --logdir runs/demo/tensorboard

The run replaces the ``csv``, ``tensorboard`` and ``raw_losses`` folders and ``ema_demo.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ema_metrics import EMAMetric
from ema_metrics.lightning import EMAMetricsCallback

N_FEATURES = 8
NOISE = 1.0  # standard deviation of the label noise: the per-micro-batch loss is visibly noisy


def _quiet() -> None:
    """Silence Lightning's banner and its CPU-only performance hints (also called in the spawned processes)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def make_data(n: int, seed: int) -> TensorDataset:
    """Noisy nonlinear regression: ``y = 2 sin(x @ u) + x @ v + noise``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N_FEATURES, generator=torch.Generator().manual_seed(1234)) / math.sqrt(N_FEATURES)
    v = torch.randn(N_FEATURES, generator=torch.Generator().manual_seed(4321)) / math.sqrt(N_FEATURES)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = 2.0 * torch.sin(2.0 * (x @ u)) + x @ v + NOISE * torch.randn(n, generator=g)
    return TensorDataset(x, y)


class DemoModule(pl.LightningModule):
    """A small MLP whose training loss is smoothed by an ``EMAMetric`` and whose raw losses are recorded."""

    def __init__(
        self,
        *,
        half_life: float,
        micro_batch: int,
        train_size: int,
        record_dir: str,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()
        )
        self.head = torch.nn.Linear(64, 1)
        self.train_loss = EMAMetric(half_life=half_life)  # half-life in optimizer steps, thanks to EMAMetricsCallback
        self.micro_batch = micro_batch
        self.lr = lr
        self.train_data = make_data(train_size, seed + 1)
        self.val_data = make_data(1024, seed + 2)
        self.record_dir = record_dir
        self._raw: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)).squeeze(-1)

    def setup(self, stage: str) -> None:
        _quiet()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.train_loss(loss, weight=len(y))  # one tick per optimizer step, pooled over micro-batches and ranks
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
        # the raw loss of this micro-batch, kept aside: Lightning logs nothing on accumulating micro-batches
        step = self.global_step  # optimizer steps done so far: the step this micro-batch belongs to
        micro = self._raw[-1]["micro_batch"] + 1 if self._raw and self._raw[-1]["step"] == step else 0
        self._raw.append(
            {"rank": self.global_rank, "step": step, "micro_batch": micro, "size": len(y), "loss": loss.item()}
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))

    def on_train_end(self) -> None:
        path = Path(self.record_dir) / f"rank{self.global_rank}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in self._raw))
        # Free the DDP wrapper while the process group still exists: collected after it (it sits in a reference
        # cycle), gloo can abort the worker at exit with "terminate called without an active exception".
        strategy = self.trainer.strategy
        if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
            strategy.model = self
            gc.collect()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        # Lightning wraps it with a shuffling DistributedSampler under DDP: each process gets its own shard
        return DataLoader(self.train_data, batch_size=self.micro_batch, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val_data, batch_size=256)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=2, help="number of CPU processes (ddp_spawn when > 1)")
    parser.add_argument("--accumulate", type=int, default=4, help="accumulate_grad_batches")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=60, help="optimizer steps per epoch")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch and process")
    parser.add_argument("--half-life", type=float, default=5.0, help="EMA half-life, in optimizer steps")
    parser.add_argument("--log-every", type=int, default=1, help="log_every_n_steps")
    parser.add_argument("--val-every", type=int, default=15, help="validation every this many optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    args = parser.parse_args(argv)
    if not 1 <= args.val_every <= args.steps_per_epoch:
        parser.error("--val-every must be between 1 and --steps-per-epoch")
    return args


def read_csv_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of ``train_loss`` and ``val_loss`` from Lightning's ``metrics.csv``, in file order."""
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            for name, points in curves.items():
                value = row.get(name, "")
                if value not in ("", None):
                    points.append((int(row["step"]), float(value)))
    return curves


def read_raw(record_dir: Path) -> list[dict[str, Any]]:
    """Every process's raw per-micro-batch records."""
    rows: list[dict[str, Any]] = []
    for path in sorted(record_dir.glob("rank*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines())
    return rows


def plot(
    raw: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float]]],
    png: Path,
    *,
    devices: int,
    accumulate: int,
    half_life: float,
    epoch_starts: Sequence[int] = (),
) -> None:
    """One figure on one optimizer-step axis: raw losses (scatter), smoothed loss (line), validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    xs = [r["step"] + r["micro_batch"] / accumulate for r in raw]
    ax.scatter(
        xs,
        [r["loss"] for r in raw],
        s=7,
        color="tab:blue",
        alpha=0.3,
        linewidths=0,
        label=f"raw loss of every micro-batch ({devices} process{'es' if devices > 1 else ''} x {accumulate}"
        " micro-batches per step)",
    )
    train = curves["train_loss"]
    ax.plot(
        [s for s, _ in train],
        [v for _, v in train],
        color="tab:red",
        linewidth=2,
        label=f"logged train_loss: EMAMetric(half_life={half_life:g}) + EMAMetricsCallback",
    )
    val = curves["val_loss"]
    ax.plot(
        [s for s, _ in val],
        [v for _, v in val],
        linestyle="--",
        marker="o",
        markersize=6,
        color="black",
        label="val_loss (one point per validation run)",
    )
    for i, step in enumerate(epoch_starts):
        ax.axvline(step, color="gray", linewidth=0.8, linestyle=":")
        ax.annotate(
            f"epoch {i + 1}", (step, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
            textcoords="offset points", fontsize=8, color="gray",
        )  # fmt: skip
    losses = sorted(r["loss"] for r in raw)
    if losses:  # keep the few largest raw losses from squashing the curves
        ax.set_ylim(0.0, 1.05 * max(losses[int(0.995 * (len(losses) - 1))], *(v for _, v in train + val)))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE loss")
    ax.set_title(
        f"Lightning on CPU, {_layout(devices)}, accumulate_grad_batches={accumulate}\n"
        "one exact smoothed point per optimizer step, pooled over all its micro-batches and processes",
        fontsize=11,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def _layout(devices: int) -> str:
    return f"{devices} processes (ddp_spawn, gloo)" if devices > 1 else "1 process"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, read the logs back, draw the figure; return the paths and the read-back curves."""
    args = parse_args(argv)
    _quiet()
    out = Path(args.out)
    csv_dir, tb_dir, record_dir, png = out / "csv", out / "tensorboard", out / "raw_losses", out / "ema_demo.png"
    for folder in (csv_dir, tb_dir, record_dir):
        shutil.rmtree(folder, ignore_errors=True)
    record_dir.mkdir(parents=True)
    png.unlink(missing_ok=True)

    batches_per_epoch = args.steps_per_epoch * args.accumulate  # training batches (micro-batches) per process
    model = DemoModule(
        half_life=args.half_life,
        micro_batch=args.micro_batch,
        train_size=batches_per_epoch * args.micro_batch * args.devices,
        record_dir=str(record_dir),
        seed=args.seed,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=args.log_every,
        val_check_interval=args.val_every * args.accumulate,  # counted in training batches, i.e. micro-batches
        num_sanity_val_steps=0,
        logger=[
            pl.loggers.CSVLogger(out, name="", version="csv"),
            pl.loggers.TensorBoardLogger(out, name="", version="tensorboard", default_hp_metric=False),
        ],
        callbacks=[EMAMetricsCallback()],
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model)
    fit_seconds = time.perf_counter() - start

    curves = read_csv_curves(csv_dir / "metrics.csv")
    raw = read_raw(record_dir)
    if not args.no_plot:
        plot(
            raw,
            curves,
            png,
            devices=args.devices,
            accumulate=args.accumulate,
            half_life=args.half_life,
            epoch_starts=[e * args.steps_per_epoch for e in range(args.epochs)],
        )
    return {
        "out": out,
        "csv_dir": csv_dir,
        "metrics_csv": csv_dir / "metrics.csv",
        "tensorboard_dir": tb_dir,
        "raw_dir": record_dir,
        "png": None if args.no_plot else png,
        "train_loss": curves["train_loss"],
        "val_loss": curves["val_loss"],
        "raw": raw,
        "fit_seconds": fit_seconds,
        "args": vars(args),
    }


if __name__ == "__main__":
    result = main()
    train_curve, val_curve = result["train_loss"], result["val_loss"]
    print(f"fit: {result['fit_seconds']:.1f} s, {len(result['raw'])} raw micro-batch losses recorded")
    (first_step, first), (last_step, last) = train_curve[0], train_curve[-1]
    print(f"train_loss (smoothed, read back from the CSV): {len(train_curve)} logged optimizer steps,")
    print(f"  {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    print("val_loss: " + ", ".join(f"step {s}: {v:.4f}" for s, v in val_curve))
    print(f"CSV log:         {result['metrics_csv']}")
    print(f"TensorBoard log: {result['tensorboard_dir']}  (tensorboard --logdir {result['tensorboard_dir']})")
    print(f"raw losses:      {result['raw_dir']}")
    print(f"figure:          {result['png']}")
