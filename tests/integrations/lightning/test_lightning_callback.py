"""EMAMetricsCallback (``lightning.pytorch`` flavour) against independent references.

Every check reads the logged curve back from the CSV (or TensorBoard) files written by Lightning's loggers and
compares it with a float64 oracle recomputed from the per-sample values recorded during training, or compares a
single run with a run resumed from a checkpoint (bit-exact where the layout is the same).

Lightning facts the tests rely on (2.x): a Metric logged with ``on_step=True`` is logged through its
``_forward_cache``; the ``step`` column is ``fit_loop.epoch_loop._batches_that_stepped`` (0-based optimizer steps in
automatic optimization, batches in manual optimization); a step is logged when ``(step + 1) % log_every_n_steps ==
0``; nothing is logged on accumulating micro-batches.
"""

from __future__ import annotations

import functools
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

import ema_metrics  # noqa: E402
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
    read_tb_metric,
    write_records,
)

HALF_LIFE = 3.0
B = 2
REL = 1e-6  # the module's batch mean is float32; the oracle sums the recorded per-sample values in float64

multi_process = [pytest.mark.lightning, pytest.mark.slow, pytest.mark.ddp]


# ------------------------------------------------------------ modules
class Regression(pl.LightningModule):
    """Linear regression; records each sample's squared error keyed by optimizer step and by micro-batch."""

    def __init__(
        self,
        record_dir: str | None = None,
        *,
        n_samples: int,
        batch_size: int = B,
        world_size: int = 1,
        metric: bool = True,
        sync_on_forward: bool | None = None,
        dict_output: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.has_metric = metric
        if metric:
            self.train_loss = EMAMetric(half_life=HALF_LIFE)
            self.train_loss.sync_on_forward = sync_on_forward
        self.record_dir = record_dir
        self.batch_size = batch_size
        self.world_size = world_size
        self.dict_output = dict_output
        self.data = IndexedData(n_samples)

    def errors(self, batch: Any, layer: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, idx = batch
        return (layer or self.layer)(x).squeeze(-1) - y, idx

    def record(self, name: str, key: int, idx: Any, values: torch.Tensor) -> None:
        """Append ``(key, sample index, value)`` rows to ``record_dir/name/rank<r>.jsonl``."""
        if self.record_dir is None:
            return
        folder = Path(self.record_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = [(int(key), int(i), float(v)) for i, v in zip(idx, values.detach().reshape(-1), strict=True)]
        write_records(str(folder), self.global_rank, rows)

    def observe(self, err: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        per_sample = err**2
        loss = per_sample.mean()
        if self.has_metric:
            self.train_loss(loss, weight=len(idx))
            self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
        loop = self.trainer.fit_loop
        self.record("step", loop.epoch_loop._batches_that_stepped, idx, per_sample)
        self.record("micro", loop.total_batch_idx, idx, per_sample)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.observe(*self.errors(batch))
        return {"loss": loss} if self.dict_output else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)

    def train_dataloader(self) -> Any:
        rank = self.global_rank if self.world_size > 1 else 0
        return loader(self.data, self.batch_size, self.world_size, rank)


class ThreeMetrics(Regression):
    """Three EMA metrics, two of them nested in a ModuleDict: loss, absolute error and hit rate (|error| < 1)."""

    def __init__(self, record_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(record_dir, **kwargs)
        self.stats = torch.nn.ModuleDict(
            {"abs_err": EMAMetric(half_life=HALF_LIFE), "hit": EMAMetric(half_life=HALF_LIFE)}
        )

    def observe(self, err: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = super().observe(err, idx)
        hit = (err.abs() < 1).to(torch.float32)
        self.stats["abs_err"](err.abs())  # one observation per sample, weight 1 each
        self.stats["hit"](hit)
        self.log("abs_err", self.stats["abs_err"], on_step=True, on_epoch=False)
        self.log("hit", self.stats["hit"], on_step=True, on_epoch=False)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.record("abs", step, idx, err.abs())
        self.record("hit", step, idx, hit)
        return loss


class TwoLosses(Regression):
    """A second EMA of the same loss, ``raw_loss``, meant to be left out of the callback."""

    def __init__(self, record_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(record_dir, **kwargs)
        self.raw_loss = EMAMetric(half_life=HALF_LIFE)

    def observe(self, err: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = super().observe(err, idx)
        self.raw_loss(loss, weight=len(idx))
        self.log("raw_loss", self.raw_loss, on_step=True, on_epoch=False)
        return loss


class ManualAccumulation(Regression):
    """Manual optimization, accumulating by hand: ``opt.step()`` when ``(batch_idx + 1) % k == 0`` in the epoch."""

    def __init__(self, record_dir: str | None = None, *, k: int, **kwargs: Any) -> None:
        super().__init__(record_dir, **kwargs)
        self.automatic_optimization = False
        self.k = k

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        err, idx = self.errors(batch)
        per_sample = err**2
        loss = per_sample.mean()
        self.manual_backward(loss / self.k)
        self.train_loss(loss, weight=len(idx))
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
        stepped = (batch_idx + 1) % self.k == 0
        if stepped:
            opt.step()
            opt.zero_grad()
        key = self.trainer.fit_loop.total_batch_idx
        self.record("batch", key, idx, per_sample)
        self.record("stepped", key, [0], torch.tensor([float(stepped)]))


class TwoOptimizers(Regression):
    """GAN-style manual optimization: two players, each with its optimizer, both stepping in every batch."""

    def __init__(self, record_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(record_dir, **kwargs)
        self.automatic_optimization = False
        torch.manual_seed(1)
        self.other = torch.nn.Linear(N_FEATURES, 1)

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.layer.parameters(), lr=0.05), torch.optim.SGD(self.other.parameters(), lr=0.1)]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        key = self.trainer.fit_loop.total_batch_idx
        for layer, opt in zip((self.layer, self.other), self.optimizers(), strict=True):
            err, idx = self.errors(batch, layer)
            per_sample = err**2
            loss = per_sample.mean()
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            self.train_loss(loss, weight=len(idx))  # both players' losses pool into the batch's one tick
            self.record("batch", key, idx, per_sample)
        self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)


class WithValidation(Regression):
    """Also validates; validation losses are recorded under the index of the last optimizer step before them."""

    def __init__(self, record_dir: str | None = None, *, accumulate: int, **kwargs: Any) -> None:
        super().__init__(record_dir, **kwargs)
        self.accumulate = accumulate
        self.train_batches_seen = 0  # counted here, independently of Lightning's counters
        self.val_data = IndexedData(6, seed=1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.train_batches_seen += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        err, idx = self.errors(batch)
        per_sample = err**2
        self.log("val_loss", per_sample.mean(), batch_size=len(idx))
        self.record("val", self.train_batches_seen // self.accumulate - 1, idx, per_sample)

    def val_dataloader(self) -> Any:
        return loader(self.val_data, 4)  # batches of 4 and 2: the logged mean must weight them by size


class CollectiveCounter(pl.Callback):
    """Records every torch.distributed collective: the training batch it ran in, and whether ema_metrics issued it.

    A batch's window runs from its ``on_train_batch_start`` to the next one: EMAMetricsCallback syncs when Lightning
    writes the step's metrics to the loggers, after the ``on_train_batch_end`` hooks. Each rank writes its events
    to ``out_dir/rank<r>.json`` at teardown.
    """

    NAMES = (
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_gather_object",
        "all_reduce",
        "all_to_all",
        "barrier",
        "broadcast",
        "broadcast_object_list",
        "gather",
        "reduce",
        "reduce_scatter_tensor",
        "scatter",
    )

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.batch: int | None = None
        self.events: list[tuple[int | None, str, bool]] = []
        self.originals: dict[str, Any] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        package = str(Path(ema_metrics.__file__).resolve().parent)
        for name in self.NAMES:
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, self._counted(name, self.originals[name], package))

    def _counted(self, name: str, original: Any, package: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            from_ema = any(str(Path(f.filename).resolve()).startswith(package) for f in traceback.extract_stack())
            self.events.append((self.batch, name, from_ema))
            return original(*args, **kwargs)

        return counted

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batch = trainer.fit_loop.total_batch_idx

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.batch = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.events))


# ------------------------------------------------------------ helpers
def _trainer(
    root: Path,
    *,
    devices: int = 1,
    epochs: int = 1,
    accumulate: int = 1,
    log_every: int = 2,
    callbacks: list[Any] | None = None,
    tensorboard: bool = False,
    **kwargs: Any,
) -> Any:
    loggers = [pl.loggers.CSVLogger(root / "logs", name="csv")]
    if tensorboard:
        loggers.append(pl.loggers.TensorBoardLogger(root / "logs", name="tb"))
    settings: dict[str, Any] = {
        "limit_val_batches": 0,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(kwargs)
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=DDP if devices > 1 else "auto",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every,
        logger=loggers,
        callbacks=callbacks or [],
        use_distributed_sampler=False,
        **settings,
    )


def _records(root: Path, name: str) -> dict[int, list[float]]:
    return read_records(root / "records" / name)


def _logged_steps(n_steps: int, log_every: int) -> list[int]:
    return [s for s in range(n_steps) if (s + 1) % log_every == 0]


def _values(curve: list[tuple[int, float]]) -> list[float]:
    return [v for _, v in curve]


def _steps(curve: list[tuple[int, float]]) -> list[int]:
    return [s for s, _ in curve]


def _per_epoch_oracle(per_step: dict[int, list[float]], steps_per_epoch: int) -> dict[int, float]:
    """The oracle restarted at every epoch."""
    out: dict[int, float] = {}
    for start in range(0, max(per_step) + 1, steps_per_epoch):
        out.update(ema_oracle({s: v for s, v in per_step.items() if start <= s < start + steps_per_epoch}, HALF_LIFE))
    return out


# ------------------------------------------------------------ 1-2: epochs, resume
STEPS = 5  # optimizer steps per epoch; odd, so that the first step of epoch 2 (step 5) is a logged step
LOG_EVERY = 2
N_RESUME = STEPS * 4 * B  # 4 micro-batches of B per step: accumulate 4 on 1 process, accumulate 2 on 2 processes
ZERO_CODE = {"loss": "train_loss_ema"}


@dataclass
class Run:
    root: Path
    model: Any
    ckpt: Path | None = None

    def curve(self, name: str) -> list[tuple[int, float]]:
        return read_csv_metric(self.root / "logs", name)


class ResumeRuns:
    """The runs of the continuity and resume tests, each made once per test module and only when needed.

    ``full<d>``: 2 epochs in one run on ``d`` processes. ``first<d>``: epoch 1 only, checkpointed at its end by
    ModelCheckpoint. ``resumed<a><b>``: ``first<a>``'s checkpoint resumed for epoch 2 on ``b`` processes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _fit(self, name: str, devices: int, epochs: int, ckpt_path: Path | None = None, save: bool = False) -> Run:
        root = self.root / name
        model = Regression(str(root / "records"), n_samples=N_RESUME, world_size=devices, dict_output=True)
        callbacks: list[Any] = [EMAMetricsCallback(keys=ZERO_CODE, half_life=HALF_LIFE)]
        if save:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="first"))
        trainer = _trainer(
            root,
            devices=devices,
            epochs=epochs,
            accumulate=4 // devices,
            log_every=LOG_EVERY,
            callbacks=callbacks,
            enable_checkpointing=save,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return Run(root, model, root / "ckpt" / "first.ckpt" if save else None)

    @functools.cache  # noqa: B019 - one instance per test module
    def full(self, devices: int) -> Run:
        return self._fit(f"full{devices}", devices, epochs=2)

    @functools.cache  # noqa: B019
    def first(self, devices: int) -> Run:
        return self._fit(f"first{devices}", devices, epochs=1, save=True)

    @functools.cache  # noqa: B019
    def resumed(self, saved_on: int, devices: int) -> Run:
        ckpt = self.first(saved_on).ckpt
        assert ckpt is not None
        assert ckpt.is_file()
        return self._fit(f"resumed{saved_on}{devices}", devices, epochs=2, ckpt_path=ckpt)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ResumeRuns:
    return ResumeRuns(tmp_path_factory.mktemp("resume"))


@pytest.mark.lightning
def test_curve_continues_across_epochs_and_survives_the_final_reset(runs: ResumeRuns) -> None:
    """Epoch 2 continues epoch 1's EMA (Lightning's reset() is undone); compute() after fit still works."""
    run = runs.full(1)
    per_step = _records(run.root, "step")
    assert sorted(per_step) == list(range(2 * STEPS))
    assert all(len(v) == 4 * B for v in per_step.values())
    oracle = ema_oracle(per_step, HALF_LIFE)
    restarted = _per_epoch_oracle(per_step, STEPS)
    expected = _logged_steps(2 * STEPS, LOG_EVERY)
    assert STEPS in expected  # the first step of epoch 2 is logged
    for name in ("train_loss", "train_loss_ema"):  # the module's metric, and the zero-code one
        curve = run.curve(name)
        assert _steps(curve) == expected, name
        assert _values(curve) == pytest.approx([oracle[s] for s in expected], rel=REL), name
        # the test can tell a continued curve from a restarted one
        assert dict(curve)[STEPS] != pytest.approx(restarted[STEPS], rel=1e-3), name
    # Lightning reset the logged metric after the last epoch; the callback restored it
    assert run.model.train_loss.ticks == 2 * STEPS
    assert float(run.model.train_loss.compute()) == pytest.approx(oracle[2 * STEPS - 1], rel=REL)


@pytest.mark.lightning
def test_reset_on_epoch_restarts_each_epoch(tmp_path: Path) -> None:
    model = Regression(str(tmp_path / "records"), n_samples=N_RESUME, dict_output=True)
    callback = EMAMetricsCallback(keys=ZERO_CODE, half_life=HALF_LIFE, reset_on_epoch=True)
    trainer = _trainer(tmp_path, epochs=2, accumulate=4, log_every=LOG_EVERY, callbacks=[callback])
    trainer.fit(model)
    per_step = _records(tmp_path, "step")
    restarted = _per_epoch_oracle(per_step, STEPS)
    continued = ema_oracle(per_step, HALF_LIFE)
    expected = _logged_steps(2 * STEPS, LOG_EVERY)
    for name in ("train_loss", "train_loss_ema"):
        curve = read_csv_metric(tmp_path / "logs", name)
        assert _steps(curve) == expected, name
        assert _values(curve) == pytest.approx([restarted[s] for s in expected], rel=REL), name
        assert dict(curve)[STEPS] != pytest.approx(continued[STEPS], rel=1e-3), name
    # after fit, the metric holds the last epoch's EMA (not Lightning's reset state)
    assert model.train_loss.ticks == STEPS
    assert float(model.train_loss.compute()) == pytest.approx(restarted[2 * STEPS - 1], rel=REL)


@pytest.mark.lightning
def test_one_callback_instance_for_two_fits(tmp_path: Path) -> None:
    """A second fit with the same callback starts from scratch (nothing of the first fit's EMA leaks into it)."""
    callback = EMAMetricsCallback(keys=ZERO_CODE, half_life=HALF_LIFE)
    curves = []
    for i in range(2):
        root = tmp_path / f"fit{i}"
        model = Regression(str(root / "records"), n_samples=4 * STEPS * B, dict_output=True)
        _trainer(root, accumulate=4, log_every=1, callbacks=[callback]).fit(model)
        oracle = ema_oracle(_records(root, "step"), HALF_LIFE)
        for name in ("train_loss", "train_loss_ema"):
            curve = read_csv_metric(root / "logs", name)
            assert _steps(curve) == list(range(STEPS)), name
            assert _values(curve) == pytest.approx([oracle[s] for s in range(STEPS)], rel=REL), name
            curves.append(curve)
    assert curves[:2] == curves[2:]  # same model, same data: the very same curves


def _check_checkpoint(path: Path, world_size: int) -> dict[str, torch.Tensor]:
    """The checkpoint loads with ``weights_only=True`` and holds every rank's state of every driven metric."""
    ckpt = torch.load(path, weights_only=True)
    (entry,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMAMetricsCallback")]
    assert entry["ranks"]["world_size"] == world_size
    metrics: dict[str, torch.Tensor] = entry["ranks"]["metrics"]
    assert sorted(metrics) == ["keys/loss", "train_loss"]
    for rows in metrics.values():
        assert rows.shape[0] == world_size
        assert rows.dtype == torch.float64
    return metrics


def _union(*runs: Run, name: str) -> list[tuple[int, float]]:
    return [point for run in runs for point in run.curve(name)]


@pytest.mark.lightning
def test_exact_resume_single_process(runs: ResumeRuns) -> None:
    full, first, resumed = runs.full(1), runs.first(1), runs.resumed(1, 1)
    assert first.ckpt is not None
    _check_checkpoint(first.ckpt, world_size=1)
    for name in ("train_loss", "train_loss_ema"):
        assert _steps(first.curve(name)) == _logged_steps(STEPS, LOG_EVERY), name
        assert _union(first, resumed, name=name) == full.curve(name), name  # bit-exact
    assert float(resumed.model.train_loss.compute()) == float(full.model.train_loss.compute())


@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.ddp
def test_exact_resume_two_processes(runs: ResumeRuns) -> None:
    require_gloo()
    full, first, resumed = runs.full(2), runs.first(2), runs.resumed(2, 2)
    assert first.ckpt is not None
    metrics = _check_checkpoint(first.ckpt, world_size=2)
    # each rank's own state is saved: the two ranks saw different samples
    assert not torch.equal(metrics["train_loss"][0], metrics["train_loss"][1])
    per_step = _records(full.root, "step")
    assert sorted(per_step) == list(range(2 * STEPS))
    assert all(len(v) == 4 * B for v in per_step.values())
    oracle = ema_oracle(per_step, HALF_LIFE)
    expected = _logged_steps(2 * STEPS, LOG_EVERY)
    for name in ("train_loss", "train_loss_ema"):
        curve = full.curve(name)
        assert _steps(curve) == expected, name
        assert _values(curve) == pytest.approx([oracle[s] for s in expected], rel=REL), name
        assert _union(first, resumed, name=name) == curve, name  # bit-exact


@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.ddp
def test_resume_on_another_number_of_processes(runs: ResumeRuns) -> None:
    """2 -> 1: rank 0 takes the pooled state; 1 -> 2: rank 0 keeps it and rank 1 starts from zero."""
    require_gloo()
    expected = _logged_steps(2 * STEPS, LOG_EVERY)
    for saved_on, devices in ((2, 1), (1, 2)):
        first, resumed, full = runs.first(saved_on), runs.resumed(saved_on, devices), runs.full(saved_on)
        per_step = {**_records(first.root, "step"), **_records(resumed.root, "step")}
        assert sorted(per_step) == list(range(2 * STEPS))
        assert all(len(v) == 4 * B for v in per_step.values())
        oracle = ema_oracle(per_step, HALF_LIFE)
        for name in ("train_loss", "train_loss_ema"):
            label = f"{saved_on} -> {devices} processes, {name}"
            curve = _union(first, resumed, name=name)
            assert _steps(curve) == expected, label
            assert _values(curve) == pytest.approx([oracle[s] for s in expected], rel=REL), label
            # the same curve as the uninterrupted run (which used another layout for epoch 2: float32 rounding)
            assert _values(curve) == pytest.approx(_values(full.curve(name)), rel=1e-5), label


# ------------------------------------------------------------ 3: one sync
@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("sync", ["step", "logged"])
def test_one_collective_per_step_for_all_metrics_of_all_instances(tmp_path: Path, sync: str) -> None:
    """3 module metrics + 1 zero-code metric in a second instance, 2 processes, accumulate 2.

    ``sync="step"``: exactly one all_reduce per optimizer step (at its last micro-batch), for both instances
    together; ``sync="logged"``: one per logged step. Plus one after fit, which leaves every rank the pooled state.
    """
    require_gloo()
    n_steps, k, log_every = 7, 2, 3
    model = ThreeMetrics(str(tmp_path / "records"), n_samples=n_steps * k * B * 2, world_size=2, dict_output=True)
    callbacks = [
        EMAMetricsCallback(sync=sync),
        EMAMetricsCallback(metrics=[], keys=ZERO_CODE, half_life=HALF_LIFE, sync=sync),
        CollectiveCounter(str(tmp_path / "events")),
    ]
    trainer = _trainer(tmp_path, devices=2, accumulate=k, log_every=log_every, callbacks=callbacks)
    trainer.fit(model)

    logged = _logged_steps(n_steps, log_every)
    assert logged == [2, 5]
    synced = logged if sync == "logged" else list(range(n_steps))
    last_micro_batch = [(s + 1) * k - 1 for s in synced]
    for rank in range(2):
        events = [tuple(e) for e in json.loads((tmp_path / "events" / f"rank{rank}.json").read_text())]
        assert any(not from_ema for _, _, from_ema in events)  # the counter does see Lightning's own collectives
        from_ema = [(batch, name) for batch, name, ema in events if ema]
        expected = [(b, "all_reduce") for b in last_micro_batch] + [(None, "all_reduce")]
        assert from_ema == expected, f"rank {rank}: {events}"

    oracles = {
        "train_loss": ema_oracle(_records(tmp_path, "step"), HALF_LIFE),
        "train_loss_ema": ema_oracle(_records(tmp_path, "step"), HALF_LIFE),
        "abs_err": ema_oracle(_records(tmp_path, "abs"), HALF_LIFE),
        "hit": ema_oracle(_records(tmp_path, "hit"), HALF_LIFE),
    }
    assert all(len(v) == 2 * k * B for v in _records(tmp_path, "abs").values())
    for name, oracle in oracles.items():
        curve = read_csv_metric(tmp_path / "logs", name)
        assert _steps(curve) == logged, name
        assert _values(curve) == pytest.approx([oracle[s] for s in logged], rel=REL), name


# ------------------------------------------------------------ 4: manual
def _ticks_from_steps(stepped: dict[int, list[float]]) -> list[list[int]]:
    """Batches grouped into ticks: a tick ends with each batch in which the optimizer stepped."""
    ticks: list[list[int]] = [[]]
    for batch in sorted(stepped):
        ticks[-1].append(batch)
        if stepped[batch] == [1.0]:
            ticks.append([])
    return [t for t in ticks if t]


@pytest.mark.lightning
def test_manual_accumulation_ticks_on_real_optimizer_steps(tmp_path: Path) -> None:
    """Hand-written accumulation over k=3 batches: one tick per ``opt.step()``.

    In manual optimization Lightning's ``step`` column counts batches, and a batch is logged when ``(batch + 1) %
    log_every_n_steps == 0``, so a logged point may fall inside an open optimizer step. The callback then logs the
    EMA with the open tick holding that step's batches so far (the tick is decayed at its first update and grows
    with each batch). With 7 batches per epoch, the step opened by the last batch of epoch 1 closes in epoch 2
    (the user's gradient accumulates across the boundary too), and the last batch of the fit leaves a step open,
    which the callback closes at the end of fit.
    """
    k, batches_per_epoch, log_every = 3, 7, 2
    model = ManualAccumulation(str(tmp_path / "records"), k=k, n_samples=batches_per_epoch * B)
    trainer = _trainer(tmp_path, epochs=2, log_every=log_every, callbacks=[EMAMetricsCallback()])
    trainer.fit(model)

    per_batch = _records(tmp_path, "batch")
    n_batches = 2 * batches_per_epoch
    assert sorted(per_batch) == list(range(n_batches))
    ticks = _ticks_from_steps(_records(tmp_path, "stepped"))
    assert ticks == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12], [13]]
    logged = _logged_steps(n_batches, log_every)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert _steps(curve) == logged
    expected = []
    for b in logged:
        t = next(i for i, tick in enumerate(ticks) if b in tick)
        partial = {i: [v for batch in ticks[i] if batch <= b for v in per_batch[batch]] for i in range(t + 1)}
        expected.append(ema_oracle(partial, HALF_LIFE)[t])
    assert _values(curve) == pytest.approx(expected, rel=REL)
    # one tick per optimizer step (+ the step left open at the end, closed by the callback)
    assert model.train_loss.ticks == len(ticks)
    full = {i: [v for batch in tick for v in per_batch[batch]] for i, tick in enumerate(ticks)}
    assert float(model.train_loss.compute()) == pytest.approx(ema_oracle(full, HALF_LIFE)[len(ticks) - 1], rel=REL)


@pytest.mark.lightning
def test_manual_accumulation_resumed_with_a_step_open_at_the_checkpoint(tmp_path: Path) -> None:
    """The epoch-1 checkpoint is taken while the optimizer step opened by batch 6 is still open.

    The resumed run must put batch 6 (saved in the checkpoint) and batches 7-9 into the same tick, as the
    uninterrupted run does. (The resumed model differs: the user's accumulated gradient of batch 6 is not in the
    checkpoint. So the check is against the oracle of the losses the two runs recorded, not a bit-exact one.)
    """
    k, batches_per_epoch, log_every = 3, 7, 2
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    ckpt_dir = first / "ckpt"
    for root, epochs, ckpt_path in ((first, 1, None), (resumed, 2, ckpt_dir / "first.ckpt")):
        model = ManualAccumulation(str(tmp_path / "records"), k=k, n_samples=batches_per_epoch * B)
        callbacks: list[Any] = [EMAMetricsCallback()]
        if ckpt_path is None:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="first"))
        trainer = _trainer(
            root, epochs=epochs, log_every=log_every, callbacks=callbacks, enable_checkpointing=ckpt_path is None
        )
        trainer.fit(model, ckpt_path=ckpt_path)
    per_batch = _records(tmp_path, "batch")  # both runs append to the same records
    assert sorted(per_batch) == list(range(2 * batches_per_epoch))
    ticks = _ticks_from_steps(_records(tmp_path, "stepped"))
    assert ticks == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12], [13]]
    curve = read_csv_metric(first / "logs", "train_loss") + read_csv_metric(resumed / "logs", "train_loss")
    assert _steps(curve) == _logged_steps(2 * batches_per_epoch, log_every)
    expected = []
    for b in _steps(curve):
        t = next(i for i, tick in enumerate(ticks) if b in tick)
        partial = {i: [v for batch in ticks[i] if batch <= b for v in per_batch[batch]] for i in range(t + 1)}
        expected.append(ema_oracle(partial, HALF_LIFE)[t])
    assert _values(curve) == pytest.approx(expected, rel=REL)
    assert model.train_loss.ticks == len(ticks)


