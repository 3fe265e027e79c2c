"""``ema_metrics.trl``: the numbers TRL's DPO and GRPO trainers log, smoothed exactly over optimizer steps.

Real TRL runs of ``trl_worker.py`` (tiny GPT-2 from a config, data and reward functions in memory, CPU, logging every
step), each against a float64 oracle built from the raw values a test-only recorder kept (the per-pair vectors and
token sums TRL gathers, the ``(sum, count)`` pairs it reduces, the rewards the Python reward functions returned):

- DPO, 6 steps of 4 pairs: ``b`` 1 process x batch 2 x accumulation 2; ``c`` 2 gloo processes x batch 2
  (checkpoint at step 3); ``d`` ``c``'s checkpoint resumed on 1 process x batch 2 x accumulation 2.
  Per pair: ``loss`` (its oracle is ``-logsigmoid(margin)`` of the gathered margins, not the loss TRL returns),
  ``rewards/*``, ``logps/*``; per chosen/completion token: ``mean_token_accuracy``, ``entropy``. The two layouts see
  the same pairs per step and log the same curves; TRL's own token numbers do not.
- GRPO, 4 steps: ``g1`` 1 process x batch 2 x accumulation 2, ``beta=0.1`` (a reference model, ``kl`` logged),
  ``loss_type="dapo"``; ``g2`` 2 gloo processes x batch 2 x accumulation 2, ``beta=0``, ``loss_type="grpo"`` (launched
  together with ``c``: one launch, one import of TRL per process). Per
  completion: ``reward``, ``reward_std``, ``rewards/<fn>/mean`` (one function returns ``None`` for some completions);
  per token: ``kl``, ``entropy``; ``loss`` per token (dapo) or per sequence (grpo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("trl", reason="the TRL tests need `ema_metrics[trl]`")

from tests.ddp_utils import free_port, require_gloo
from tests.integrations.trl import trl_worker
from tests.test_examples import ema_oracle

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "trl_worker.py"
HALF_LIFE = 2.0
# DPO trains with learning rate 0, so that the layouts see the same per-pair values (TRL's float32 DPO updates of one
# process with accumulation and of two processes differ slightly) and the curves can be compared closely
DPO = {"kind": "dpo", "steps": 6, "samples": 48, "half_life": HALF_LIFE, "lr": 0.0}
GRPO = {"kind": "grpo", "steps": 4, "half_life": HALF_LIFE}
PAIR_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
PAIR_KEYS += ["logps/chosen", "logps/rejected"]


def _launch(out: Path, processes: int, cfgs: dict[str, dict[str, Any]]) -> subprocess.Popen[str]:
    """One launch of ``processes`` workers that run every config of ``cfgs`` in turn, each into ``out / name``."""
    out.mkdir(parents=True)
    for name in cfgs:
        (out / name).mkdir()
    (out / "config.json").write_text(json.dumps([{**cfg, "out": str(out / name)} for name, cfg in cfgs.items()]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = Path(__file__).resolve().parents[3]
    # the checkout's own package first (an installed ema_metrics may be another copy), then the tests
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), str(root), env.get("PYTHONPATH")) if p)
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
    cmd = [sys.executable, *launcher, f"--master_port={free_port()}", str(WORKER), str(out / "config.json")]
    return subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen[str], out: Path, processes: int, timeout: float = 240) -> None:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (a session of their own)
        log, _ = proc.communicate()
        pytest.fail(f"TRL run in {out.name} timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, f"TRL run in {out.name} failed:\n{log[-6000:]}"


def _ranks(out: Path, processes: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def _in_process(out: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out.mkdir(parents=True)
    return [json.loads(json.dumps(trl_worker.run({**cfg, "out": str(out)})))]  # as the launched runs: JSON data


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_gloo()
    root = tmp_path_factory.mktemp("trl")
    two = root / "two"
    proc = _launch(
        two,
        2,
        {
            "c": {**DPO, "batch": 2, "accumulate": 1, "save_steps": 3},
            "g2": {**GRPO, "batch": 2, "accumulate": 2, "loss_type": "grpo"},
        },
    )
    out: dict[str, Any] = {
        "b": _in_process(root / "b", {**DPO, "batch": 2, "accumulate": 2}),
        "g1": _in_process(root / "g1", {**GRPO, "batch": 2, "accumulate": 2, "beta": 0.1, "loss_type": "dapo"}),
    }
    _finish(proc, two, 2)
    out["c"], out["g2"] = _ranks(two / "c", 2), _ranks(two / "g2", 2)
    checkpoint = str(two / "c" / "trainer" / "checkpoint-3")
    out["d"] = _in_process(root / "d", {**DPO, "batch": 2, "accumulate": 2, "resume": checkpoint})
    return out


# ---------------------------------------------------------------------------------------------- helpers
def logged(ranks: list[dict[str, Any]], key: str) -> dict[int, float]:
    """``key`` by step from the training logs (the same on every rank, checked)."""
    curves = [{h["step"]: h[key] for h in r["log_history"] if key in h and "train_runtime" not in h} for r in ranks]
    for curve in curves[1:]:
        assert curve == curves[0], f"{key} differs between ranks"
    return curves[0]


def ema_curve(ranks: list[dict[str, Any]], key: str, steps: range) -> np.ndarray:
    """``<key>_ema`` at ``steps``, NaN where it was not logged (a number not observed yet is left out)."""
    curve = logged(ranks, f"{key}_ema")
    return np.array([curve.get(s, np.nan) for s in steps])


def dpo_oracle(ranks: list[dict[str, Any]], steps: range) -> dict[str, np.ndarray]:
    """The float64 EMA of every DPO number, from what TRL gathered (rank 0 holds every rank's pairs and tokens)."""
    gathers, sums = ranks[0]["gather"], ranks[0]["gather_for_metrics"]
    out: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for s in steps:
        vectors = gathers[str(s - 1)]  # recorded during the step, at global_step s - 1
        assert len(vectors) % 6 == 0
        per_key = {k: [v for mb in vectors[i::6] for v in mb] for i, k in enumerate(PAIR_KEYS)}
        per_key["loss"] = [
            -float(torch.nn.functional.logsigmoid(torch.tensor(m, dtype=torch.float64)))
            for m in per_key["rewards/margins"]
        ]
        for key, values in per_key.items():
            out[key][0].append(float(np.sum(values, dtype=np.float64)))
            out[key][1].append(float(len(values)))
        micro = sums[str(s - 1)]
        assert len(micro) % 9 == 0  # entropy sum, tokens, ..., correct chosen tokens, chosen tokens
        for key, (num, den) in {"entropy": (0, 1), "mean_token_accuracy": (7, 8)}.items():
            out[key][0].append(sum(sum(m) for m in micro[num::9]))
            out[key][1].append(sum(sum(m) for m in micro[den::9]))
    return {key: ema_oracle(np.array(s), np.array(n), HALF_LIFE) for key, (s, n) in out.items()}


# ---------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("layout", ["b", "c"])
def test_dpo_numbers_are_the_exact_pair_and_token_weighted_emas(runs: dict[str, Any], layout: str) -> None:
    steps = range(1, 7)
    oracle = dpo_oracle(runs[layout], steps)
    assert set(oracle) == set(runs[layout][0]["keys"])
    for key, expected in oracle.items():
        # TRL's values are float32 means, read to the host by TRL: exact up to their rounding
        np.testing.assert_allclose(ema_curve(runs[layout], key, steps), expected, rtol=2e-6, atol=1e-7, err_msg=key)


def test_dpo_layouts_with_the_same_pairs_per_step_log_the_same_curves(runs: dict[str, Any]) -> None:
    steps = range(1, 7)
    for key in ("entropy", "mean_token_accuracy"):
        got, reference = ema_curve(runs["b"], key, steps), ema_curve(runs["c"], key, steps)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=2e-5, err_msg=key)
        # the check can fail: TRL's own token numbers are equal-weight means of the micro-batches (b: two of 2
        # pairs; c: one of 2 pairs per process, which TRL pools over the processes by token), so they move with
        # the layout
        own_b, own_c = logged(runs["b"], key), logged(runs["c"], key)
        assert max(abs(own_b[s] - own_c[s]) for s in steps) > 1e-3, key
    for key in ["loss", *PAIR_KEYS]:
        got, reference = ema_curve(runs["b"], key, steps), ema_curve(runs["c"], key, steps)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6, err_msg=key)


