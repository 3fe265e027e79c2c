"""The Hugging Face Trainer integration logs the exact token-weighted loss EMA, whatever the layout.

Six Trainer runs of ``tests/hf_worker.py`` (tiny GPT-2 from a config, random padded tokens, the same samples in each
optimizer step, 2 epochs of 6 steps, checkpoint at step 6):

- ``a``: 1 process x accumulation 4 (batch 2), reporting to TensorBoard and MLflow;
- ``b``: 2 processes (gloo) x accumulation 2 (batch 2), reporting to TensorBoard;
- ``c``: 1 process x accumulation 1 (batch 8, the combined batch);
- ``d``: ``b``'s checkpoint resumed on 1 process x accumulation 4 (pooled state);
- ``e``: ``b``'s checkpoint resumed on 2 processes x accumulation 2 (per-rank state);
- ``f``: ``a``'s checkpoint resumed on 2 processes x accumulation 2 (pooled state on rank 0, none on rank 1).

The oracle is a float64 EMA over optimizer steps of the per-token losses that a test-only hook recomputed from the
logits on every rank: sum_i beta^(t-i) S_i / sum_i beta^(t-i) N_i, S_i the summed token losses of step i over all
micro-batches and ranks, N_i their number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer tests need `ema_metrics[transformers]`")

from tests.ddp_utils import FLAT_GATHER, free_port, require_gloo
from tests.lightning_helpers import read_tb_metric

WORKER = Path(__file__).resolve().parents[2] / "hf_worker.py"
HALF_LIFE = 3.0
STEPS = 12  # 2 epochs of 48 samples, 8 samples per optimizer step
LOGGED = [2, 4, 6, 8, 10, 12]  # logging_steps=2
COMMON = {"epochs": 2, "logging_steps": 2, "samples": 48, "half_life": HALF_LIFE, "save_steps": 6}
LAYOUTS = {  # name: (processes, per-device batch, accumulation)
    "a": (1, 2, 4),
    "b": (2, 2, 2),
    "c": (1, 8, 1),
}


def _launch(out: Path, processes: int, batch: int, accumulate: int, **extra: Any) -> subprocess.Popen[str]:
    out.mkdir(parents=True)
    cfg = {"out": str(out), "batch": batch, "accumulate": accumulate, **COMMON, **extra}
    (out / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(MLFLOW_TRACKING_URI=f"file:{out / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true")
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(WORKER), str(out / "config.json")]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        cmd = [sys.executable, *launcher, f"--master_port={free_port()}", *cmd[1:]]
    return subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen[str], out: Path, processes: int, timeout: float = 150) -> list[dict[str, Any]]:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (a session of their own)
        log, _ = proc.communicate()
        pytest.fail(f"Trainer run in {out.name} timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, f"Trainer run in {out.name} failed:\n{log[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_gloo()
    root = tmp_path_factory.mktemp("hf")
    reports = {"a": ["tensorboard", "mlflow"], "b": ["tensorboard"], "c": []}
    procs = {
        name: _launch(root / name, p, b, k, report_to=reports[name], rank_spread=name == "b")
        for name, (p, b, k) in LAYOUTS.items()
    }
    out: dict[str, Any] = {name: _finish(proc, root / name, LAYOUTS[name][0]) for name, proc in procs.items()}
    resumed = {"d": (1, 2, 4, "b"), "e": (2, 2, 2, "b"), "f": (2, 2, 2, "a")}  # (..., the run resumed)
    procs = {
        name: _launch(root / name, p, b, k, resume=str(root / src / "trainer" / "checkpoint-6"))
        for name, (p, b, k, src) in resumed.items()
    }
    out.update({name: _finish(proc, root / name, resumed[name][0]) for name, proc in procs.items()})
    out["root"] = root
    return out


# ---------------------------------------------------------------------------------------------- oracles
def ema_oracle(sums: np.ndarray, counts: np.ndarray, half_life: float) -> np.ndarray:
    """Debiased weighted EMA after each tick, evaluated from its closed form in float64."""
    beta = 0.5 ** (1.0 / half_life)
    out = np.empty(len(sums))
    for t in range(len(sums)):
        decay = beta ** (t - np.arange(t + 1))
        out[t] = (decay @ sums[: t + 1]) / (decay @ counts[: t + 1])
    return out


def step_totals(ranks: list[dict[str, Any]], steps: range) -> tuple[np.ndarray, np.ndarray]:
    """Per optimizer step: the summed per-token losses and the token count over every micro-batch and rank."""
    rows = [[mb for r in ranks for mb in r["tokens"][str(s)]] for s in steps]
    return np.array([sum(s for s, _ in row) for row in rows]), np.array([sum(n for _, n in row) for row in rows], float)


def per_micro_batch_curve(ranks: list[dict[str, Any]]) -> np.ndarray:
    """What an EMA ticked once per micro-batch (pooled over ranks) would log after each optimizer step."""
    sums, counts, last = [], [], []
    for s in range(STEPS):
        micro = [r["tokens"][str(s)] for r in ranks]
        for j in range(len(micro[0])):
            sums.append(sum(m[j][0] for m in micro))
            counts.append(sum(m[j][1] for m in micro))
        last.append(len(sums) - 1)
    return ema_oracle(np.array(sums), np.array(counts, float), HALF_LIFE)[last]


def logged(rank: dict[str, Any], key: str = "loss_ema") -> dict[int, float]:
    return {h["step"]: h[key] for h in rank["log_history"] if key in h}


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.ddp
@pytest.mark.slow
def test_layouts_log_the_same_curve_equal_to_the_token_oracle(runs: dict[str, Any]) -> None:
    curves, micro_curves = {}, {}
    for name in LAYOUTS:
        ranks = runs[name]
        sums, counts = step_totals(ranks, range(STEPS))
        oracle = ema_oracle(sums, counts, HALF_LIFE)
        for rank in ranks:  # the pooled value, in log_history on every rank
            points = logged(rank)
            assert sorted(points) == LOGGED, name
            np.testing.assert_allclose([points[s] for s in LOGGED], oracle[np.array(LOGGED) - 1], rtol=1e-6)
        curves[name] = np.array([logged(ranks[0])[s] for s in LOGGED])
        micro_curves[name] = per_micro_batch_curve(ranks)[np.array(LOGGED) - 1]
    # the same samples in every optimizer step (token counts), micro-batch token counts that differ strongly
    counts = {name: step_totals(runs[name], range(STEPS))[1] for name in LAYOUTS}
    assert counts["a"].tolist() == counts["b"].tolist() == counts["c"].tolist()
    micro_counts = [n for s in range(STEPS) for _, n in runs["a"][0]["tokens"][str(s)]]
    assert min(micro_counts) <= 6
    assert max(micro_counts) >= 20
    for name in ("b", "c"):
        assert rel(curves[name], curves["a"]) < 1e-6, name
        # an EMA ticked per micro-batch is another curve for each layout: the test tells them apart
        assert rel(micro_curves[name], micro_curves["a"]) > 1e-3, name
    # the model learns across the two epochs, and the curve runs on through the epoch boundary (no restart)
    assert curves["a"][-1] < curves["a"][0] - 0.01
    # layout b also logs the spread of the ranks' own EMAs, from the same collective, on every rank
    own = [ema_oracle(*step_totals([rank], range(STEPS)), HALF_LIFE)[np.array(LOGGED) - 1] for rank in runs["b"]]
    assert rel(own[0], own[1]) > 1e-3  # the ranks' token losses differ
    for rank in runs["b"]:
        low, high = logged(rank, "loss_ema/rank_min"), logged(rank, "loss_ema/rank_max")
        np.testing.assert_allclose([low[s] for s in LOGGED], np.minimum(*own), rtol=1e-6)
        np.testing.assert_allclose([high[s] for s in LOGGED], np.maximum(*own), rtol=1e-6)
    # the Trainer's own `loss` is another number (a window mean with its own token count)
    assert rel([logged(runs["a"][0], "loss")[s] for s in LOGGED], curves["a"]) > 1e-2


@pytest.mark.ddp
@pytest.mark.slow
def test_one_collective_per_logging_step_and_one_per_checkpoint(runs: dict[str, Any]) -> None:
    for rank in runs["b"]:
        calls = [tuple(c) for c in rank["collectives"]]
        on_log = [(step, name) for step, name, caller in calls if caller == "on_log"]
        assert on_log == [(s, FLAT_GATHER) for s in LOGGED]
        saves = [(step, caller) for step, _, caller in calls if caller != "on_log"]
        assert saves == [(6, "on_step_end"), (12, "on_step_end")]  # every rank's state, before save_steps=6 saves


@pytest.mark.ddp
@pytest.mark.slow
def test_every_reporter_receives_loss_ema(runs: dict[str, Any]) -> None:
    expected = [(s, logged(runs["a"][0])[s]) for s in LOGGED]
    tb = read_tb_metric(runs["root"] / "a" / "trainer", "train/loss_ema")
    assert [s for s, _ in tb] == LOGGED
    np.testing.assert_allclose([v for _, v in tb], [v for _, v in expected], rtol=1e-6)  # TensorBoard stores float32

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file:{runs['root'] / 'a' / 'mlruns'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss_ema"))
    assert history == expected  # float64 end to end

    tb2 = read_tb_metric(runs["root"] / "b" / "trainer", "train/loss_ema")  # under DDP, written by rank 0
    np.testing.assert_allclose([v for _, v in tb2], [logged(runs["b"][0])[s] for s in LOGGED], rtol=1e-6)
    order = runs["a"][0]["callbacks"]
    assert order.index("EMALossCallback") < min(order.index("TensorBoardCallback"), order.index("MLflowCallback"))


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.ddp
@pytest.mark.slow
def test_resume_on_the_same_world_size_restores_each_rank_exactly(runs: dict[str, Any]) -> None:
    for saved, resumed in zip(runs["b"], runs["e"], strict=True):
        assert resumed["states"]["begin"] == saved["states"]["6"]  # bit-exact per rank
    after = [s for s in LOGGED if s > 6]
    for rank in runs["e"]:
        points = logged(rank)  # the log_history of the checkpoint (steps <= 6), then the resumed run's
        assert sorted(points) == LOGGED
        assert rel([points[s] for s in after], [logged(runs["b"][0])[s] for s in after]) < 1e-9


@pytest.mark.ddp
@pytest.mark.slow
def test_resume_on_more_processes_continues_the_curve(runs: dict[str, Any]) -> None:
    first, second = runs["f"]
    assert first["states"]["begin"] == runs["a"][0]["states"]["6"]  # rank 0 takes the saved (pooled) state
    assert second["states"]["begin"]["ticks"] == 6  # rank 1 starts with no observation, in step with rank 0
    assert all(not any(np.ravel(v)) for v in second["states"]["begin"]["tensors"].values())
    sums_before, counts_before = step_totals(runs["a"], range(6))
    sums_after, counts_after = step_totals(runs["f"], range(6, STEPS))
    oracle = ema_oracle(np.r_[sums_before, sums_after], np.r_[counts_before, counts_after], HALF_LIFE)
    after = [s for s in LOGGED if s > 6]
    for rank in runs["f"]:
        points = logged(rank)
        np.testing.assert_allclose([points[s] for s in after], oracle[np.array(after) - 1], rtol=1e-6)


@pytest.mark.ddp
@pytest.mark.slow
def test_resume_on_fewer_processes_continues_the_pooled_curve(runs: dict[str, Any]) -> None:
    (resumed,) = runs["d"]
    assert resumed["states"]["begin"]["ticks"] == 6
    for key, value in resumed["states"]["begin"]["tensors"].items():  # rank 0 holds the sum of the saved ranks
        value = torch.tensor(value, dtype=torch.float64)
        total = sum(torch.tensor(r["states"]["6"]["tensors"][key], dtype=torch.float64) for r in runs["b"])
        torch.testing.assert_close(value, total, rtol=1e-12, atol=0)
    sums_before, counts_before = step_totals(runs["b"], range(6))
    sums_after, counts_after = step_totals(runs["d"], range(6, STEPS))
    oracle = ema_oracle(np.r_[sums_before, sums_after], np.r_[counts_before, counts_after], HALF_LIFE)
    after = [s for s in LOGGED if s > 6]
    points = logged(resumed)
    assert sorted(points) == LOGGED
    np.testing.assert_allclose([points[s] for s in after], oracle[np.array(after) - 1], rtol=1e-6)
    assert rel([points[s] for s in after], [logged(runs["b"][0])[s] for s in after]) < 1e-6