@pytest.mark.lightning
def test_two_optimizers_stepping_in_one_batch_make_one_tick(tmp_path: Path) -> None:
    n_batches = 6
    model = TwoOptimizers(str(tmp_path / "records"), n_samples=n_batches * B)
    trainer = _trainer(tmp_path, log_every=1, callbacks=[EMAMetricsCallback()])
    trainer.fit(model)
    per_batch = _records(tmp_path, "batch")  # both players' per-sample losses, per batch
    assert sorted(per_batch) == list(range(n_batches))
    assert all(len(v) == 2 * B for v in per_batch.values())
    oracle = ema_oracle(per_batch, HALF_LIFE)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert _steps(curve) == list(range(n_batches))
    assert _values(curve) == pytest.approx([oracle[b] for b in range(n_batches)], rel=REL)
    assert model.train_loss.ticks == n_batches


# ------------------------------------------------------------ 5: zero-code
def _check_zero_code(root: Path, n_steps: int, log_every: int, samples_per_step: list[int]) -> None:
    per_step = _records(root, "step")
    assert [len(per_step[s]) for s in sorted(per_step)] == samples_per_step
    oracle = ema_oracle(per_step, HALF_LIFE)
    logged = _logged_steps(n_steps, log_every)
    curve = read_csv_metric(root / "logs", "train_loss_ema")
    assert _steps(curve) == logged  # one point per logged optimizer step, none per micro-batch
    assert _values(curve) == pytest.approx([oracle[s] for s in logged], rel=REL)
    # the oracle weights samples, not micro-batches: the uneven last micro-batch makes the difference visible
    by_batch = ema_oracle({s: [float(np.mean(v))] for s, v in per_step.items()}, HALF_LIFE)
    assert curve[-1][1] != pytest.approx(by_batch[logged[-1]], rel=1e-4)


