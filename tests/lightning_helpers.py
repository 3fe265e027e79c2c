"""Tiny Lightning modules, data and log readers shared by the Lightning tests (module level: they must pickle)."""

from __future__ import annotations

import csv
import gc
import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

N_FEATURES = 4

#: The multi-process strategy of the Lightning tests. ``ddp_fork`` runs Lightning's same multiprocessing launcher as
#: ``ddp_spawn`` (each rank fits in a new process, rank 0's results come back to the main process), but the processes
#: start in milliseconds with what the test process imported, where each spawned one spends seconds importing torch
#: and Lightning again (most of a 2-process test's time on a 2-core machine). What only spawning does (the module and
#: its metrics travel into fresh interpreters by pickle) is covered by the ``ddp_spawn`` fits of
#: ``test_lightning_consumers.py``.
DDP = "ddp_fork"


def _release_ddp_before_teardown() -> None:
    """Free the DDP wrapper while the process group still exists, in every process that imports these helpers.

    A `ddp_spawn` worker sometimes aborted at exit ("terminate called without an active exception", SIGABRT)
    after a successful fit: Lightning unwraps the DDP model in `DDPStrategy.teardown` and then destroys the process
    group, but the wrapper sits in a reference cycle and is only collected later, by which time its reducer's
    process group is gone. Collecting it first removes the race; nothing else about the run changes.
    """
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            strategies = importlib.import_module(f"{package}.strategies")
        except ModuleNotFoundError:
            continue
        cls = strategies.DDPStrategy
        if getattr(cls.teardown, "_releases_ddp", False):
            continue
        original = cls.teardown

        def teardown(self: Any, _original: Any = original) -> None:
            if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and self.lightning_module is not None:
                self.model = self.lightning_module
                gc.collect()
            _original(self)

        teardown._releases_ddp = True  # type: ignore[attr-defined]
        cls.teardown = teardown


_release_ddp_before_teardown()


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 * torch.randn(n, generator=g)
    return x, y


class IndexedData(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Synthetic regression data that also returns each sample's index, so per-sample losses can be recorded."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.x, self.y = make_data(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)


def loader(data: Dataset[Any], batch_size: int, world_size: int = 1, rank: int = 0) -> DataLoader[Any]:
    """Sequential loader; with several processes a non-shuffling DistributedSampler (interleaved indices)."""
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
    return DataLoader(data, batch_size=batch_size, sampler=sampler, shuffle=False)


def write_records(record_dir: str | None, rank: int, rows: list[tuple[int, int, float]]) -> None:
    """Append (global_step, sample_index, per-sample loss) rows for this rank."""
    if record_dir is None:
        return
    path = Path(record_dir) / f"rank{rank}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_records(record_dir: str | Path) -> dict[int, list[float]]:
    """Per optimizer step, the per-sample losses of every rank and micro-batch."""
    out: dict[int, list[float]] = {}
    for path in sorted(Path(record_dir).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            step, _, loss = json.loads(line)
            out.setdefault(int(step), []).append(float(loss))
    return out


def ema_oracle(per_step: dict[int, list[float]], half_life: float, adjust: bool = True) -> dict[int, float]:
    """Float64 debiased EMA over the per-step mean losses (weights = number of samples per step)."""
    beta = 0.5 ** (1.0 / half_life)
    alpha = 1.0 - beta
    s = w = 0.0
    out = {}
    for i, step in enumerate(sorted(per_step)):
        losses = np.asarray(per_step[step], dtype=np.float64)
        scale = 1.0 / alpha if (i == 0 and not adjust) else 1.0
        s = beta * s + scale * losses.sum()
        w = beta * w + scale * len(losses)
        out[step] = s / w
    return out


def read_csv_metric(log_dir: str | Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from every metrics.csv under ``log_dir``, in file order."""
    rows: list[tuple[int, float]] = []
    for path in sorted(Path(log_dir).rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                value = row.get(name, "")
                if value not in ("", None) and not math.isnan(float(value)):
                    rows.append((int(row["step"]), float(value)))
    return rows


def read_tb_metric(log_dir: str | Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar from every TensorBoard event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: list[tuple[int, float]] = []
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if name in acc.Tags().get("scalars", []):
            rows.extend((int(e.step), float(e.value)) for e in acc.Scalars(name))
    return rows
