"""``TrainingArguments(torch_compile=True)``: the compiled model runs the callback's hook eagerly, without recompiling.

The same run is made with and without compilation; the compiled model's losses differ from the eager ones only by
float32 rounding, so the smoothed values agree to that rounding, and no frame is compiled after the first steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer tests need `ema_metrics[transformers]`")
dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile needs dynamo")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from ema_metrics.transformers import EMALossCallback  # noqa: E402
from tests.hf_worker import VOCAB, make_data  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": VOCAB, "n_positions": 16, "bos_token_id": 0}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # compiled dropout draws other numbers


class Frames(TrainerCallback):  # type: ignore[misc]
    """The number of frames dynamo compiled so far, at the end of every optimizer step."""

    def __init__(self) -> None:
        self.frames: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.frames.append(int(dynamo.utils.counters["frames"]["total"]))


def _run(tmp_path: Path, compile_: bool) -> tuple[list[float], list[int]]:
    dynamo.reset()
    callback, frames = EMALossCallback(half_life=3), Frames()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        torch_compile=compile_,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, **NO_DROPOUT, eos_token_id=0))
    trainer = Trainer(model=model, args=args, train_dataset=make_data(32, seed=1), callbacks=[callback, frames])
    trainer.train()
    return [h["loss_ema"] for h in trainer.state.log_history if "loss_ema" in h], frames.frames


def test_a_compiled_model_logs_the_eager_values_without_recompiling(tmp_path: Path) -> None:
    compiled, frames = _run(tmp_path / "compiled", compile_=True)
    eager, _ = _run(tmp_path / "eager", compile_=False)
    assert len(compiled) == len(eager) == 8
    assert compiled == pytest.approx(eager, rel=1e-5, abs=0)
    assert frames[-1] == frames[1], frames  # every frame was compiled in the first two steps
