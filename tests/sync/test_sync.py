"""The one sync mechanism, at 2 and 3 gloo processes, on both of its paths, against float64 pooled oracles.

Small states travel inside the one fixed-size ``all_reduce`` of a sync, with their checks; larger ones are summed by a
second ``all_reduce``. The path is chosen by the size of the first collective (``_sync.collectives.INLINE``), which
the workers set: the same metrics go through both paths here. Each oracle is a float64 numpy loop over the data of
every rank.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ema_metrics import EMAMetric, _sync
from tests.ddp_utils import FLAT_GATHER, run_ddp
from tests.sync import sync_workers as w

# first-collective sizes: everything inline; the checks of the three metrics but not their states (each alone but the
# confusion matrix inline); the checks of one small confusion matrix or EMAMetric and its probe, not its states
SMALL, LARGE, TIGHT = 1024, 44, 24
N_CLASSES = 5


def _oracles(world: int) -> list[Any]:
    """Float64 pooled EMAs of the three metrics of ``sync_workers.make_metrics`` over every rank's data."""
    beta = 1.0 - w.ALPHA
    num = den = sse = count = 0.0
    confmat = np.zeros((N_CLASSES, N_CLASSES))
    data = [w.rank_data(r, N_CLASSES) for r in range(world)]
    for t in range(w.TICKS):
        num, den, sse, count, confmat = beta * num, beta * den, beta * sse, beta * count, beta * confmat
        for rank in range(world):
            tick = data[rank][t]
            num += float(np.sum(tick["loss"] * tick["weight"]))
            den += float(np.sum(tick["weight"]))
            sse += float(np.sum((tick["yhat"] - tick["y"]) ** 2))
            count += len(tick["y"])
            np.add.at(confmat, (tick["target"], tick["preds"]), 1.0)
    return [num / den, confmat.tolist(), sse / count]


def _close(a: Any, b: Any) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-12, atol=0))


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_both_paths_give_the_pooled_oracle_on_every_rank(world: int) -> None:
    expected = _oracles(world)
    results = {inline: run_ddp(w.pooled_values, world, N_CLASSES, inline, timeout=60) for inline in (SMALL, LARGE)}
    for inline, ranks in results.items():
        for rank, res in enumerate(ranks):
            label = f"inline={inline}, rank {rank}"
            for got, want in zip(res["values"], expected, strict=True):
                assert _close(got, want), label
            assert res["computed"] == res["values"], label  # compute() pools the same way
        assert all(r["values"] == ranks[0]["values"] for r in ranks)  # identical on every rank
    small, large = results[SMALL][0], results[LARGE][0]
    for a, b in zip(small["values"], large["values"], strict=True):
        assert _close(a, b)
    # one collective for all three metrics when small; the checks' all_reduce and one sum of the states when large
    assert small["together"] == ["all_reduce"]
    assert large["together"] == ["all_reduce", "all_reduce"]
    assert small["compute"] == ["all_reduce"] * 3  # one per compute()
    # compute() of each metric alone: only the confusion matrix (25 values) is too large to travel inline, and
    # compute() sums it as synced_values does: it never gathers a large state
    assert large["compute"] == ["all_reduce"] * 4


@pytest.mark.ddp
@pytest.mark.parametrize("inline", [SMALL, TIGHT])
@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("ticks", r"ranks ticked different numbers of times \(\[6, 7\]\)"),
        ("config", r"configuration \(alpha, adjust, nan_strategy\) or state layout"),
        ("layout", r"state layout \(such as num_classes\)"),
        ("count", r"metrics per rank: \[1, 2\]"),
        ("replica", r"some ranks hold a pooled replica of the state and others a rank-local state \(\[False, True\]\)"),
    ],
)
def test_mismatched_ranks_raise_the_same_error_everywhere_without_hanging(inline: int, kind: str, match: str) -> None:
    messages = run_ddp(w.mismatch, 2, kind, inline, timeout=30)
    assert messages[0] == messages[1]
    assert re.search(match, messages[0]), messages[0]


@pytest.mark.ddp
@pytest.mark.parametrize("inline", [SMALL, TIGHT])
def test_a_subgroup_pools_its_own_ranks_only(inline: int) -> None:
    results = run_ddp(w.subgroup, 3, inline, timeout=60)
    data = [w.rank_data(r, 3) for r in (0, 2)]
    beta = 1.0 - w.ALPHA
    num = den = 0.0
    for t in range(w.TICKS):
        num, den = beta * num, beta * den
        for d in data:
            num += float(np.sum(d[t]["loss"] * d[t]["weight"]))
            den += float(np.sum(d[t]["weight"]))
    for rank in (0, 2):
        assert results[rank]["value"] == pytest.approx(num / den, rel=1e-12)
        assert results[rank]["together"] == results[rank]["value"]