@pytest.mark.lightning
def test_zero_code_mode_with_accumulation(tmp_path: Path) -> None:
    """No EMA metric in the module; ``loss`` (divided by Lightning by accumulate_grad_batches) is un-normalised.

    19 samples in micro-batches of 3 (the last one has 1 sample), accumulate 2: the last optimizer step has a
    single micro-batch of 1 sample, still divided by 2 by Lightning.
    """
    model = Regression(str(tmp_path / "records"), n_samples=19, batch_size=3, metric=False, dict_output=True)
    callback = EMAMetricsCallback(keys={"loss": "train_loss_ema"}, half_life=HALF_LIFE)
    trainer = _trainer(tmp_path, accumulate=2, log_every=1, callbacks=[callback], tensorboard=True)
    trainer.fit(model)
    _check_zero_code(tmp_path, n_steps=4, log_every=1, samples_per_step=[6, 6, 6, 1])
    csv_curve = read_csv_metric(tmp_path / "logs", "train_loss_ema")
    tb_curve = read_tb_metric(tmp_path / "logs", "train_loss_ema")
    assert _steps(tb_curve) == _steps(csv_curve)
    assert _values(tb_curve) == pytest.approx(_values(csv_curve), rel=1e-6)


@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.ddp
def test_zero_code_mode_two_processes(tmp_path: Path) -> None:
    require_gloo()
    model = Regression(
        str(tmp_path / "records"), n_samples=38, batch_size=3, world_size=2, metric=False, dict_output=True
    )
    callback = EMAMetricsCallback(keys={"loss": "train_loss_ema"}, half_life=HALF_LIFE)
    trainer = _trainer(tmp_path, devices=2, accumulate=2, log_every=1, callbacks=[callback])
    trainer.fit(model)
    # 19 samples per rank: micro-batches 3,3 | 3,3 | 3,3 | 1 on each rank
    _check_zero_code(tmp_path, n_steps=4, log_every=1, samples_per_step=[12, 12, 12, 2])


