"""Hugging Face Trainer: the exact token-weighted loss EMA (`loss_ema`) next to the Trainer's own `loss`.

A tiny GPT-2 built from a config (nothing is downloaded) learns to count (each token is the previous one plus one)
on padded sequences of very different lengths. One line adds the smoothed loss to every log, to
`trainer.state.log_history` and to every `report_to` integration:

    Trainer(..., callbacks=[EMALossCallback(half_life=10)])

The Trainer's `loss` is the mean of the last `logging_steps` optimizer steps, each step counted equally whatever its
number of tokens, and it restarts at every log. `loss_ema` is a debiased EMA over optimizer steps of the mean loss
per token, pooled over every micro-batch of every process.

Run: python examples/hf_trainer.py    (or: torchrun --nproc_per_node 2 examples/hf_trainer.py)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ema_metrics.transformers import EMALossCallback

VOCAB, SEQ = 32, 24


def counting_data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences ``s, s+1, s+2, ...`` (mod ``VOCAB``) of 3 to ``SEQ`` tokens, right-padded; labels -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, SEQ + 1, (1,), generator=gen))
        ids = (torch.randint(0, VOCAB, (1,), generator=gen) + torch.arange(SEQ)) % VOCAB
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def train(
    steps: int = 60,
    accumulate: int = 4,
    batch: int = 4,
    half_life: float = 10,
    logging_steps: int = 5,
    seed: int = 0,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Train for ``steps`` optimizer steps; return the training logs (``loss``, ``loss_ema``, ...)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            learning_rate=3e-3,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to=[],  # or "tensorboard", "wandb", "mlflow", ...: each receives loss_ema
            use_cpu=True,
            disable_tqdm=True,
            seed=seed,
        )
        data = counting_data(steps * accumulate * batch * args.world_size, seed=seed + 1)
        ema = EMALossCallback(half_life=half_life)  # half-life in optimizer steps
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ema, *callbacks])
        trainer.train()
    return [log for log in trainer.state.log_history if "loss_ema" in log]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command line entry point: print the Trainer's `loss` and `loss_ema` at every log."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--accumulate", type=int, default=4)
    args = parser.parse_args(argv)
    logs = train(steps=args.steps, accumulate=args.accumulate)
    for log in logs:
        print(f"step={log['step']:3d} loss={log['loss']:.4f} loss_ema={log['loss_ema']:.4f}")
    return logs


if __name__ == "__main__":
    main()
