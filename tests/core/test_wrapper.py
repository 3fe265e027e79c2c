"""EMAWrapper against float64 numpy oracles: decayed sufficient statistics from the raw data, then the formula.

Each metric kind below computes, from one batch of raw predictions and targets, the sufficient statistics its
formula needs (counts, sums of errors, weighted sums), and the formula itself, in numpy float64, without
torchmetrics. The oracle decays those statistics tick by tick.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torchmetrics
from packaging.version import Version
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torchmetrics import Metric, MetricCollection
from torchmetrics.aggregation import CatMetric, MaxMetric, MeanMetric, MinMetric, SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy, MulticlassConfusionMatrix
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef

import ema_metrics
from ema_metrics import EMAMetric, EMAWrapper, _sync, resolve_alpha

NUM_CLASSES = 4
TOL = 1e-12


# ---------------------------------------------------------------------------------------------------- metric kinds
@dataclass(frozen=True)
class Kind:
    """One supported metric: how to build it, draw a batch, and the numpy oracle of its statistics and formula."""

    name: str
    make: Callable[..., Metric]
    draw: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]
    to_args: Callable[[tuple[np.ndarray, ...]], tuple[Tensor, ...]]
    stats: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    formula: Callable[[np.ndarray], float]


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else 0.0


def _draw_binary(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    return rng.random(n), rng.integers(0, 2, n)


def _binary_args(batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


def _binary_counts(batch: tuple[np.ndarray, ...]) -> np.ndarray:
    probs, target = batch
    pred = probs > 0.5
    truth = target == 1
    tp = np.sum(pred & truth)
    fp = np.sum(pred & ~truth)
    fn = np.sum(~pred & truth)
    return np.array([tp, fp, fn, len(target)], dtype=np.float64)


def _binary_accuracy(s: np.ndarray) -> float:
    _, fp, fn, total = s
    return _ratio(total - fp - fn, total)


def _binary_f1(s: np.ndarray) -> float:
    tp, fp, fn, _ = s
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _draw_multiclass(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    # few classes per batch, so that some classes are missing from some ticks
    present = rng.choice(NUM_CLASSES, size=int(rng.integers(1, NUM_CLASSES + 1)), replace=False)
    logits = rng.normal(size=(n, NUM_CLASSES))
    logits[:, present] += 2.0
    return logits, rng.choice(present, size=n)


def _multiclass_args(batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


def _multiclass_counts(batch: tuple[np.ndarray, ...]) -> np.ndarray:
    """Per class: correct predictions, support (targets of the class), predictions of the class that were wrong."""
    logits, target = batch
    pred = logits.argmax(axis=1)
    out = np.zeros((3, NUM_CLASSES))
    for c in range(NUM_CLASSES):
        out[0, c] = np.sum((pred == c) & (target == c))
        out[1, c] = np.sum(target == c)
        out[2, c] = np.sum((pred == c) & (target != c))
    return out.ravel()


def _micro_accuracy(s: np.ndarray) -> float:
    correct, support, _ = s.reshape(3, NUM_CLASSES)
    return _ratio(correct.sum(), support.sum())


def _macro_accuracy(s: np.ndarray) -> float:
    correct, support, wrong_pred = s.reshape(3, NUM_CLASSES)
    recall = np.array([_ratio(c, n) for c, n in zip(correct, support, strict=True)])
    seen = (support + wrong_pred) != 0  # a class counts once it appeared as a target or as a prediction
    return _ratio(float(np.sum(recall * seen)), float(np.sum(seen)))


def _draw_regression(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    target = rng.normal(size=n)
    return target + rng.normal(scale=rng.uniform(0.1, 2.0), size=n), target


def _regression_args(batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


def _draw_values(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    return rng.normal(loc=rng.uniform(-3, 3), size=n), rng.uniform(0.1, 5.0, size=n)


def _value_args(batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    return (torch.from_numpy(batch[0]),)


def _weighted_args(batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


KINDS = {
    k.name: k
    for k in (
        Kind("binary_accuracy", BinaryAccuracy, _draw_binary, _binary_args, _binary_counts, _binary_accuracy),
        Kind("binary_f1", BinaryF1Score, _draw_binary, _binary_args, _binary_counts, _binary_f1),
        Kind(
            "multiclass_micro",
            lambda **kw: MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro", **kw),
            _draw_multiclass,
            _multiclass_args,
            _multiclass_counts,
            _micro_accuracy,
        ),
        Kind(
            "multiclass_macro",
            lambda **kw: MulticlassAccuracy(num_classes=NUM_CLASSES, average="macro", **kw),
            _draw_multiclass,
            _multiclass_args,
            _multiclass_counts,
            _macro_accuracy,
        ),
        Kind(
            "mse",
            MeanSquaredError,
            _draw_regression,
            _regression_args,
            lambda b: np.array([np.sum((b[0] - b[1]) ** 2), len(b[1])]),
            lambda s: _ratio(s[0], s[1]),
        ),
        Kind(
            "mae",
            MeanAbsoluteError,
            _draw_regression,
            _regression_args,
            lambda b: np.array([np.sum(np.abs(b[0] - b[1])), len(b[1])]),
            lambda s: _ratio(s[0], s[1]),
        ),
        Kind("sum", SumMetric, _draw_values, _value_args, lambda b: np.array([np.sum(b[0])]), lambda s: float(s[0])),
        Kind(
            "mean",
            MeanMetric,
            _draw_values,
            _weighted_args,
            lambda b: np.array([np.sum(b[0] * b[1]), np.sum(b[1])]),
            lambda s: s[0] / s[1] if s[1] else math.nan,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------- the oracle
def oracle_values(
    kind: Kind, ticks: Sequence[Sequence[tuple[np.ndarray, ...]]], alpha: float, adjust: bool
) -> list[float]:
    """The metric after each tick; a tick is a list of batches (empty: a tick without data)."""
    beta = 1.0 - alpha
    state: np.ndarray | None = None
    out = []
    for t, batches in enumerate(ticks):
        inc = sum((kind.stats(b) for b in batches), start=np.zeros_like(kind.stats(_first_batch(ticks))))
        if alpha == 1.0 and not batches and state is not None:
            pass  # like pandas with a missing observation: at alpha = 1 a tick without data keeps the last value
        else:
            state = inc if state is None else beta * state + inc
        if t == 0 and not adjust:
            state = state / alpha
        out.append(kind.formula(state))
    return out


def _first_batch(ticks: Sequence[Sequence[tuple[np.ndarray, ...]]]) -> tuple[np.ndarray, ...]:
    return next(b for batches in ticks for b in batches)


def random_stream(kind: Kind, rng: np.random.Generator, n_ticks: int, max_batch: int = 12) -> list[list[Any]]:
    return [[kind.draw(rng, int(rng.integers(1, max_batch + 1)))] for _ in range(n_ticks)]


def random_alpha(rng: np.random.Generator) -> tuple[dict[str, float], float]:
    """A random parametrisation (mostly half_life), and the alpha it stands for."""
    choice = rng.integers(0, 5)
    if choice == 0:
        kw = {"alpha": 1.0}
    elif choice == 1:
        kw = {"span": float(rng.uniform(1.0, 20.0))}
    else:
        kw = {"half_life": float(np.exp(rng.uniform(np.log(0.3), np.log(40.0))))}
    return kw, resolve_alpha(**kw)


def assert_close(actual: Any, expected: float, tol: float = TOL) -> None:
    value = float(actual)
    assert math.isclose(value, expected, rel_tol=tol, abs_tol=tol), (value, expected)


# ---------------------------------------------------------------------------------------------------- streams
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_random_streams_match_oracle(kind_name: str, adjust: bool) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng([11, len(kind_name), int(adjust)])
    for _ in range(6):
        kw, alpha = random_alpha(rng)
        ticks = random_stream(kind, rng, int(rng.integers(1, 30)))
        expected = oracle_values(kind, ticks, alpha, adjust)
        wrapper = EMAWrapper(kind.make(), adjust=adjust, **kw)
        for t, (batches, want) in enumerate(zip(ticks, expected, strict=True)):
            value = wrapper(*kind.to_args(batches[0]))  # forward: one tick, returns the current value
            assert value.dtype == torch.float64
            assert_close(value, want)
            assert wrapper.ticks == t + 1
        assert_close(wrapper.compute(), expected[-1])


@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("kind_name", ["binary_accuracy", "multiclass_macro", "mse", "sum"])
def test_update_then_compute_matches_forward_path(kind_name: str, adjust: bool) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng([12, len(kind_name), int(adjust)])
    ticks = random_stream(kind, rng, 15)
    expected = oracle_values(kind, ticks, resolve_alpha(half_life=3.0), adjust)
    wrapper = EMAWrapper(kind.make(), half_life=3.0, adjust=adjust)
    for batches, want in zip(ticks, expected, strict=True):
        wrapper.update(*kind.to_args(batches[0]))
        assert_close(wrapper.compute(), want)


@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_grouped_ticks_pool_micro_batches(kind_name: str, adjust: bool) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng([13, len(kind_name), int(adjust)])
    # 0 to 3 micro-batches per tick; a tick without data still decays (and may be the first one)
    ticks = [[kind.draw(rng, int(rng.integers(1, 6))) for _ in range(int(rng.integers(0, 4)))] for _ in range(20)]
    ticks[0] = [] if adjust else ticks[0]
    ticks[1] = ticks[1] or [kind.draw(rng, 3)]
    kw, alpha = random_alpha(rng)
    expected = oracle_values(kind, ticks, alpha, adjust)
    wrapper = EMAWrapper(kind.make(), adjust=adjust, **kw)
    for t, (batches, want) in enumerate(zip(ticks, expected, strict=True)):
        with wrapper.tick():
            for batch in batches:
                wrapper.update(*kind.to_args(batch))
        assert wrapper.ticks == t + 1
        if t > 0:  # before any data the value is the metric's 0/0 convention
            assert_close(wrapper.compute(), want)


def test_empty_first_tick_with_adjust_false_does_not_seed() -> None:
    kind = KINDS["mse"]
    rng = np.random.default_rng(14)
    ticks: list[list[Any]] = [[], *random_stream(kind, rng, 6)]
    expected = oracle_values(kind, ticks, 0.3, adjust=False)
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.3, adjust=False)
    for t, batches in enumerate(ticks):
        with ema_metrics.tick(wrapper):
            for batch in batches:
                wrapper.update(*kind.to_args(batch))
        if t:
            assert_close(wrapper.compute(), expected[t])


@pytest.mark.parametrize("adjust", [True, False])
def test_mean_metric_agrees_with_ema_metric(adjust: bool) -> None:
    kind = KINDS["mean"]
    rng = np.random.default_rng([15, int(adjust)])
    for _ in range(4):
        kw, alpha = random_alpha(rng)
        ticks = [[kind.draw(rng, int(rng.integers(1, 8))) for _ in range(int(rng.integers(1, 3)))] for _ in range(25)]
        expected = oracle_values(kind, ticks, alpha, adjust)
        wrapper = EMAWrapper(MeanMetric(), adjust=adjust, **kw)
        ema = EMAMetric(adjust=adjust, **kw)
        for batches, want in zip(ticks, expected, strict=True):
            with ema_metrics.tick(wrapper, ema):
                for values, weights in batches:
                    wrapper.update(torch.from_numpy(values), torch.from_numpy(weights))
                    ema.update(torch.from_numpy(values), weight=torch.from_numpy(weights))
            got_wrapper, got_ema = wrapper.compute(), ema.compute()
            assert_close(got_wrapper, want)
            assert_close(got_ema, want)
            assert_close(got_wrapper, float(got_ema))


def test_sum_metric_is_the_discounted_sum() -> None:
    # closed forms for a constant contribution c per tick: c (1 - beta^t) / alpha, or c / alpha when seeded
    alpha, c = 0.2, 3.0
    debiased = EMAWrapper(SumMetric(), alpha=alpha)
    seeded = EMAWrapper(SumMetric(), alpha=alpha, adjust=False)
    for t in range(1, 12):
        assert_close(debiased(torch.tensor([1.0, 2.0])), c * (1 - (1 - alpha) ** t) / alpha)
        assert_close(seeded(torch.tensor([1.0, 2.0])), c / alpha)


def test_doc_trajectory_follows_drift() -> None:
    acc = EMAWrapper(BinaryAccuracy(), half_life=2)
    beta = 0.5**0.5
    target = torch.tensor([0, 1, 1, 0])
    correct = np.array([1.0] * 4 + [0.0] * 4)
    for step in range(8):
        value = acc(target if step < 4 else 1 - target, target)
        weights = beta ** (step - np.arange(step + 1))
        assert_close(value, float(np.sum(weights * correct[: step + 1]) / np.sum(weights)))


# ---------------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("kind_name", ["binary_f1", "multiclass_macro", "mae", "mean"])
def test_state_dict_round_trip_continues_exactly(kind_name: str) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng([16, len(kind_name)])
    ticks = random_stream(kind, rng, 16)
    expected = oracle_values(kind, ticks, resolve_alpha(span=5.0), adjust=False)
    first = EMAWrapper(kind.make(), span=5.0, adjust=False)
    for batches in ticks[:7]:
        first(*kind.to_args(batches[0]))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    restored = EMAWrapper(kind.make(), span=5.0, adjust=False)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.ticks == 7
    assert {k for k in first.state_dict() if not k.startswith("_")} == {
        "scale",
        *(f"decayed_{name}" for name in kind.make()._defaults),
        "nonfinite_updates",
    }
    for batches, want in zip(ticks[7:], expected[7:], strict=True):
        a = first(*kind.to_args(batches[0]))
        b = restored(*kind.to_args(batches[0]))
        assert torch.equal(a, b)
        assert_close(b, want)


def test_pickle_and_deepcopy_continue() -> None:
    kind = KINDS["binary_accuracy"]
    rng = np.random.default_rng(17)
    ticks = random_stream(kind, rng, 10)
    expected = oracle_values(kind, ticks, 0.25, adjust=True)
    wrapper = EMAWrapper(BinaryAccuracy(), alpha=0.25)
    for batches in ticks[:4]:
        wrapper.update(*kind.to_args(batches[0]))
    unpickled = pickle.loads(pickle.dumps(wrapper))
    # scratch buffers are rebuilt, never shared (torch.multiprocessing would put pickled tensors in shared memory)
    assert unpickled.__dict__["_scratch"] is None
    for clone in (copy.deepcopy(wrapper), unpickled):
        for batches in ticks[4:]:
            clone.update(*kind.to_args(batches[0]))
        assert_close(clone.compute(), expected[-1])


def test_reset_restarts() -> None:
    kind = KINDS["multiclass_micro"]
    rng = np.random.default_rng(18)
    wrapper = EMAWrapper(kind.make(), alpha=0.4, adjust=False)
    for batches in random_stream(kind, rng, 5):
        wrapper(*kind.to_args(batches[0]))
    wrapper.reset()
    assert wrapper.ticks == 0
    ticks = random_stream(kind, rng, 5)
    expected = oracle_values(kind, ticks, 0.4, adjust=False)
    for batches, want in zip(ticks, expected, strict=True):
        assert_close(wrapper(*kind.to_args(batches[0])), want)


def test_dtype_changes_keep_float64_states_unrounded() -> None:
    kind = KINDS["mean"]
    rng = np.random.default_rng(19)
    ticks = random_stream(kind, rng, 8)
    expected = oracle_values(kind, ticks, 0.3, adjust=True)
    wrapper = EMAWrapper(MeanMetric(), alpha=0.3)
    for step, batches in enumerate(ticks):
        if step == 3:  # half precision mid-stream: the accumulated sums must not be rounded through it
            wrapper.set_dtype(torch.float16)
        if step == 5:
            wrapper.to(torch.float16)
        wrapper.update(*kind.to_args(batches[0]))
        assert all(getattr(wrapper, f"decayed_{n}").dtype == torch.float64 for n in ("mean_value", "weight"))
        assert wrapper.base_metric.dtype == torch.float64
        assert_close(wrapper.compute(), expected[step])
    # float32 inputs are widened exactly, not rounded to the metric's default dtype
    wrapper.reset()
    ticks32 = [[tuple(a.astype(np.float32) for a in batches[0])] for batches in ticks]
    for batches in ticks32:
        wrapper.update(*kind.to_args(batches[0]))
    widened = [[tuple(a.astype(np.float64) for a in batches[0])] for batches in ticks32]
    assert_close(wrapper.compute(), oracle_values(kind, widened, 0.3, adjust=True)[-1])


def test_failed_update_leaves_state_and_ticks() -> None:
    wrapper = EMAWrapper(BinaryAccuracy(), alpha=0.5)
    wrapper.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]))
    before = {k: torch.as_tensor(v).clone() for k, v in wrapper.metric_state.items()}
    with pytest.raises(RuntimeError, match="same shape"):
        wrapper.update(torch.tensor([1, 0]), torch.tensor([1, 1, 1]))
    assert wrapper.ticks == 1
    for k, v in wrapper.metric_state.items():  # the compute-group tag is NaN: compare NaN as equal
        torch.testing.assert_close(torch.as_tensor(v), before[k], rtol=0, atol=0, equal_nan=True)
    assert_close(wrapper.compute(), 2 / 3)


def test_metric_collection_and_attributes() -> None:
    kind = KINDS["binary_accuracy"]
    rng = np.random.default_rng(20)
    ticks = random_stream(kind, rng, 6)
    collection = MetricCollection(
        {"acc": EMAWrapper(BinaryAccuracy(), alpha=0.5), "f1": EMAWrapper(BinaryF1Score(), alpha=0.1)}
    )
    for batches in ticks:
        collection.update(*kind.to_args(batches[0]))
    out = collection.compute()
    assert_close(out["acc"], oracle_values(kind, ticks, 0.5, True)[-1])
    assert_close(out["f1"], oracle_values(KINDS["binary_f1"], ticks, 0.1, True)[-1])
    wrapper = collection["acc"]
    assert isinstance(wrapper, EMAWrapper)
    assert wrapper.higher_is_better is True
    assert EMAWrapper(MeanSquaredError(), alpha=0.5).higher_is_better is False
    assert "alpha=0.5" in repr(wrapper)


# ---------------------------------------------------------------------------------------------------- rejections
class _StateMetric(Metric):
    """A one-state metric with a chosen reduction and default."""

    full_state_update = False
    total: Tensor

    def __init__(self, reduce_fx: Any, default: Any = None) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(2) if default is None else default, dist_reduce_fx=reduce_fx)

    def update(self, x: Tensor) -> None:
        self.total += x

    def compute(self) -> Tensor:
        return self.total


class _NestedMetric(Metric):
    total: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.inner = BinaryAccuracy()

    def update(self, x: Tensor) -> None:
        self.total += x.sum()

    def compute(self) -> Tensor:
        return self.total


class _StatelessMetric(Metric):
    def update(self, x: Tensor) -> None:
        pass

    def compute(self) -> Tensor:
        return torch.tensor(0.0)


def _custom_sum(x: Tensor) -> Tensor:
    return x.sum(0)


@pytest.mark.parametrize(
    ("make", "pieces"),
    [
        (MaxMetric, ["state `max_value` of MaxMetric", "reduces with `max`", "only states reduced with `sum`"]),
        (MinMetric, ["state `min_value` of MinMetric", "reduces with `min`"]),
        (CatMetric, ["state `value` of CatMetric", "list state", "`cat`"]),
        (PearsonCorrCoef, ["state `mean_x` of PearsonCorrCoef", "reduces with `None`"]),
        (lambda: _StateMetric("mean"), ["state `total` of _StateMetric", "reduces with `mean`"]),
        (lambda: _StateMetric(None), ["state `total` of _StateMetric", "`None`"]),
        (lambda: _StateMetric(_custom_sum), ["state `total` of _StateMetric", "custom function `_custom_sum`"]),
        (lambda: _StateMetric("sum", torch.ones(2)), ["state `total` of _StateMetric", "not zero"]),
        (lambda: _StateMetric("sum", torch.zeros(2, dtype=torch.complex64)), ["`total`", "complex"]),
        (lambda: MulticlassAccuracy(num_classes=3, multidim_average="samplewise"), ["`tp`", "list state"]),
        (_NestedMetric, ["_NestedMetric", "`inner` (BinaryAccuracy)"]),
        (_StatelessMetric, ["_StatelessMetric", "no state"]),
    ],
)
def test_rejects_metrics_that_cannot_be_decayed(make: Callable[[], Metric], pieces: list[str]) -> None:
    with pytest.raises(ValueError, match="EMAWrapper") as info:
        EMAWrapper(make(), alpha=0.5)
    for piece in pieces:
        assert piece in str(info.value)


def test_rejects_non_metrics_ema_metrics_and_used_metrics() -> None:
    with pytest.raises(TypeError, match=r"argument `metric`.*Linear"):
        EMAWrapper(torch.nn.Linear(2, 2), alpha=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument `metric`.*'accuracy'"):
        EMAWrapper("accuracy", alpha=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="EMAWrapper cannot wrap EMAMetric"):
        EMAWrapper(EMAMetric(alpha=0.5), alpha=0.5)
    with pytest.raises(TypeError, match="EMAWrapper cannot wrap EMAWrapper"):
        EMAWrapper(EMAWrapper(BinaryAccuracy(), alpha=0.5), alpha=0.5)
    used = BinaryAccuracy()
    used.update(torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="BinaryAccuracy was already updated 1 time"):
        EMAWrapper(used, alpha=0.5)
    used.reset()
    EMAWrapper(used, alpha=0.5)
    with pytest.raises(ValueError, match="half_life"):
        EMAWrapper(BinaryAccuracy(), half_life=-1.0)
    with pytest.raises(TypeError, match="adjust"):
        EMAWrapper(BinaryAccuracy(), alpha=0.5, adjust="no")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- host syncs
_SYNC_FREE: dict[str, Callable[[], Metric]] = {
    "binary_accuracy": lambda: BinaryAccuracy(validate_args=False),
    "binary_f1": lambda: BinaryF1Score(validate_args=False),
    "multiclass_micro": lambda: MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro", validate_args=False),
    "multiclass_macro": lambda: MulticlassAccuracy(num_classes=NUM_CLASSES, average="macro", validate_args=False),
    "mse": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "sum": lambda: SumMetric(nan_strategy="disable"),
    "mean": lambda: MeanMetric(nan_strategy="disable"),
}


def _sync_free_args(kind: Kind, batch: tuple[np.ndarray, ...]) -> tuple[Tensor, ...]:
    if kind.name.startswith("binary"):  # float preds on the CPU make torchmetrics check their range on the host
        return torch.from_numpy((batch[0] > 0.5).astype(np.int64)), torch.from_numpy(batch[1])
    if kind.name == "mean":  # MeanMetric(nan_strategy="disable") ignores `weight` (torchmetrics 1.9): unweighted
        return (torch.from_numpy(batch[0]),)
    return kind.to_args(batch)


# `nan_strategy="disable"` (no NaN check, hence no host sync in `update`) appeared in torchmetrics 1.7
_NO_DISABLE = pytest.mark.skipif(
    Version(torchmetrics.__version__) < Version("1.7"),
    reason="torchmetrics < 1.7 has no nan_strategy='disable': SumMetric/MeanMetric always check NaNs on the host",
)


@pytest.mark.parametrize(
    "kind_name", [pytest.param(k, marks=_NO_DISABLE) if k in ("sum", "mean") else k for k in _SYNC_FREE]
)
def test_update_and_forward_make_no_host_sync(kind_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = KINDS[kind_name]
    rng = np.random.default_rng([21, len(kind_name)])
    ticks = random_stream(kind, rng, 6)
    if kind_name == "mean":
        ticks = [[(values, np.ones_like(values))] for [(values, _)] in ticks]
    args = [_sync_free_args(kind, batches[0]) for batches in ticks]
    wrapper = EMAWrapper(_SYNC_FREE[kind_name](), alpha=0.5, adjust=False)

    def no_sync(*_: Any, **__: Any) -> Any:
        raise AssertionError("host sync")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, name, no_sync)
        wrapper(*args[0])
        wrapper.update(*args[1])
        with wrapper.tick():
            wrapper(*args[2])
            wrapper.update(*args[3])
        with wrapper.tick():
            pass
        for a in args[4:]:
            wrapper(*a)
    ticks_seen = [ticks[0], ticks[1], [ticks[2][0], ticks[3][0]], [], ticks[4], ticks[5]]
    assert_close(wrapper.compute(), oracle_values(kind, ticks_seen, 0.5, adjust=False)[-1])


class _Clones(TorchFunctionMode):
    """Records the shape of every tensor cloned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is Tensor.clone:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("classes", [5, 40], ids=["states in the first collective", "states summed apart"])
