"""Worker functions of the sync tests (module level: they are pickled into spawned gloo processes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper, _sync, synced_values

ALPHA = 0.3
TICKS = 6


def rank_data(rank: int, n_classes: int) -> list[dict[str, Any]]:
    """Each rank's ticks: loss values and weights, class predictions and targets, regression pairs."""
    rng = np.random.default_rng([7, rank])
    out = []
    for _ in range(TICKS):
        n = int(rng.integers(1, 6)) * (rank + 1)  # the ranks see different amounts of data
        out.append(
            {
                "loss": rng.normal(2.0 + rank, 1.0, size=n),
                "weight": rng.uniform(0.5, 3.0, size=n),
                "preds": rng.integers(0, n_classes, size=n),
                "target": rng.integers(0, n_classes, size=n),
                "y": rng.normal(size=n),
                "yhat": rng.normal(size=n),
            }
        )
    return out


def make_metrics(n_classes: int) -> list[Any]:
    return [
        EMAMetric(alpha=ALPHA),
        EMAWrapper(MulticlassConfusionMatrix(num_classes=n_classes, validate_args=False), alpha=ALPHA),
        EMAWrapper(MeanSquaredError(), alpha=ALPHA),
    ]


def feed(metrics: list[Any], data: list[dict[str, Any]]) -> None:
    loss, confmat, mse = metrics
    for tick in data:
        loss.update(torch.from_numpy(tick["loss"]), weight=torch.from_numpy(tick["weight"]))
        confmat.update(torch.from_numpy(tick["preds"]), torch.from_numpy(tick["target"]))
        mse.update(torch.from_numpy(tick["yhat"]), torch.from_numpy(tick["y"]))


class Counter:
    """Counts torch.distributed collectives while active."""

    NAMES = (
        "all_gather",
        "all_gather_single",
        "all_gather_into_tensor",
        "all_reduce",
        "all_gather_object",
        "broadcast",
        "gather",
        "reduce",
        "barrier",
    )

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.originals = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self) -> Counter:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def pooled_values(rank: int, world: int, n_classes: int, inline: int) -> dict[str, Any]:
    """Each rank feeds its own data; returns the pooled values and the collectives of each sync path."""
    _sync.collectives.INLINE = inline
    metrics = make_metrics(n_classes)
    feed(metrics, rank_data(rank, n_classes))
    with Counter() as together:
        values = synced_values(metrics)
    with Counter() as compute:
        computed = [m.compute() for m in metrics]
    return {
        "values": [v.double().tolist() for v in values],
        "computed": [v.double().tolist() for v in computed],
        "together": together.calls,
        "compute": compute.calls,
    }


def mismatch(rank: int, world: int, kind: str, inline: int) -> str:
    """Ranks that differ in ``kind``; every rank must raise (returns the message)."""
    _sync.collectives.INLINE = inline
    n_classes = 4 if (kind == "layout" and rank == 1) else 3
    alpha = 0.5 if (kind == "config" and rank == 1) else ALPHA
    metric = EMAWrapper(MulticlassConfusionMatrix(num_classes=n_classes, validate_args=False), alpha=alpha)
    ticks = TICKS + 1 if (kind == "ticks" and rank == 1) else TICKS
    for _ in range(ticks):
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
    extra = [EMAMetric(alpha=ALPHA)] if (kind == "count" and rank == 1) else []
    if kind == "replica" and rank == 1:  # rank 1 holds its state as if it were the pooled replica of a checkpoint
        s = metric.sync_state()
        states = {n: t.clone() for n, t in s.states.items()}
        metric.load_sync_state(_sync.Pooled(states, s.scale.clone(), s.ticks, dict(s.counters)), replica=True)
    try:
        synced_values([metric, *extra])
    except RuntimeError as err:
        return str(err)
    return "no error"


def subgroup(rank: int, world: int, inline: int) -> dict[str, Any]:
    """A group of ranks 0 and 2 out of 3: pooled over those two only (rank 1 does not take part)."""
    _sync.collectives.INLINE = inline
    group = dist.new_group([0, 2])
    metric = EMAMetric(alpha=ALPHA, process_group=group)
    data = rank_data(rank, 3)
    for tick in data:
        metric.update(torch.from_numpy(tick["loss"]), weight=torch.from_numpy(tick["weight"]))
    if rank == 1:
        return {"value": None}
    return {"value": float(metric.compute()), "together": float(synced_values([metric])[0])}


def long_empty_run(rank: int, world: int, alpha: float, empty: int, inline: int, silent: bool) -> dict[str, Any]:
    """Data, then ``empty`` ticks without data on every rank, then data on rank 0 only; pooled values at each stage.

    With ``silent``, rank 1 never sees data (weight 0 throughout): its states stay empty while rank 0's are
    renormalized, so the pool must align to rank 0's exponent, not to rank 1's.
    """
    _sync.collectives.INLINE = inline
    metric = EMAMetric(alpha=alpha)
    for tick in rank_data(rank, 3):
        weight = tick["weight"] * (0.0 if silent and rank == 1 else 1.0)
        metric.update(torch.from_numpy(tick["loss"]), weight=torch.from_numpy(weight))
    before = float(metric.compute())
    for _ in range(empty):
        metric.begin_tick()
        metric.end_tick()
    with Counter() as counter:
        after = float(metric.compute())
    metric.update(torch.tensor([10.0 + rank]), weight=1.0 if rank == 0 else 0.0)
    return {"values": [before, after, float(metric.compute())], "collectives_after": counter.calls}