# ------------------------------------------------------------ 7: no callback
@pytest.mark.parametrize(
    "devices",
    [pytest.param(1, marks=pytest.mark.lightning), pytest.param(2, marks=multi_process)],
)
def test_without_callback_the_metric_ticks_per_micro_batch(tmp_path: Path, devices: int) -> None:
    """Without the callback each ``forward`` is one tick, so with accumulate 2 the EMA runs over micro-batches.

    Lightning still logs once per optimizer step (the last micro-batch's forward value), which equals an oracle
    ticking per micro-batch, not the per-step oracle that the callback gives. With 2 processes and
    ``sync_on_forward=True`` every forward syncs, so the logged value is the pooled one.
    """
    if devices > 1:
        require_gloo()
    n_steps, k, log_every = 6, 2, 2
    model = Regression(
        str(tmp_path / "records"),
        n_samples=n_steps * k * B * devices,
        world_size=devices,
        sync_on_forward=devices > 1,
    )
    trainer = _trainer(tmp_path, devices=devices, accumulate=k, log_every=log_every)
    trainer.fit(model)
    per_micro = _records(tmp_path, "micro")
    assert sorted(per_micro) == list(range(n_steps * k))
    assert all(len(v) == B * devices for v in per_micro.values())
    by_micro = ema_oracle(per_micro, HALF_LIFE)
    by_step = ema_oracle(_records(tmp_path, "step"), HALF_LIFE)
    logged = _logged_steps(n_steps, log_every)
    curve = read_csv_metric(tmp_path / "logs", "train_loss")
    assert _steps(curve) == logged
    assert _values(curve) == pytest.approx([by_micro[(s + 1) * k - 1] for s in logged], rel=REL)
    assert _values(curve) != pytest.approx([by_step[s] for s in logged], rel=1e-3)


