"""EMAMetric inside torchmetrics containers behaves like on its own (independent pandas reference)."""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.aggregation import MeanMetric

from ema_metrics import EMAMetric, EMAWrapper, tick


def test_metric_collection_keeps_different_smoothings_apart() -> None:
    # MetricCollection merges metrics with equal states into compute groups; EMAs of different alpha (or the
    # same alpha, which would share tensors but not their tick count) must never be merged.
    rng = np.random.default_rng(1)
    stream = rng.normal(3.0, 1.0, size=40)
    mc = MetricCollection(
        {"fast": EMAMetric(alpha=0.5), "slow": EMAMetric(alpha=0.01), "seeded": EMAMetric(alpha=0.5, adjust=False)}
    )
    for x in stream:
        mc.update(torch.tensor(x))
    out = mc.compute()
    for name, alpha, adjust in (("fast", 0.5, True), ("slow", 0.01, True), ("seeded", 0.5, False)):
        expected = pd.Series(stream).ewm(alpha=alpha, adjust=adjust).mean().iloc[-1]
        assert abs(float(out[name]) - expected) < 1e-12
        assert mc[name].ticks == len(stream)


# ----------------------------------------------------------------------------------------------- compute groups


def _pair_fresh() -> tuple[Metric, Metric]:
    return EMAMetric(alpha=0.5), EMAMetric(alpha=0.5)


def _moved(move: Callable[[Metric], Any]) -> Callable[[], tuple[Metric, Metric]]:
    def make() -> tuple[Metric, Metric]:
        for _ in range(300):  # counter-based tags of neighbours above 256 were equal in bfloat16
            EMAMetric(alpha=0.5)
        a, b = _pair_fresh()
        return move(a) or a, move(b) or b

    return make


def _cloned() -> tuple[Metric, Metric]:
    a = EMAMetric(alpha=0.5)
    return a, a.clone()


def _deep_copied() -> tuple[Metric, Metric]:
    a = EMAMetric(alpha=0.5)
    return a, copy.deepcopy(a)


def _pickled() -> tuple[Metric, Metric]:
    a = EMAMetric(alpha=0.5)
    return a, pickle.loads(pickle.dumps(a))


def _loaded_persistent() -> tuple[Metric, Metric]:
    # persistent(True) puts every state, the compute-group tag included, into the state dict
    a, b = _pair_fresh()
    a.persistent(True)
    b.load_state_dict(a.state_dict())
    return a, b


def _loaded_plain() -> tuple[Metric, Metric]:
    a, b = _pair_fresh()
    b.load_state_dict(a.state_dict())
    return a, b


def _wrappers_bf16() -> tuple[Metric, Metric]:
    return (
        EMAWrapper(MeanMetric(), alpha=0.5).to(torch.bfloat16),
        EMAWrapper(MeanMetric(), alpha=0.5).to(torch.bfloat16),
    )


PAIRS: dict[str, Callable[[], tuple[Metric, Metric]]] = {
    "fresh": _pair_fresh,
    "bfloat16": _moved(lambda m: m.to(torch.bfloat16)),
    "float16": _moved(lambda m: m.to(torch.float16)),
    "half": _moved(lambda m: m.half()),
    "double-then-half": _moved(lambda m: m.double().half()),
    "set_dtype-bf16": _moved(lambda m: m.set_dtype(torch.bfloat16)),
    "set_dtype-half": _moved(lambda m: m.set_dtype(torch.half)),
    "set_dtype-int64": _moved(lambda m: m.set_dtype(torch.int64)),
    "clone": _cloned,
    "deepcopy": _deep_copied,
    "pickle": _pickled,
    "load_state_dict": _loaded_plain,
    "persistent-state-dict": _loaded_persistent,
    "wrappers-bf16": _wrappers_bf16,
}


@pytest.mark.parametrize("make", list(PAIRS.values()), ids=list(PAIRS))
def test_collection_never_groups_ema_metrics(make: Callable[[], tuple[Metric, Metric]]) -> None:
    # Two equal EMAs in one compute group share one state, and ticking both decays it twice (the failure of
    # counter-based tags: a value that drifts away from pandas).
    a, b = make()
    mc = MetricCollection({"a": a, "b": b}, compute_groups=True)
    micro_batches = [[2.0, 4.0], [8.0, 6.0], [1.0, 9.0], [7.0, 7.0]]
    for micro in micro_batches:
        with tick(mc):
            for x in micro:
                mc.update(torch.tensor(x))
    assert len(mc.compute_groups) == 2, mc.compute_groups
    expected = pd.Series([np.mean(m) for m in micro_batches]).ewm(alpha=0.5).mean().iloc[-1]
    out = mc.compute()
    for name in ("a", "b"):
        assert float(out[name]) == pytest.approx(expected, rel=1e-12)
        assert mc[name].ticks == len(micro_batches)


@pytest.mark.slow
def test_collection_of_many_instances_is_never_grouped() -> None:
    # counter-based tags became `allclose`-equal after about 1e5 constructions
    for _ in range(100_000):
        EMAMetric(alpha=0.5)
    test_collection_never_groups_ema_metrics(_pair_fresh)