@pytest.mark.parametrize("alpha", [0.5, 0.01])
def test_the_value_survives_a_million_empty_ticks(alpha: float) -> None:
    metric = EMAMetric(alpha=alpha)
    for x, n in [(3.0, 2.0), (1.0, 1.0), (2.5, 4.0)]:
        metric.update(x, weight=n)
    last = float(metric.compute())
    for _ in range(1_000_000):
        metric.begin_tick()
        metric.end_tick()
    assert metric.ticks == 1_000_003
    assert float(metric.compute()) == pytest.approx(last, rel=1e-12)
    # new data outweighs the (truly negligible) past completely
    metric.update(7.0)
    assert float(metric.compute()) == pytest.approx(7.0, rel=1e-12)


def test_alpha_one_keeps_the_last_value_like_pandas() -> None:
    values = [2.0, math.nan, math.nan, 5.0, math.nan]
    expected = pd.Series(values).ewm(alpha=1.0, adjust=True).mean().tolist()
    metric = EMAMetric(alpha=1.0, nan_strategy="ignore")
    got = []
    for x in values:
        metric.update(x)
        got.append(float(metric.compute()))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.ddp
@pytest.mark.parametrize("inline", [SMALL, TIGHT])
@pytest.mark.parametrize("silent", [False, True])
def test_long_empty_runs_stay_exact_across_ranks(inline: int, silent: bool) -> None:
    ranks = run_ddp(w.long_empty_run, 2, 0.5, 5000, inline, silent, timeout=120)
    assert ranks[0] == ranks[1]
    before, after, resumed = ranks[0]["values"]
    expected_before = _oracle_loss(2, ranks=(0,) if silent else (0, 1))
    assert before == pytest.approx(expected_before, rel=1e-12)
    assert after == pytest.approx(before, rel=1e-12)  # 5000 empty ticks at alpha 0.5: 2**-5000 of decay
    assert resumed == pytest.approx(10.0, rel=1e-12)  # only rank 0's new value counts (rank 1 added weight 0)
    # renormalized states: the checks' all_reduce, then the largest exponent (a small all_reduce) and the sum aligned
    # to it (the rare path, the same whether or not the states travelled with the checks)
    assert ranks[0]["collectives_after"] == ["all_reduce"] * 3


def _oracle_loss(world: int, ranks: tuple[int, ...] | None = None) -> float:
    beta = 1.0 - 0.5
    num = den = 0.0
    data = [w.rank_data(r, 3) for r in (range(world) if ranks is None else ranks)]
    for t in range(w.TICKS):
        num, den = beta * num, beta * den
        for d in data:
            num += float(np.sum(d[t]["loss"] * d[t]["weight"]))
            den += float(np.sum(d[t]["weight"]))
    return num / den


def test_merge_state_pools_like_a_sync_and_refuses_what_is_ill_defined() -> None:
    parts = [[1.0, 4.0, math.nan, 2.0], [3.0, 0.5, 6.0, math.inf], [2.0, 2.0, 2.0, 2.0]]
    metrics = [EMAMetric(alpha=0.4) for _ in parts]
    for m, xs in zip(metrics, parts, strict=True):
        for x in xs:
            m.update(x)
    beta = 0.6
    num = den = 0.0
    for t in range(4):
        num, den = beta * num, beta * den
        for xs in parts:
            if math.isfinite(xs[t]):
                num, den = num + xs[t], den + 1.0
    first = metrics[0].clone()
    first.merge_state(metrics[1])  # from a metric
    first.merge_state(metrics[2].state_dict())  # from a state dict (with its ticks and counters)
    with pytest.warns(UserWarning, match="2 non-finite"):  # the dropped values of both sources are still reported
        value = float(first.compute())
    assert value == pytest.approx(num / den, rel=1e-12)
    assert first.ticks == 4
    other = EMAMetric(alpha=0.4)
    for x in [1.0] * 5:
        other.update(x)
    with pytest.raises(ValueError, match="ticked 4 and 5 times"):
        metrics[0].merge_state(other)
    with pytest.raises(ValueError, match="differs in class, configuration"):
        metrics[0].merge_state(EMAMetric(alpha=0.5))
    with pytest.raises(ValueError, match="differs in class, configuration"):
        metrics[0].merge_state(EMAMetric(alpha=0.4, adjust=False))
    with pytest.raises(TypeError, match="`incoming_state` to be an EMA metric"):
        metrics[0].merge_state(torch.nn.Linear(1, 1))  # type: ignore[arg-type]
    assert _sync.collectives.INLINE == SMALL


