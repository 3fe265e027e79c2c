"""The examples compute what they claim: checked against a float64 numpy EMA of the losses they report.

Each example returns, per optimizer step, the per-sample losses every rank saw and the smoothed loss it logged. The
oracle pools the losses of all ranks and micro-batches of a step (S_i = their sum, N_i = their count) and evaluates
the debiased EMA directly as sum_i beta^(t-i) S_i / sum_i beta^(t-i) N_i, with beta = 0.5 ** (1 / half_life).
"""

from __future__ import annotations

import functools
import importlib
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.ddp_utils import require_gloo

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
HALF_LIFE = 5.0
STEPS = 20
SETTINGS: dict[str, Any] = {
    "steps": STEPS,
    "accumulate": 3,
    "micro_batch": 4,
    "half_life": HALF_LIFE,
    "log_every": 5,
    "seed": 0,
}
# which keyword of each example's run() sets the number of processes
PROCESS_ARG = {"ddp_gloo": "world_size", "fabric_loop": "devices", "accelerate_loop": "num_processes"}


def _example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by module name, so that spawned processes can import it too."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)


@functools.cache
def _results(name: str, processes: int) -> list[dict[str, Any]]:
    """Run an example once per test session (several tests read the same run)."""
    if processes > 1:
        require_gloo()
    return list(_example(name).run(**{PROCESS_ARG[name]: processes}, **SETTINGS))


def ema_oracle(sums: np.ndarray, counts: np.ndarray, half_life: float) -> np.ndarray:
    """Debiased weighted EMA after each tick, evaluated from its closed form in float64."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    beta = 0.5 ** (1.0 / half_life)
    out = np.empty(len(sums))
    for t in range(len(sums)):
        decay = beta ** (t - np.arange(t + 1))
        out[t] = (decay @ sums[: t + 1]) / (decay @ counts[: t + 1])
    return out


def pooled(results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the sum of the per-sample losses over all ranks, and their number."""
    steps = len(results[0]["losses"])
    sums = np.array([sum(np.sum(r["losses"][i], dtype=np.float64) for r in results) for i in range(steps)])
    counts = np.array([sum(len(r["losses"][i]) for r in results) for i in range(steps)], dtype=np.float64)
    return sums, counts


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


# ---------------------------------------------------------------------------------------------- plain loop
def test_plain_loop_is_ema_of_pooled_step_mean() -> None:
    history = _example("plain_loop").train(steps=40, accumulate=4, micro_batch=8, half_life=10)
    assert [log.step for log in history] == list(range(40))
    sums = np.array([np.dot(log.micro_losses, log.micro_sizes) for log in history])
    counts = np.array([sum(log.micro_sizes) for log in history], dtype=np.float64)
    smoothed = np.array([log.smoothed for log in history])
    np.testing.assert_allclose(smoothed, ema_oracle(sums, counts, 10), rtol=1e-9, atol=0)
    assert [log.raw for log in history] == [log.micro_losses[-1] for log in history]
    # the check can fail: one tick per micro-batch (no grouping) gives another curve
    micro_losses = np.array([log.micro_losses for log in history]).reshape(-1)
    micro_sizes = np.array([log.micro_sizes for log in history], dtype=np.float64).reshape(-1)
    ungrouped = ema_oracle(micro_losses * micro_sizes, micro_sizes, 10)[3::4]  # value after each step's last tick
    assert max_rel_diff(smoothed, ungrouped) > 1e-2
    assert smoothed[-1] < smoothed[0] / 10  # the model does learn


def test_plain_loop_cli_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES_DIR / "plain_loop.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert lines[0].startswith("step=  0 raw=")


