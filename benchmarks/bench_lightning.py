"""Collectives and wall time of smoothed on-step logging in a 2-process Lightning DDP run (CPU, gloo).

The same training (a small MLP on batches of 64, ``accumulate_grad_batches=k``, ``log_every_n_steps=L``, N
optimizer steps, ``strategy="ddp_fork"``) logs three scalars per training batch in these ways:

- ``ema``: 3 ``EMAMetric`` logged ``on_step`` with ``EMAMetricsCallback()``, pooled after every optimizer step (target:
  at most N + 2 collectives, that is one per step, none on accumulating micro-batches);
- ``ema_logged``: the same with ``EMAMetricsCallback(sync="logged")`` (target: at most ceil(N / L) + 2);
- ``sync_dist``: 3 tensors logged with ``self.log(..., sync_dist=True)``;
- ``torchmetrics``: 3 ``MeanMetric(dist_sync_on_step=True)`` logged ``on_step``;
- ``raw``: 3 tensors logged without any sync (the baseline: no collective);
- ``floor``: ``raw`` plus one bare blocking ``all_reduce`` of ``INLINE`` float64 values (the EMA sync's one
  collective) at the end of every optimizer step, and nothing else: what *any* exact per-step sync costs on this
  machine, whatever computes it. ``ema`` / ``floor`` is the cost of the EMA metrics themselves.

On each rank, a callback wraps the ``torch.distributed`` collectives (``all_gather``, ``all_reduce``,
``all_gather_into_tensor``, ``broadcast``, ``all_gather_object``, ``broadcast_object_list``, ``reduce_scatter``,
``barrier``) with counters in ``on_train_start`` and reads them in ``on_train_end``. DDP's gradient all-reduce runs in
C++ (the reducer) and is not seen by these wrappers: it is the same in every variant. The same callback times the
training loop on each rank from ``on_train_start`` to ``on_train_end`` (process start and setup are not included).
The ``raw``, ``floor``, ``ema`` and ``ema_logged`` variants are timed ``--repeats`` times as paired runs (one of each
per round, in rotating order); the median over rounds of the per-round ratio to ``raw`` is compared with the targets:
at most 1.03 for ``ema``, 1.02 for ``ema_logged``. Ranks pass their results back through files in a temporary folder.

Run:
    python benchmarks/bench_lightning.py              # N=200, k=4, L=10, 11 paired rounds (about 5 minutes on 2 cores)
    python benchmarks/bench_lightning.py --quick      # a shorter run
    python benchmarks/bench_lightning.py --profile    # also cProfile rank 0 of one ``ema`` run
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import logging
import math
import os
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from ema_metrics import EMAMetric
from ema_metrics._sync.collectives import INLINE
from ema_metrics.lightning import EMAMetricsCallback

VARIANTS = ("ema", "ema_logged", "sync_dist", "torchmetrics", "floor", "raw")
TIMED = ("raw", "floor", "ema", "ema_logged")
TARGETS = {"ema": 1.03, "ema_logged": 1.02}
DESCRIPTIONS = {
    "ema": "3 EMAMetric + EMAMetricsCallback()",
    "ema_logged": "3 EMAMetric + EMAMetricsCallback(sync=logged)",
    "sync_dist": "3 tensors, self.log(sync_dist=True)",
    "torchmetrics": "3 MeanMetric(dist_sync_on_step=True)",
    "floor": "3 tensors + 1 bare all_reduce per step",
    "raw": "3 tensors, no sync (baseline)",
}
COLLECTIVES = (
    "all_gather",
    "all_reduce",
    "all_gather_into_tensor",
    "all_gather_single",
    "broadcast",
    "all_gather_object",
    "broadcast_object_list",
    "reduce_scatter",
    "barrier",
)
N_FEATURES = 64
HIDDEN = 512
BATCH = 64
EMA_CONSTANT = 2  # allowed collectives beyond one per pooled step (the pooling after fit, and one spare)


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


_quiet()  # at import, so that ranks started by another method than fork (which import this script) are quiet too


class CollectiveCounter(pl.Callback):
    """Counts the ``torch.distributed`` collectives of the training loop, times it, optionally profiles it."""

    def __init__(self, result_dir: str, variant: str, profile: bool = False) -> None:
        self.result_dir = result_dir
        self.variant = variant
        self.profile = profile
        self.counts: dict[str, int] = {}
        self._originals: dict[str, Callable[..., Any]] = {}
        self._depth = 0
        self._start = 0.0
        self._start_cpu = 0.0
        self._profiler: cProfile.Profile | None = None

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:  # count the outermost call only (all_gather_object calls all_gather, ...)
                self.counts[name] = self.counts.get(name, 0) + 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counts = {}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._originals[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        if self.profile and trainer.global_rank == 0:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        self._start_cpu = time.process_time()
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        cpu_seconds = time.process_time() - self._start_cpu
        if self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(str(Path(self.result_dir) / f"{self.variant}.prof"))
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals = {}
        result = {
            "rank": trainer.global_rank,
            "variant": self.variant,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "counts": self.counts,
            "optimizer_steps": trainer.global_step,
            "threads": torch.get_num_threads(),
        }
        path = Path(self.result_dir) / f"{self.variant}.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(result))


class BareReduce(pl.Callback):
    """The ``floor`` variant: one blocking ``all_reduce`` of ``INLINE`` float64 values after every optimizer step."""

    def __init__(self) -> None:
        self._stepped = False
        self._local = torch.zeros(INLINE, dtype=torch.float64)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._stepped:
            self._stepped = False
            dist.all_reduce(self._local)


class BenchModule(pl.LightningModule):
    """A small MLP regression; logs three scalars per training batch in the way ``variant`` says."""

    def __init__(self, variant: str, batches: int, half_life: float = 20.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}")
        self.variant = variant
        self.batches = batches
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, 1),
        )
        self.names = ("loss", "mae", "within_1")
        if variant.startswith("ema"):
            self.trackers = torch.nn.ModuleList(EMAMetric(half_life=half_life) for _ in self.names)
        elif variant == "torchmetrics":
            self.trackers = torch.nn.ModuleList(MeanMetric(dist_sync_on_step=True) for _ in self.names)
        self.data: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        _quiet()
        g = torch.Generator().manual_seed(1 + self.global_rank)
        x = torch.randn(self.batches * BATCH, N_FEATURES, generator=g)
        y = torch.sin(x[:, :8].sum(1)) + 0.3 * torch.randn(len(x), generator=g)
        self.data = TensorDataset(x, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        err = self.net(x).squeeze(-1) - y
        loss = (err**2).mean()
        with torch.no_grad():
            values = (loss.detach(), err.abs().mean(), (err.abs() < 1).float().mean())
        for i, (name, value) in enumerate(zip(self.names, values, strict=True)):
            if self.variant in ("ema", "ema_logged", "torchmetrics"):
                self.trackers[i](value, weight=len(y))
                self.log(name, self.trackers[i], on_step=True, on_epoch=False)
            else:
                sync = self.variant == "sync_dist"
                self.log(name, value, on_step=True, on_epoch=False, sync_dist=sync, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.data is not None
        return DataLoader(self.data, batch_size=BATCH, shuffle=False)


class _NullLogger(pl.loggers.Logger):
    """A logger that receives every logged step and writes nothing (keeps file I/O out of the timing)."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def fit(variant: str, args: argparse.Namespace, result_dir: Path, profile: bool = False) -> dict[str, Any]:
    """One Lightning fit on 2 forked processes; returns rank 0's result and every rank's counts."""
    batches = args.steps * args.accumulate
    module = BenchModule(variant, batches)
    callbacks: list[pl.Callback] = [CollectiveCounter(str(result_dir), variant, profile=profile)]
    if variant.startswith("ema"):
        callbacks.insert(0, EMAMetricsCallback(sync="logged" if variant == "ema_logged" else "step"))
    elif variant == "floor":
        callbacks.insert(0, BareReduce())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_fork",
        max_epochs=1,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=args.log_every,
        logger=_NullLogger(),
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=result_dir,
    )
    trainer.fit(module)
    ranks = [json.loads((result_dir / f"{variant}.rank{r}.json").read_text()) for r in range(args.devices)]
    for r in range(args.devices):
        (result_dir / f"{variant}.rank{r}.json").unlink()
    counts = [rk["counts"] for rk in ranks]
    if any(c != counts[0] for c in counts):
        raise RuntimeError(f"{variant}: the ranks issued different collectives: {counts}")
    if ranks[0]["optimizer_steps"] != args.steps:
        raise RuntimeError(f"{variant}: {ranks[0]['optimizer_steps']} optimizer steps instead of {args.steps}")
    return {
        "counts": counts[0],
        "seconds": max(rk["seconds"] for rk in ranks),
        "cpu_seconds": sum(rk["cpu_seconds"] for rk in ranks),
        "threads": ranks[0]["threads"],
    }


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def print_profile(path: Path, top: int) -> None:
    """Where rank 0's training-loop time goes in the ``ema`` run: the EMA's own functions, then the overall top."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    ema_rows = []
    moves = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in raw.items():
        where = filename.replace("\\", "/")
        if "ema_metrics" in where:
            ema_rows.append((tottime, cumtime, ncalls, f"{Path(filename).name}:{line}({func})"))
        elif where.endswith("torch/nn/modules/module.py") and func == "to":
            moves.append((cumtime, ncalls))
    ema_self = sum(r[0] for r in ema_rows)
    print(f"\ncProfile of rank 0, `ema` run, training loop: {total:.2f} s profiled (profiling slows everything)")
    print(f"  own time of ema_metrics functions: {ema_self:.3f} s ({100 * ema_self / total:.1f} %)")
    for cumtime, ncalls in moves:
        print(
            f"  torch.nn.Module.to: {ncalls} calls, {cumtime:.3f} s cumulative (Lightning moves every logged Metric"
            " to the module's device at each self.log call)"
        )
    print("  ema_metrics functions by cumulative time (cumulative includes torch ops and collectives they call):")
    for tottime, cumtime, ncalls, label in sorted(ema_rows, key=lambda r: -r[1])[:top]:
        print(f"    {cumtime:7.3f} s cum  {tottime:7.3f} s own  {ncalls:7d} calls  {label}")
    print(f"  overall top {top} by own time:")
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        print(f"    {cumtime:7.3f} s cum  {tottime:7.3f} s own  {ncalls:7d} calls  {_short(filename)}:{line}({func})")


def _short(filename: str) -> str:
    """A readable location: the part after ``site-packages/`` (or the file name), ``~`` for built-ins."""
    where = filename.replace("\\", "/")
    return where.split("site-packages/")[-1] if "site-packages/" in where else Path(where).name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200, help="N: optimizer steps")
    parser.add_argument("--accumulate", type=int, default=4, help="k: accumulate_grad_batches")
    parser.add_argument("--log-every", type=int, default=10, help="L: log_every_n_steps")
    parser.add_argument("--repeats", type=int, default=11, help="paired rounds of `raw`, `floor`, `ema`, `ema_logged`")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="N=60, 2 repeats")
    parser.add_argument("--profile", action="store_true", help="cProfile rank 0 of one more `ema` run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 60, 2
    return args


def _timing_line(label: str, times: list[float]) -> str:
    return f"  {label:<40} " + " ".join(f"{t:6.2f}" for t in times) + " s"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    n, k, every = args.steps, args.accumulate, args.log_every
    logged = math.ceil(n / every)
    print(
        f"Lightning {pl.__version__}, torch {torch.__version__}: {args.devices} gloo processes (ddp_fork, CPU), "
        f"N={n} optimizer steps, k={k} (accumulate_grad_batches), L={every} (log_every_n_steps)\n"
        f"model: MLP {N_FEATURES}-{HIDDEN}-{HIDDEN}-1 on batches of {BATCH}, {n * k} training batches per process, "
        f"3 scalars logged on_step per batch, {logged} logged steps\n"
        f"load average at start: {_load()}",
        flush=True,
    )
    rounds = [[TIMED[(i + j) % len(TIMED)] for j in range(len(TIMED))] for i in range(args.repeats)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result_dir = Path(tmp)
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for variant in ["sync_dist", "torchmetrics", *(v for r in rounds for v in r)]:
            start = time.perf_counter()
            res = fit(variant, args, result_dir)
            results[variant].append(res)
            whole = time.perf_counter() - start
            print(f"  fit {variant:<12} training loop {res['seconds']:6.2f} s (whole fit {whole:5.1f} s)")

        base = results["raw"][0]["counts"]
        print(f"\nCollectives issued by each rank from on_train_start to on_train_end ({n * k} training batches):")
        print(f"  {'':<46} {'total':>6} {'beyond baseline':>16} {'per step':>9}  (by function)")
        targets = {"ema": n + EMA_CONSTANT, "ema_logged": logged + EMA_CONSTANT}
        for variant in VARIANTS:
            counts = results[variant][0]["counts"]
            extra = sum(counts.values()) - sum(base.values())
            verdict = ""
            if variant in targets:
                verdict = f"  target <= {targets[variant]}: {'PASS' if extra <= targets[variant] else 'MISS'}"
            total = sum(counts.values())
            print(
                f"  {DESCRIPTIONS[variant]:<46} {total:6d} {extra:16d} {extra / n:9.2f}"
                f"  ({_fmt_counts(counts)}){verdict}"
            )
        print(
            "  The baseline's collectives are Lightning's own: under DDP it broadcasts a SIGTERM flag from rank 0\n"
            "  before every training batch (`_broadcast_sigterm_tensor`). DDP's gradient all-reduce (once per\n"
            "  optimizer step, under `no_sync` on accumulating micro-batches) runs in the C++ reducer and is not\n"
            "  seen by these Python wrappers. Both are the same in every variant."
        )

        raw_times = [r["seconds"] for r in results["raw"]]
        print(
            f"\nTraining-loop wall time (on_train_start -> on_train_end, slower rank; start and setup excluded),"
            f" {args.repeats} paired rounds in rotating order:"
        )
        for variant in TIMED:
            print(_timing_line(DESCRIPTIONS[variant], [r["seconds"] for r in results[variant]]))
        for variant in ("sync_dist", "torchmetrics"):
            t = results[variant][0]["seconds"]
            print(f"  {DESCRIPTIONS[variant]:<46} {t:6.2f} s (1 fit; {t / statistics.median(raw_times):.3f} x raw)")
        print(f"  per training batch: raw {1e3 * statistics.median(raw_times) / (n * k):.2f} ms (median)")
        for variant, target in TARGETS.items():
            ratios = [r["seconds"] / b for r, b in zip(results[variant], raw_times, strict=True)]
            median = statistics.median(ratios)
            print(
                f"  wall-time ratio {variant} / raw per round: {' '.join(f'{x:.3f}' for x in ratios)};"
                f" median {median:.3f}, target <= {target}: {'PASS' if median <= target else 'MISS'}"
            )
        floor = [r["seconds"] / b for r, b in zip(results["floor"], raw_times, strict=True)]
        own = [r["seconds"] / f["seconds"] for r, f in zip(results["ema"], results["floor"], strict=True)]
        for label, ratios in (
            ("floor / raw per round (one bare blocking all_reduce per step, no EMA)", floor),
            ("ema / floor per round (the EMA metrics' own cost beyond that collective)", own),
        ):
            print(f"  {label}: {' '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
        print(f"load average at end: {_load()}; whole benchmark {time.perf_counter() - started:.0f} s")
        if args.profile:
            fit("ema", args, result_dir, profile=True)
            print_profile(result_dir / "ema.prof", top=15)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