def test_synced_compute_copies_neither_the_states_nor_the_value(classes: int) -> None:
    # Two ranks in one process: rank 0 syncs through a gather that returns rank 1's parts. The reference is a float64
    # loop over each rank's confusion matrices, decayed and summed.
    alpha, rng = 0.3, np.random.default_rng(8)
    rank1 = EMAWrapper(MulticlassConfusionMatrix(num_classes=classes), alpha=alpha)

    def gather(packed: Tensor, group: Any = None) -> list[Tensor]:
        theirs = (
            _sync.local_vector([rank1]).vector
            if packed.numel() == _sync.collectives.INLINE
            else _sync.flat(rank1.sync_state())
        )
        return [packed, theirs]

    rank0 = EMAWrapper(
        MulticlassConfusionMatrix(num_classes=classes),
        alpha=alpha,
        dist_sync_fn=gather,
        distributed_available_fn=lambda: True,
    )
    alone = EMAWrapper(MulticlassConfusionMatrix(num_classes=classes), alpha=alpha)  # never synced
    pooled, own = np.zeros((classes, classes)), np.zeros((classes, classes))
    for _ in range(6):
        pooled, own = (1 - alpha) * pooled, (1 - alpha) * own
        for metric in (rank0, rank1):
            preds, target = rng.integers(0, classes, 50), rng.integers(0, classes, 50)
            metric.update(torch.from_numpy(preds), torch.from_numpy(target))
            counts = np.zeros((classes, classes))
            np.add.at(counts, (target, preds), 1.0)
            pooled += counts
            if metric is rank0:
                alone.update(torch.from_numpy(preds), torch.from_numpy(target))
                own += counts
    local = rank0.decayed_confmat
    with _Clones() as clones:
        value = rank0.compute()
    np.testing.assert_allclose(value.numpy(), pooled, rtol=TOL)
    assert rank0.decayed_confmat is local  # the local states come back as they were, not as copies
    np.testing.assert_allclose(local.numpy(), own, rtol=TOL)
    assert (classes, classes) not in clones.shapes  # nor is the pooled value copied
    with _Clones() as clones:
        own_value = alone.compute()
    assert (classes, classes) in clones.shapes  # a rank-local value is a copy
    kept, own_kept = value.clone(), own_value.clone()
    for metric in (rank0, alone):
        metric.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert torch.equal(value, kept)
    assert torch.equal(own_value, own_kept)