# ---------------------------------------------------------------------------------------------- distributed examples
def check_against_oracle(results: list[dict[str, Any]], processes: int) -> None:
    assert [r["rank"] for r in results] == list(range(processes))
    for r in results:
        assert len(r["losses"]) == len(r["smoothed"]) == STEPS
        assert all(len(step) == 3 * (4 + r["rank"]) for step in r["losses"])  # rank r uses micro-batches of 4 + r
    oracle = ema_oracle(*pooled(results), HALF_LIFE)
    for r in results:  # the synced value, identical on every rank
        np.testing.assert_allclose(r["smoothed"], oracle, rtol=1e-6, atol=0, err_msg=f"rank {r['rank']}")
    for r in results[1:]:  # the replicas stayed in sync through the accumulation
        np.testing.assert_allclose(r["params"], results[0]["params"], rtol=1e-6, atol=1e-7)
    assert oracle[-1] < oracle[0] / 5  # the model does learn
    if processes > 1:
        # the check can fail: a rank-local EMA, or one of the unweighted mean of the rank means, is another curve
        local = ema_oracle(*pooled(results[:1]), HALF_LIFE)
        assert max_rel_diff(results[0]["smoothed"], local) > 1e-2
        means = np.array([[np.mean(step) for step in r["losses"]] for r in results]).mean(axis=0)
        unweighted = ema_oracle(means, np.ones(STEPS), HALF_LIFE)
        assert max_rel_diff(results[0]["smoothed"], unweighted) > 1e-3


@pytest.mark.ddp
def test_ddp_gloo_matches_pooled_oracle() -> None:
    check_against_oracle(_results("ddp_gloo", 2), 2)


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.ddp)])
def test_fabric_matches_pooled_oracle(devices: int) -> None:
    check_against_oracle(_results("fabric_loop", devices), devices)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.ddp)])
def test_accelerate_matches_pooled_oracle(processes: int) -> None:
    check_against_oracle(_results("accelerate_loop", processes), processes)


@pytest.mark.ddp
def test_examples_agree_across_frameworks() -> None:
    # same seeds, data and model: DDP, Fabric and Accelerate see the same losses and log the same smoothed curve
    reference = _results("ddp_gloo", 2)
    for name in ("fabric_loop", "accelerate_loop"):
        other = _results(name, 2)
        for r, o in zip(reference, other, strict=True):
            np.testing.assert_allclose(o["smoothed"], r["smoothed"], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(np.concatenate(o["losses"]), np.concatenate(r["losses"]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Hugging Face Trainer
def test_hf_trainer_logs_the_token_weighted_ema_of_optimizer_steps() -> None:
    pytest.importorskip("transformers", reason="the Trainer example needs `ema_metrics[transformers]`")
    from tests.hf_worker import make_recorder

    records: dict[str, Any] = {}
    logs = _example("hf_trainer").train(
        steps=12, accumulate=2, batch=4, half_life=4, logging_steps=3, callbacks=[make_recorder(None, records)]
    )
    assert [log["step"] for log in logs] == [3, 6, 9, 12]
    steps = [records["tokens"][str(s)] for s in range(12)]  # per step: [summed token loss, count] per micro-batch
    assert all(len(micro) == 2 for micro in steps)
    sums = np.array([sum(s for s, _ in micro) for micro in steps])
    counts = np.array([sum(n for _, n in micro) for micro in steps], dtype=np.float64)
    oracle = ema_oracle(sums, counts, 4)[[2, 5, 8, 11]]
    np.testing.assert_allclose([log["loss_ema"] for log in logs], oracle, rtol=1e-6, atol=0)
    # the check can fail: weighting each micro-batch equally (its mean loss) gives another curve
    means = np.array([np.mean([s / n for s, n in micro]) for micro in steps])
    assert max_rel_diff(ema_oracle(means, np.ones(12), 4)[[2, 5, 8, 11]], oracle) > 1e-3
    assert logs[-1]["loss_ema"] < logs[0]["loss_ema"]  # the model learns to count


def test_hf_trainer_cli_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="the Trainer example needs `ema_metrics[transformers]`")
    _example("hf_trainer").main(["--steps", "5", "--accumulate", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=")]
    assert lines == [lines[0]]
    assert lines[0].startswith("step=  5 loss=")
    assert "loss_ema=" in lines[0]