def spread(rank: int, world: int) -> dict[str, Any]:
    """Each rank feeds deliberately different data; pooled and per-rank values from one sync."""
    from ema_metrics import synced_values_by_rank

    metrics = [EMAMetric(alpha=ALPHA), EMAWrapper(MeanSquaredError(), alpha=ALPHA)]
    for tick in rank_data(rank, 3):
        metrics[0].update(torch.from_numpy(tick["loss"]), weight=torch.from_numpy(tick["weight"]))
        metrics[1].update(torch.from_numpy(tick["yhat"]) * (rank + 1), torch.from_numpy(tick["y"]))
    with Counter() as counter:
        results = synced_values_by_rank(metrics)
    return {
        "pooled": [float(r.pooled) for r in results],
        "ranks": [r.ranks.tolist() for r in results],
        "min": [float(r.min) for r in results],
        "max": [float(r.max) for r in results],
        "collectives": counter.calls,
    }


def stalls_per_sync(rank: int, world: int) -> dict[str, Any]:
    """Read-backs and copies of host data (what each would be on a GPU) of one sync of k metrics, by call form."""
    from ema_metrics.integrations.lightning.checkpoint import pool_into_every_rank
    from tests.device_utils import recording

    out: dict[str, Any] = {}
    for k in (1, 3, 8):
        metrics = [EMAMetric(alpha=ALPHA) for _ in range(k)]
        for i, m in enumerate(metrics):
            m.update(float(rank + i), weight=1.0 + rank)
        with recording(cpu_run=True) as record:
            synced_values(metrics)
        out[f"synced_values k={k}"] = record.summary()
    metric = EMAMetric(alpha=ALPHA)
    metric.update(float(rank))
    with recording(cpu_run=True) as record:
        metric.compute()
    out["compute"] = record.summary()
    other = EMAMetric(alpha=ALPHA)
    other.update(2.0)
    with recording(cpu_run=True) as record:
        metric.merge_state(other)
    out["merge_state"] = record.summary()
    wrappers = [EMAWrapper(MeanSquaredError(), alpha=ALPHA), EMAWrapper(MulticlassConfusionMatrix(40), alpha=ALPHA)]
    wrappers[0].update(torch.ones(3), torch.zeros(3))
    wrappers[1].update(torch.arange(40), torch.arange(40))
    for name, chosen in (("small wrapper", wrappers[:1]), ("large wrapper", wrappers[1:]), ("both", wrappers)):
        with recording(cpu_run=True) as record:
            synced_values(chosen)
        out[f"synced_values {name}"] = record.summary()
    with recording(cpu_run=True) as record:
        wrappers[1].compute()
    out["compute large wrapper"] = record.summary()
    replicas = [EMAMetric(alpha=ALPHA) for _ in range(3)]
    for m in replicas:
        m.update(float(rank))
    with recording(cpu_run=True) as record:
        pool_into_every_rank(replicas)
    out["pooled replicas after fit"] = record.summary()
    return out


class ByteCounter(Counter):
    """Counts the bytes each collective sends and receives on this rank while active (tensor sizes, not wire bytes).

    An ``all_reduce`` sends its tensor and receives the sum into it; a gather sends its input and receives its output
    (every rank's input, or none on the ranks that do not collect).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            tensors = [a for a in args if isinstance(a, (torch.Tensor, list))]
            sizes = [sum(t.nbytes for t in a) if isinstance(a, list) else a.nbytes for a in tensors]
            self.bytes += 2 * sizes[0] if name in ("all_reduce", "reduce", "broadcast") else sum(sizes)
            return fn(*args, **kwargs)

        return counted


def bytes_per_sync(rank: int, world: int) -> dict[str, Any]:
    """Bytes sent and received on this rank by one sync of small metrics, of each one's compute(), of a large state."""
    metrics = [EMAMetric(alpha=ALPHA) for _ in range(3)] + [EMAWrapper(MeanSquaredError(), alpha=ALPHA)]
    large = EMAWrapper(MulticlassConfusionMatrix(num_classes=40, validate_args=False), alpha=ALPHA)
    for i, m in enumerate(metrics[:3]):
        m.update(float(rank + i), weight=1.0 + rank)
    metrics[3].update(torch.ones(3) * rank, torch.zeros(3))
    large.update(torch.arange(40) % (rank + 2), torch.arange(40))
    out: dict[str, Any] = {}
    for form, run in (
        ("synced_values", lambda: synced_values(metrics)),
        ("compute", lambda: metrics[0].compute()),
        ("large synced_values", lambda: synced_values([large])),
        ("large compute", lambda: large.compute()),
    ):
        with ByteCounter() as counter:
            run()
        out[form] = (counter.bytes, counter.calls)
    return out


def too_many(rank: int, world: int, inline: int) -> list[str]:
    """Two metrics whose checks do not fit a sync of ``inline`` values: every rank must raise (the messages)."""
    _sync.collectives.INLINE = inline
    metrics = [EMAMetric(alpha=ALPHA), EMAMetric(alpha=ALPHA)]
    for m in metrics:
        m.update(float(rank))
    out = []
    for run in (lambda: synced_values(metrics), lambda: _sync.check_alike(metrics)):
        try:
            run()
            out.append("no error")
        except RuntimeError as err:
            out.append(str(err))
    return out
