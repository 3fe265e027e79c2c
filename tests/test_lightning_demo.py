"""The Lightning demo logs what it claims: one exact smoothed point per logged optimizer step, pooled over ranks.

The demo runs with 2 gloo processes and ``accumulate_grad_batches=4`` into a temporary folder. Its logged
``train_loss`` (read back from the CSV) is checked against a float64 debiased EMA recomputed from the raw loss of
every micro-batch of every rank that the demo records: one tick per optimizer step, the tick's value being the mean
of its micro-batch losses weighted by the micro-batch sizes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")
pytest.importorskip("matplotlib", reason="the demo draws its figure with matplotlib")

from tests.ddp_utils import require_gloo

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
DEVICES = 2
ACCUMULATE = 4
EPOCHS = 2
STEPS_PER_EPOCH = 6
LOG_EVERY = 2
VAL_EVERY = 3
HALF_LIFE = 3.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _demo() -> ModuleType:
    """Import ``examples/lightning_demo.py`` by module name, so that the spawned processes can import it too."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module("lightning_demo")


def ema_oracle(raw: list[dict[str, Any]], half_life: float, ungrouped: bool = False) -> dict[int, float]:
    """Debiased weighted EMA after each optimizer step (float64), from the raw per-micro-batch records.

    With ``ungrouped=True`` every micro-batch is its own tick instead (what an EMA without the callback would do).
    """
    beta = 0.5 ** (1.0 / half_life)
    ticks: dict[Any, tuple[float, float]] = {}
    for r in sorted(raw, key=lambda r: (r["step"], r["micro_batch"], r["rank"])):
        key = (r["step"], r["micro_batch"], r["rank"]) if ungrouped else r["step"]
        s, w = ticks.get(key, (0.0, 0.0))
        ticks[key] = (s + np.float64(r["loss"]) * r["size"], w + r["size"])
    out: dict[int, float] = {}
    num = den = np.float64(0.0)
    for key in sorted(ticks):
        s, w = ticks[key]
        num, den = beta * num + s, beta * den + w
        out[key[0] if ungrouped else key] = float(num / den)  # ungrouped: the value after the step's last tick
    return out


@pytest.mark.lightning
@pytest.mark.slow
def test_lightning_demo_logs_the_pooled_ema(tmp_path: Path) -> None:
    require_gloo()
    result = _demo().main(
        [
            f"--out={tmp_path / 'demo'}",
            f"--devices={DEVICES}",
            f"--accumulate={ACCUMULATE}",
            f"--epochs={EPOCHS}",
            f"--steps-per-epoch={STEPS_PER_EPOCH}",
            f"--log-every={LOG_EVERY}",
            f"--val-every={VAL_EVERY}",
            f"--half-life={HALF_LIFE}",
            "--micro-batch=4",
        ]
    )
    steps = EPOCHS * STEPS_PER_EPOCH

    # the figure and both logs are there
    png = Path(result["png"])
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000
    assert Path(result["metrics_csv"]).is_file()
    assert list(Path(result["tensorboard_dir"]).glob("events.out.tfevents.*"))

    # the raw records: every micro-batch of every rank of every optimizer step, exactly once
    raw = result["raw"]
    seen = sorted((r["step"], r["micro_batch"], r["rank"]) for r in raw)
    expected = [(s, m, rank) for s in range(steps) for m in range(ACCUMULATE) for rank in range(DEVICES)]
    assert seen == expected

    # exactly one train point per logged optimizer step, never one per micro-batch
    train = result["train_loss"]
    logged_steps = [s for s in range(steps) if (s + 1) % LOG_EVERY == 0]
    assert [s for s, _ in train] == logged_steps
    # one validation point per validation run
    assert len(result["val_loss"]) == steps // VAL_EVERY

    # the logged values are the float64 oracle: debiased, weighted by micro-batch size, one tick per step, all ranks
    oracle = ema_oracle(raw, HALF_LIFE)
    np.testing.assert_allclose([v for _, v in train], [oracle[s] for s in logged_steps], rtol=1e-6, atol=0)

    # the check can fail: a rank-local EMA, or one ticking per micro-batch, gives another curve
    rank0 = ema_oracle([r for r in raw if r["rank"] == 0], HALF_LIFE)
    per_micro = ema_oracle(raw, HALF_LIFE, ungrouped=True)
    for other in (rank0, per_micro):
        diff = max(abs(v - other[s]) / abs(v) for s, v in train)
        assert diff > 1e-3
