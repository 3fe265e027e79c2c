"""``EMALossCallback`` with TRL's trainers: exact where the model's loss is the trained loss, refused elsewhere.

Real TRL runs (tiny GPT-2 built from a config, a word-level tokenizer built in memory, data made in memory, CPU):

- ``SFTTrainer`` (``loss_type="nll"``), training the whole model or PEFT LoRA adapters (a ``PeftModel`` wrapping it):
  ``loss_ema`` is the EMA over optimizer steps of the token-weighted loss, exactly against a float64 oracle of the
  losses the model returned, and within the float32 rounding of TRL's fused head against float64 token losses
  recomputed by an independent forward; ``ema_metrics.trl``'s smoothed SFT ``loss`` is the same curve;
- ``SFTTrainer(loss_type="dft")`` and ``DPOTrainer``: refused when training starts, naming the trainer (before, they
  logged another number than the loss they optimize: the NLL of the completion labels);
- forwards that train nothing (``generate()``, which runs in training mode under ``no_grad``, and a reference
  forward under ``no_grad``) are not counted (``generate`` used to stop training with a misleading error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("trl", reason="the TRL tests need `trl`")

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from ema_metrics.transformers import EMALossCallback
from tests.test_examples import ema_oracle

pytestmark = pytest.mark.slow

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(40)]
HALF_LIFE = 3.0


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=len(WORDS), n_positions=32, bos_token_id=2, eos_token_id=2
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def _common(tmp_path: Path) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
    }


def _texts(n: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    return [{"text": " ".join(f"w{i}" for i in rng.integers(3, 40, size=int(rng.integers(2, 12))))} for _ in range(n)]


class TokenLosses:
    """An independent record of each training micro-batch: float64 token losses from a forward of its own.

    TRL's SFT calls the model through a fused loss that returns no logits, so the hook recomputes them from the
    model's transformer and head (a forward of submodules, which the callback's hook on the model does not see).
    """

    def __init__(self) -> None:
        self.step = 0
        self.tokens: dict[int, list[tuple[float, int]]] = {}
        self.model_tokens: dict[int, list[tuple[float, int]]] = {}

    def on_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step

    def hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        net = module.get_base_model() if hasattr(module, "get_base_model") else module  # a PEFT model: its LoRA layers
        with torch.no_grad():
            inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in kwargs}
            hidden = net.transformer(**inputs).last_hidden_state
            logits = net.lm_head(hidden).to(torch.float64)[:, :-1]
        labels = kwargs["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        valid = labels != -100
        count = int(valid.sum())
        self.tokens.setdefault(self.step, []).append((float(per_token[valid].sum()), count))
        # the loss the model returned (its fused head), as a sum over the same tokens
        self.model_tokens.setdefault(self.step, []).append((float(output.loss) * count, count))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_logs_the_exact_token_weighted_ema(tmp_path: Path, lora: bool) -> None:
    from transformers import TrainerCallback

    from ema_metrics.trl import attach

    record = TokenLosses()

    class Recorder(TrainerCallback):  # type: ignore[misc]
        on_step_begin = record.on_step

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            model.register_forward_hook(record.hook, with_kwargs=True)

    callback = EMALossCallback(half_life=HALF_LIFE)
    args = SFTConfig(max_steps=6, gradient_accumulation_steps=2, learning_rate=0.05, **_common(tmp_path))
    peft: dict[str, Any] = {}
    if lora:  # PEFT (LoRA adapters on the attention): the Trainer trains a PeftModel that wraps GPT-2
        from peft import LoraConfig

        peft["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=_model(),
        args=args,
        train_dataset=Dataset.from_list(_texts(24)),
        processing_class=_tokenizer(),
        callbacks=[callback, Recorder()],
        **peft,
    )
    assert type(trainer.model).__name__ == ("PeftModelForCausalLM" if lora else "GPT2LMHeadModel")
    attach(trainer, half_life=HALF_LIFE, suffix="_sm")  # TRL's numbers too: its SFT loss read from compute_loss
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_ema" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5, 6]
    got = [h["loss_ema"] for h in logs]
    for tokens, rtol in ((record.model_tokens, 1e-9), (record.tokens, 1e-4)):
        steps = [tokens[s] for s in range(6)]  # per step: (summed token loss, count) per micro-batch
        assert all(len(micro) == 2 for micro in steps)
        sums = np.array([sum(s for s, _ in micro) for micro in steps])
        counts = np.array([sum(n for _, n in micro) for micro in steps], dtype=np.float64)
        # exact against the losses the model returned; their fused float32 head is within 1e-4 of float64 NLL
        np.testing.assert_allclose(got, ema_oracle(sums, counts, HALF_LIFE), rtol=rtol, atol=0)
    # TRL's SFT loss, smoothed by `ema_metrics.trl` from what compute_loss returned: the same curve
    np.testing.assert_allclose([h["loss_sm"] for h in logs], got, rtol=1e-6, atol=0)
    # the check can fail: TRL's own `loss` (divided by the unshifted label count) is another number
    assert abs(logs[-1]["loss"] - got[-1]) / got[-1] > 1e-2


@pytest.mark.parametrize("trainer_name", ["dft", "dpo"])
def test_trainers_that_optimize_another_loss_are_refused_naming_the_trainer(tmp_path: Path, trainer_name: str) -> None:
    callback = EMALossCallback(half_life=HALF_LIFE)
    trainer: Any
    if trainer_name == "dft":
        args = SFTConfig(max_steps=2, loss_type="dft", **_common(tmp_path))
        trainer = SFTTrainer(
            model=_model(),
            args=args,
            train_dataset=Dataset.from_list(_texts(8)),
            processing_class=_tokenizer(),
            callbacks=[callback],
        )
        match = r"SFTTrainer with loss_type='dft' optimizes another loss"
    else:
        data = [{"prompt": "w1 w2", "chosen": " w3 w4", "rejected": " w5"}] * 8
        trainer = DPOTrainer(
            model=_model(),
            ref_model=_model(),
            args=DPOConfig(max_steps=2, **_common(tmp_path)),
            train_dataset=Dataset.from_list(data),
            processing_class=_tokenizer(),
            callbacks=[callback],
        )
        match = r"DPOTrainer \(DPOConfig\) optimizes a loss of its own"
    with pytest.raises(ValueError, match=match + r".* `loss_ema` would be another number"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused when training starts, before any step


def test_forwards_that_train_nothing_are_not_counted() -> None:
    # generate() calls the model in training mode (as GRPO does) without labels, under no_grad; a reference forward
    # through the policy runs under no_grad with labels: neither is a training observation
    callback = EMALossCallback(half_life=HALF_LIFE)
    model = _model().train()
    callback._hook = model.register_forward_hook(callback._on_forward, with_kwargs=True)
    ids = torch.tensor([[3, 4, 5, 6]])
    callback.metric.begin_tick()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model(ids, labels=ids)
    assert callback.metric._numel == 0
    loss = model(ids, labels=ids).loss  # the training forward is counted
    callback.metric.end_tick()
    assert callback.metric._numel == 1
    assert float(callback.metric.compute()) == pytest.approx(float(loss), rel=1e-6)
