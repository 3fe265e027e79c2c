"""Support code of ``ema_metrics_tour.ipynb``: the Lightning module and the runs of the accumulation comparison.

The module lives here, not in a notebook cell, so that processes started by a DDP strategy can import it (a class
defined in a notebook cell cannot be pickled by reference). It reuses the data, the network and the raw-loss
recording of ``examples/lightning_demo.py``, and changes only what the comparison needs: plain SGD, a sequential
data order shared by every layout, and the raw loss also logged the way most modules do today,
``self.log("raw_loss", loss, on_step=True)``.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ema_metrics.lightning import EMAMetricsCallback

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES_DIR) not in sys.path:  # also runs in processes started by DDP, which import this module
    sys.path.insert(0, str(EXAMPLES_DIR))

import lightning_demo  # noqa: E402

Curve = list[tuple[int, float]]


def quiet() -> None:
    """Silence Lightning's banner and its CPU-only hints (the demo's own filter)."""
    lightning_demo._quiet()


class TourModule(lightning_demo.DemoModule):
    """The demo's MLP, trained with SGD on data in a fixed order, logging its raw loss as well as the EMA.

    ``training_step`` is the demo's (``self.train_loss = EMAMetric(...)``, logged as ``train_loss``, and every
    micro-batch's raw loss recorded to ``<record_dir>/rank<r>.jsonl``), followed by the usual
    ``self.log("raw_loss", loss, on_step=True)``.

    Args:
        world_size: number of processes; with more than one, each takes an interleaved shard of the data in order
            (a non-shuffling ``DistributedSampler``; run with ``use_distributed_sampler=False``), so one optimizer
            step sees the same samples whatever the number of processes and micro-batches.
        kwargs: arguments of ``lightning_demo.DemoModule`` (``half_life``, ``micro_batch``, ``train_size``,
            ``record_dir``, ``lr``, ``seed``).

    """

    def __init__(self, *, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world_size = world_size

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The demo's step, plus the raw loss logged the usual way."""
        loss: torch.Tensor = super().training_step(batch, batch_idx)
        self.log("raw_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD: the update depends only on the mean gradient of the step's samples."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        """Sequential micro-batches; with several processes, interleaved shards of the same order."""
        sampler: DistributedSampler[Any] | None = None
        if self.world_size > 1:
            sampler = DistributedSampler(
                self.train_data, num_replicas=self.world_size, rank=self.global_rank, shuffle=False
            )
        return DataLoader(self.train_data, batch_size=self.micro_batch, sampler=sampler, shuffle=False, drop_last=True)


@dataclass
class Run:
    """What one training run logged, read back from its files."""

    label: str
    accumulate: int
    devices: int
    micro_batch: int
    train_loss: Curve  # EMAMetric + EMAMetricsCallback, one point per optimizer step
    raw_loss: Curve  # self.log("raw_loss", loss, on_step=True)
    raw: list[dict[str, Any]]  # every micro-batch's loss, from every process
    fit_seconds: float


def read_logged(metrics_csv: Path, name: str) -> Curve:
    """(step, value) pairs of one metric from Lightning's ``metrics.csv``, in file order."""
    points: Curve = []
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            value = row.get(name, "")
            if value not in ("", None) and not math.isnan(float(value)):
                points.append((int(row["step"]), float(value)))
    return points


def fit(
    out: Path,
    *,
    accumulate: int,
    devices: int = 1,
    strategy: str = "ddp_spawn",
    effective_batch: int = 32,
    steps: int = 30,
    half_life: float = 5.0,
    lr: float = 0.05,
    seed: int = 0,
) -> Run:
    """Train ``steps`` optimizer steps of ``effective_batch`` samples each, split over processes and micro-batches.

    Args:
        out: folder for the CSV log and the raw-loss records (created).
        accumulate: ``accumulate_grad_batches``.
        devices: number of CPU processes.
        strategy: the DDP strategy when ``devices > 1``: ``"ddp_spawn"`` in a script, ``"ddp_notebook"`` in a
            notebook (Lightning refuses ``ddp_spawn`` in an interactive session).
        effective_batch: samples per optimizer step, over all processes and micro-batches.
        steps: optimizer steps (one epoch).
        half_life: half-life of the EMA, in optimizer steps.
        lr: SGD learning rate.
        seed: seed of the weights and the data.

    Returns:
        The curves read back from the CSV log and the raw per-micro-batch records.

    Raises:
        ValueError: If ``effective_batch`` is not a multiple of ``accumulate * devices``.

    """
    if effective_batch % (accumulate * devices):
        raise ValueError(f"effective_batch={effective_batch} is not a multiple of {accumulate=} x {devices=}")
    quiet()
    micro_batch = effective_batch // (accumulate * devices)
    record_dir = out / "raw_losses"
    record_dir.mkdir(parents=True, exist_ok=True)
    model = TourModule(
        world_size=devices,
        half_life=half_life,
        micro_batch=micro_batch,
        train_size=steps * effective_batch,
        record_dir=str(record_dir),
        lr=lr,
        seed=seed,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(out, name="", version="csv"),
        callbacks=[EMAMetricsCallback()],
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    metrics_csv = out / "csv" / "metrics.csv"
    layout = f"{devices} process{'es' if devices > 1 else ''} x accumulate {accumulate} x micro-batch {micro_batch}"
    return Run(
        label=layout,
        accumulate=accumulate,
        devices=devices,
        micro_batch=micro_batch,
        train_loss=read_logged(metrics_csv, "train_loss"),
        raw_loss=read_logged(metrics_csv, "raw_loss"),
        raw=lightning_demo.read_raw(record_dir),
        fit_seconds=seconds,
    )


def max_rel_diff(curves: Sequence[Curve]) -> float:
    """Largest ``|v - v_ref| / |v_ref|`` of every curve against the first, on the same steps.

    Raises:
        ValueError: If the curves are not logged on the same steps.

    """
    reference = dict(curves[0])
    worst = 0.0
    for curve in curves[1:]:
        if [s for s, _ in curve] != list(reference):
            raise ValueError("the curves are not logged on the same steps")
        worst = max(worst, *(abs(v - reference[s]) / abs(reference[s]) for s, v in curve))
    return worst


def step_means(raw: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Per optimizer step, the mean loss over all its samples (micro-batch losses weighted by their sizes)."""
    sums: dict[int, list[float]] = {}
    for r in raw:
        acc = sums.setdefault(int(r["step"]), [0.0, 0.0])
        acc[0] += r["loss"] * r["size"]
        acc[1] += r["size"]
    return {step: s / n for step, (s, n) in sorted(sums.items())}


def xy(curve: Curve) -> tuple[list[int], list[float]]:
    """The steps and the values of a curve, for ``plt.plot(*xy(curve))``."""
    return [s for s, _ in curve], [v for _, v in curve]


LAYOUTS: dict[str, tuple[int, int]] = {"A": (1, 1), "B": (1, 4), "C": (1, 16), "D": (2, 1), "E": (2, 2)}
"""The notebook's five layouts: name -> (processes, ``accumulate_grad_batches``)."""


def main() -> None:
    """Run the notebook's comparison of layouts as a script, where the 2-process runs use ``ddp_spawn``."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="ema_tour_"))
    runs = {}
    for name, (devices, accumulate) in LAYOUTS.items():
        runs[name] = fit(out / f"layout_{name}", accumulate=accumulate, devices=devices, strategy="ddp_spawn")
        print(f"{name}: {runs[name].label:45s} fit in {runs[name].fit_seconds:4.1f} s")
    print(f"max relative difference, EMA curves: {max_rel_diff([r.train_loss for r in runs.values()]):.1e}")
    print(f"max relative difference, raw curves: {max_rel_diff([r.raw_loss for r in runs.values()]):.1e}")
    print(f"logs in {out}")


if __name__ == "__main__":
    main()