def _own_emas(rank: int) -> tuple[float, float]:
    """Float64 EMAs of one rank's own data: the weighted loss and the MSE of ``sync_workers.spread``."""
    beta = 1.0 - w.ALPHA
    num = den = sse = count = 0.0
    for tick in w.rank_data(rank, 3):
        num, den, sse, count = beta * num, beta * den, beta * sse, beta * count
        num += float(np.sum(tick["loss"] * tick["weight"]))
        den += float(np.sum(tick["weight"]))
        sse += float(np.sum((tick["yhat"] * (rank + 1) - tick["y"]) ** 2))
        count += len(tick["y"])
    return num / den, sse / count


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_each_ranks_own_value_comes_with_the_same_collective(world: int) -> None:
    results = run_ddp(w.spread, world, timeout=60)
    own = [_own_emas(r) for r in range(world)]
    for res in results:
        assert res == results[0]  # the same on every rank
        assert res["collectives"] == [FLAT_GATHER]  # no extra collective for the spread
    for i in range(2):
        per_rank = [o[i] for o in own]
        assert results[0]["ranks"][i] == pytest.approx(per_rank, rel=1e-12)
        assert results[0]["min"][i] == pytest.approx(min(per_rank), rel=1e-12)
        assert results[0]["max"][i] == pytest.approx(max(per_rank), rel=1e-12)
        assert min(per_rank) < results[0]["pooled"][i] < max(per_rank)
    assert own[0][1] != pytest.approx(own[1][1], rel=0.1)  # the ranks' data do differ


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_a_sync_of_k_metrics_reads_back_once_and_copies_host_data_once(world: int) -> None:
    # On a GPU each read of a tensor's value on the host is a stall, and each tensor made from host data a copy. The
    # sync counts them on the CPU: one read-back (every rank's descriptors, with the pooled small states or the
    # probes of the large ones) and one copy (the descriptors made on the host), whatever the number of metrics.
    for rank, res in enumerate(run_ddp(w.stalls_per_sync, world)):
        for form, seen in res.items():
            assert len(seen["reads"]) <= 1, f"rank {rank}, {form}: {seen}"
            assert len(seen["copies"]) <= 1, f"rank {rank}, {form}: {seen}"
            assert not seen["mixed"], f"rank {rank}, {form}: {seen}"


