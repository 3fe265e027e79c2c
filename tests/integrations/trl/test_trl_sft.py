"""``ema_metrics.trl`` with ``SFTTrainer``: the loss per token (NLL or DFT), ``mean_token_accuracy`` and ``entropy``
per token, smoothed exactly over optimizer steps.

Real SFT runs of ``trl_worker.py`` in the test process (tiny GPT-2 from a config, texts of 2 to 11 words, 4 steps of
4 texts): ``a`` batch 4; ``b`` batch 2 x accumulation 2 (the same texts per step); ``dft`` as ``b`` with
``loss_type="dft"``. Oracles: the token sums TRL gathers (``gather_for_metrics``: valid tokens, entropy sum, correct
tokens) and the float64 token losses a test-only hook recomputes from the model's own submodules; for the NLL also
``EMALossCallback`` in the same run (tested exact on its own in ``tests/integrations/transformers/test_trl.py``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

pytest.importorskip("trl", reason="the TRL tests need `ema_metrics[trl]`")

from tests.integrations.trl import trl_worker
from tests.test_examples import ema_oracle

pytestmark = pytest.mark.slow

HALF_LIFE = 2.0
STEPS = range(1, 5)
SFT = {"kind": "sft", "steps": 4, "samples": 16, "half_life": HALF_LIFE, "suffix": "_sm"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sft")
    layouts = {
        "a": {"batch": 4, "accumulate": 1},
        "b": {"batch": 2, "accumulate": 2},
        "dft": {"batch": 2, "accumulate": 2, "loss_type": "dft"},
    }
    out = {}
    for name, layout in layouts.items():
        (root / name).mkdir()
        out[name] = json.loads(json.dumps(trl_worker.run({**SFT, **layout, "out": str(root / name)})))
    return out


def curve(run: dict[str, Any], key: str) -> np.ndarray:
    logged = {h["step"]: h[key] for h in run["log_history"] if key in h and "train_runtime" not in h}
    return np.array([logged[s] for s in STEPS])


def oracle(run: dict[str, Any]) -> dict[str, np.ndarray]:
    sums: dict[str, list[float]] = {k: [] for k in ("mean_token_accuracy", "entropy", "nll", "dft")}
    counts: list[float] = []
    for s in STEPS:
        gathered = run["gather_for_metrics"][str(s - 1)]
        assert len(gathered) % 4 == 0  # per micro-batch: valid tokens, entropy sum, correct tokens, attention tokens
        counts.append(sum(sum(m) for m in gathered[0::4]))
        sums["entropy"].append(sum(sum(m) for m in gathered[1::4]))
        sums["mean_token_accuracy"].append(sum(sum(m) for m in gathered[2::4]))
        tokens = run["tokens"][str(s - 1)]
        assert sum(n for _, _, n in tokens) == counts[-1]  # the hook counts the tokens TRL counts
        sums["nll"].append(sum(nll for nll, _, _ in tokens))
        sums["dft"].append(sum(dft for _, dft, _ in tokens))
    return {key: ema_oracle(np.array(v), np.array(counts), HALF_LIFE) for key, v in sums.items()}


@pytest.mark.parametrize("layout", ["a", "b", "dft"])
def test_sft_numbers_are_the_exact_token_weighted_emas(runs: dict[str, Any], layout: str) -> None:
    run, expected = runs[layout], oracle(runs[layout])
    for key in ("mean_token_accuracy", "entropy"):
        np.testing.assert_allclose(curve(run, f"{key}_sm"), expected[key], rtol=2e-6, atol=1e-7, err_msg=key)
    loss = "dft" if layout == "dft" else "nll"
    # TRL's fused float32 head against float64 token losses recomputed by an independent forward
    np.testing.assert_allclose(curve(run, "loss_sm"), expected[loss], rtol=1e-5, err_msg=loss)
    if layout != "dft":  # against EMALossCallback, which reads the loss the model returned (another float32 sum)
        np.testing.assert_allclose(curve(run, "loss_sm"), curve(run, "loss_ema"), rtol=1e-6)
    # the check can fail: TRL's own `loss` divides by the unshifted label count (GPT-2, transformers 5.25)
    assert np.max(np.abs(curve(run, "loss") - curve(run, "loss_sm"))) > 1e-2


def test_sft_accumulation_does_not_change_the_curves(runs: dict[str, Any]) -> None:
    for key in ("loss_sm", "mean_token_accuracy_sm", "entropy_sm"):
        np.testing.assert_allclose(curve(runs["b"], key), curve(runs["a"], key), rtol=1e-6, atol=1e-7, err_msg=key)
    # the check can fail: TRL's own mean_token_accuracy is an equal-weight mean of the micro-batches
    own = np.abs(curve(runs["b"], "mean_token_accuracy") - curve(runs["a"], "mean_token_accuracy"))
    assert np.max(own) > 1e-3