# ------------------------------------------------------------ 8: selection
@pytest.mark.lightning
@pytest.mark.parametrize(
    "selection", [{"exclude": ["raw_loss"]}, {"metrics": ["train_loss"]}], ids=["exclude", "metrics"]
)
def test_metrics_left_out_keep_ticking_per_micro_batch(tmp_path: Path, selection: dict[str, list[str]]) -> None:
    n_steps, k = 4, 2
    model = TwoLosses(str(tmp_path / "records"), n_samples=n_steps * k * B)
    trainer = _trainer(tmp_path, accumulate=k, log_every=1, callbacks=[EMAMetricsCallback(**selection)])
    trainer.fit(model)
    by_step = ema_oracle(_records(tmp_path, "step"), HALF_LIFE)
    by_micro = ema_oracle(_records(tmp_path, "micro"), HALF_LIFE)
    driven = read_csv_metric(tmp_path / "logs", "train_loss")
    left_out = read_csv_metric(tmp_path / "logs", "raw_loss")
    assert _steps(driven) == _steps(left_out) == list(range(n_steps))
    assert _values(driven) == pytest.approx([by_step[s] for s in range(n_steps)], rel=REL)
    assert _values(left_out) == pytest.approx([by_micro[(s + 1) * k - 1] for s in range(n_steps)], rel=REL)
    assert model.train_loss.ticks == n_steps