def test_a_cpu_metric_under_nccl_is_pooled_through_a_buffer_on_the_current_cuda_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NCCL takes CUDA tensors only; the plain quick start leaves the metric on the CPU (the GPU check pools one)
    monkeypatch.setattr(_sync.collectives, "ready", lambda group=None: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    backend = {"name": "nccl"}
    monkeypatch.setattr(_sync.collectives.dist, "get_backend", lambda group=None: backend["name"])
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert _sync.comm_device(None, cpu) == torch.device("cuda", 3)
    assert _sync.comm_device(None, gpu) == gpu
    backend["name"] = "gloo"
    assert _sync.comm_device(None, cpu) == cpu
    backend["name"] = "cpu:gloo,cuda:nccl"  # a group with both: CPU tensors go to gloo
    assert _sync.comm_device(None, cpu) == cpu


@pytest.mark.ddp
def test_the_bytes_of_a_sync_do_not_grow_with_the_number_of_ranks() -> None:
    # Every collective of a sync is wrapped and the bytes it sends and receives on the rank are counted: a per-step
    # sync (small states, their checks included) is one all_reduce of INLINE float64 values on every rank at any world
    # size; a large state adds one all_reduce of its own size. An all_gather would grow with the number of ranks.
    per_world = {world: run_ddp(w.bytes_per_sync, world, timeout=60) for world in (2, 3, 4)}
    for world, ranks in per_world.items():
        assert all(r == ranks[0] for r in ranks), f"{world} ranks: {ranks}"
    first = per_world[2][0]
    assert all(ranks[0] == first for ranks in per_world.values()), per_world
    buffer = 2 * _sync.collectives.INLINE * 8  # sent and received
    assert first["synced_values"] == (buffer, ["all_reduce"])
    assert first["compute"] == (buffer, ["all_reduce"])
    large = buffer + 2 * (40 * 40 + 1) * 8  # the checks, then the states (the counts of dropped updates included)
    assert first["large synced_values"] == (large, ["all_reduce", "all_reduce"])
    assert first["large compute"] == (large, ["all_reduce", "all_reduce"])


@pytest.mark.ddp
def test_too_many_metrics_for_one_sync_raise_the_same_error_everywhere() -> None:
    # two EMAMetric need 2 * (6 + 2 * 4) check values, 2 counters and 2 exponents: 32, more than 24
    messages = run_ddp(w.too_many, 2, TIGHT, timeout=30)
    assert messages[0] == messages[1]
    for message in messages[0]:
        assert re.search(r"2 metrics need 32 values .* more than one sync carries \(24\)", message), message


def _states(n: int, ticks: int = 2, alpha: float = w.ALPHA) -> list[_sync.SyncState]:
    metrics = [EMAMetric(alpha=alpha) for _ in range(n)]
    for m in metrics:
        for t in range(ticks):
            m.update(float(t))
    return [m.sync_state() for m in metrics]


@pytest.mark.parametrize(
    ("ranks", "alike"),
    [
        ([_states(1), _states(1)], True),
        ([_states(2), _states(2), _states(2)], True),
        ([_states(1), _states(3)], False),  # another number of metrics: the layouts of the vectors differ
        ([_states(3), _states(1), _states(3)], False),
        ([_states(2), _states(2, ticks=3)], False),
        ([_states(2), _states(2, alpha=0.5)], False),
    ],
)
def test_every_rank_reads_the_same_verdict_from_the_reduced_checks(ranks: list[Any], alike: bool) -> None:
    # The all-reduce summed in one process: each rank reads the same sums through its own layout, and must reach the
    # same verdict (else one would go on to pool while another gathers to name the difference: a hang)
    local = [_sync.reduce_vector(states, r) for r, states in enumerate(ranks)]
    sums = torch.stack([v.vector for v in local]).sum(dim=0).tolist()
    verdicts = [_sync.reduced._agree(sums, v.checks, len(ranks)) for v in local]
    assert verdicts == [alike] * len(ranks)


@pytest.mark.parametrize("ranks", [2, 1024, 1025, 2**20 - 1])
@pytest.mark.parametrize("chunk", [1, 2**16 - 1])
def test_the_verdict_is_exact_at_the_extremes_of_chunks_and_ranks(ranks: int, chunk: int) -> None:
    # The largest chunks at the most ranks (the float and the integer comparisons both): one rank sending a chunk one
    # below the others must be told apart from every rank sending the same, at every check position
    checks = _sync.reduced.HEAD_CHUNKS + _sync.reduced.TICK_CHUNKS
    for position in range(checks):
        for odd in (None, chunk - 1):
            sent = [chunk] * ranks if odd is None else [chunk] * (ranks - 1) + [odd]
            # the layout: the head's chunks then their squares, the metrics' chunks then theirs
            head, rest = _sync.reduced.HEAD_CHUNKS, _sync.reduced.TICK_CHUNKS
            alike, squares = float(chunk * ranks), float(chunk * chunk * ranks)
            sums = [alike] * head + [squares] * head + [alike] * rest + [squares] * rest
            at, square_at = (position, head + position) if position < head else (head + position, checks + position)
            sums[at], sums[square_at] = float(sum(sent)), float(sum(c * c for c in sent))
            # both sums exact in float64 (the premise of the check)
            assert sums[at] == sum(sent)
            assert sums[square_at] == sum(c * c for c in sent)
            assert _sync.reduced._agree(sums, checks, ranks) is (odd is None), (position, odd)


def test_the_layout_of_a_sync_is_built_once_and_rebuilt_when_it_changes() -> None:
    metrics = [EMAMetric(alpha=w.ALPHA) for _ in range(2)]
    for m in metrics:
        m.update(1.0)
    first = _sync.reduce_vector([m.sync_state() for m in metrics], 0).plan
    for m in metrics:
        m.update(2.0)
    assert _sync.reduce_vector([m.sync_state() for m in metrics], 0).plan is first  # the ticks changed, not the layout
    other = EMAMetric(alpha=0.5)  # another configuration: another fingerprint in the head
    other.update(1.0)
    changed = _sync.reduce_vector([metrics[0].sync_state(), other.sync_state()], 0).plan
    assert changed is not first
    assert changed.head != first.head
    # the same metrics and the same vector from a fresh layout: the cache changes nothing but the time
    _sync.reduced._PLANS.clear()
    states = [m.sync_state() for m in metrics]
    fresh = _sync.reduce_vector(states, 0)
    assert fresh.plan is not first
    assert fresh.plan.head == first.head
    assert torch.equal(fresh.vector, _sync.reduce_vector(states, 0).vector)