def test_dpo_resume_on_another_number_of_processes_continues_the_curve(runs: dict[str, Any]) -> None:
    # `c` ran on 2 processes and saved at step 3; `d` resumed it on 1 process with accumulation 2 (the pooled state)
    for key in runs["c"][0]["keys"]:
        # the same micro-batches of 2 pairs; TRL's values are float32 means (of the 4 pairs it gathers from two
        # processes in c, of 2 pairs in d), so they agree to float32 rounding
        before = ema_curve(runs["c"], key, range(4, 7))
        np.testing.assert_allclose(ema_curve(runs["d"], key, range(4, 7)), before, rtol=2e-7, atol=1e-9, err_msg=key)


# ---------------------------------------------------------------------------------------------- GRPO
def grpo_oracle(ranks: list[dict[str, Any]], steps: range, beta: float, loss_unit: str) -> dict[str, np.ndarray]:
    """The float64 EMA of every GRPO number, from the rewards returned on every rank and TRL's reduced token sums."""
    out: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    per_mb = 5 if beta else 4  # (kl), entropy, three clip ratios
    for s in steps:
        step = str(s - 1)
        length = [v for r in ranks for call in r["reward/length"].get(step, []) for v in call]
        even = [v for r in ranks for call in r["reward/even"].get(step, []) for v in call]
        assert len(length) == len(even) > 0  # one generation batch per step (steps_per_generation = accumulation)
        scored_even = [v for v in even if v is not None]
        total = [a + (b or 0.0) for a, b in zip(length, even, strict=True)]
        for key, values in {"rewards/length/mean": length, "rewards/even/mean": scored_even, "reward": total}.items():
            out[key][0].append(float(np.sum(values, dtype=np.float64)))
            out[key][1].append(float(len(values)))
        out["reward_std"][0].append(float(np.std(total, ddof=1)) * len(total))
        out["reward_std"][1].append(float(len(total)))
        reduced = ranks[0]["reduce"][step]
        assert len(reduced) % per_mb == 0
        tokens = sum(m[1] for m in reduced[1 if beta else 0 :: per_mb])
        if beta:
            out["kl"][0].append(sum(m[0] for m in reduced[0::per_mb]))
            out["kl"][1].append(tokens)
        out["entropy"][0].append(sum(m[0] for m in reduced[(1 if beta else 0) :: per_mb]))
        out["entropy"][1].append(tokens)
        # the Trainer's own `loss` of the step (logging every step) is the step's mean loss per token (dapo) or per
        # sequence (grpo: the same number of sequences every step): the sum of what `training_step` returned for
        # each micro-batch, averaged over the ranks; the Trainer logs it in float32, rounded to 4 decimals before
        # transformers 5
        step_loss = float(np.mean([np.sum(r["step_loss"][step], dtype=np.float64) for r in ranks]))
        np.testing.assert_allclose(step_loss, logged(ranks, "loss")[s], rtol=1e-6, atol=5.1e-5)
        units = tokens if loss_unit == "token" else float(len(length))
        out["loss"][0].append(step_loss * units)
        out["loss"][1].append(units)
    with np.errstate(invalid="ignore"):  # 0 / 0 before a function's first score: NaN, as the EMA is not logged
        return {key: ema_oracle(np.array(s), np.array(n), HALF_LIFE) for key, (s, n) in out.items()}


@pytest.mark.parametrize(("run", "beta", "unit"), [("g1", 0.1, "token"), ("g2", 0.0, "sequence")])
def test_grpo_numbers_are_the_exact_completion_and_token_weighted_emas(
    runs: dict[str, Any], run: str, beta: float, unit: str
) -> None:
    steps = range(1, 5)
    oracle = grpo_oracle(runs[run], steps, beta, unit)
    assert set(oracle) == set(runs[run][0]["keys"])
    for key, expected in oracle.items():
        # the loss oracle is built from the float32 losses the Trainer sums; the others from float32 values TRL pooled
        atol = 1e-6 if key == "loss" else 1e-7
        got = ema_curve(runs[run], key, steps)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=atol, err_msg=key)  # NaN where both are
    assert np.isnan(oracle["rewards/even/mean"]).any()  # a step where that function scored nothing: not logged
    # the check can fail: the micro-batches hold different numbers of completion tokens, so TRL's own equal-weight
    # entropy of a step is another number than the token-weighted one
    own = logged(runs[run], "entropy")
    assert abs(own[1] - oracle["entropy"][0]) > 1e-3