# ------------------------------------------------------------ 9: validation
@pytest.mark.lightning
def test_validation_points_share_the_step_axis(tmp_path: Path) -> None:
    """Validation every 4 batches (2 optimizer steps) is logged at the step of the optimizer step it followed."""
    n_steps, k = 8, 2
    model = WithValidation(str(tmp_path / "records"), accumulate=k, n_samples=n_steps * k * B)
    trainer = _trainer(
        tmp_path,
        accumulate=k,
        log_every=1,
        callbacks=[EMAMetricsCallback()],
        limit_val_batches=None,
        val_check_interval=4,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    train = read_csv_metric(tmp_path / "logs", "train_loss")
    val = read_csv_metric(tmp_path / "logs", "val_loss")
    per_val = _records(tmp_path, "val")
    assert sorted(per_val) == [1, 3, 5, 7]  # validation ran after steps 1, 3, 5, 7 (counted by the module)
    assert all(len(v) == 6 for v in per_val.values())
    assert _steps(val) == [1, 3, 5, 7]
    assert set(_steps(val)) <= set(_steps(train))
    assert _values(val) == pytest.approx([float(np.mean(per_val[s])) for s in _steps(val)], rel=REL)
    oracle = ema_oracle(_records(tmp_path, "step"), HALF_LIFE)
    assert _steps(train) == list(range(n_steps))
    assert _values(train) == pytest.approx([oracle[s] for s in range(n_steps)], rel=REL)
