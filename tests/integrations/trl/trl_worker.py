"""One TRL run for the tests, in the test process or on one of several processes launched by ``torch.distributed.run``.

``python tests/integrations/trl/trl_worker.py CONFIGS.json`` (a list of runs, one after the other; or :func:`run`
in-process) trains a tiny GPT-2 built
from a config with a word-level tokenizer built in memory, on data made in memory, with ``DPOTrainer`` or
``GRPOTrainer`` and :func:`ema_metrics.trl.attach`. Independently of the callback, a test-only recorder keeps, per
optimizer step, the raw values TRL computes before it averages them:

- DPO: every per-pair vector TRL gathers (``accelerator.gather``: chosen and rejected rewards, accuracies, margins,
  chosen and rejected log-probs, in that order) and the token sums it gathers for ``entropy`` and
  ``mean_token_accuracy`` (``accelerator.gather_for_metrics``);
- GRPO: every reward the Python reward functions return (on every rank, for its own completions) and the
  ``(sum, count)`` pairs TRL reduces over the processes for ``kl`` and ``entropy`` (``accelerator.reduce``);
- every trainer: what each training micro-batch's ``training_step`` returns (``step_loss``), which the Trainer adds up
  into the ``loss`` it logs (rounded to 4 decimals there before transformers 5).

Each run starts from the mixed precision of a new process. Before transformers 5, ``TrainingArguments`` writes its
own into the process's environment (``ACCELERATE_MIXED_PRECISION``) and takes the one found there when it has none,
and ``accelerate`` keeps it in a process-wide ``AcceleratorState``: an SFT run with ``bf16=False`` after a DPO run
(TRL's default ``bf16=True``) trained in bf16.

Written per rank: those records, the ``log_history``. Workers started by the launcher end with ``os._exit`` after a
final barrier (interpreter shutdown sometimes hangs with gloo).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(40)]


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def model(eos_bias: float = 0.0, seed: int = 0, init: float = 0.02) -> Any:
    """A tiny GPT-2; ``eos_bias`` makes the end-of-sequence token likelier, so that completion lengths vary; a large
    ``init`` (the weights' standard deviation) makes the predictions far from uniform, so entropy varies by token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=len(WORDS),
        n_positions=32,
        bos_token_id=2,
        eos_token_id=2,
        initializer_range=init,
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    net = GPT2LMHeadModel(config)
    if eos_bias:
        with torch.no_grad():
            net.transformer.ln_f.bias[0] = 1.0
            net.transformer.wte.weight[2, 0] = eos_bias
    return net


def dpo_data(n: int) -> list[dict[str, str]]:
    """Preference pairs of varied lengths (so token counts differ between micro-batches)."""
    out = []
    for i in range(n):
        chosen = " ".join(f"w{3 + (i * 7 + j) % 37}" for j in range(1 + i % 4))
        rejected = " ".join(f"w{3 + (i * 5 + j) % 37}" for j in range(1 + (i * 3) % 5))
        out.append({"prompt": f"w{3 + i % 11} w{3 + i % 13}", "chosen": " " + chosen, "rejected": " " + rejected})
    return out


class _Recorder:
    """The raw values TRL computes for its numbers, by optimizer step (see the module docstring)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.records: dict[str, Any] = {}
        self.depth = 0  # gather_for_metrics and reduce call gather: record the outermost call only
        acc = trainer.accelerator
        for name in ("gather", "gather_for_metrics", "reduce"):
            self._wrap(acc, name)
        training_step = trainer.training_step

        def recorded_step(*args: Any, **kwargs: Any) -> Any:
            loss = training_step(*args, **kwargs)
            self.add("step_loss", float(loss.detach().to(torch.float64)))
            return loss

        trainer.training_step = recorded_step

    def _training(self) -> bool:
        return bool(self.trainer.model.training) and torch.is_grad_enabled()

    def add(self, kind: str, value: Any) -> None:
        step = str(self.trainer.state.global_step)
        self.records.setdefault(kind, {}).setdefault(step, []).append(value)

    def _wrap(self, acc: Any, name: str) -> None:
        original = getattr(acc, name)

        def wrapped(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            try:
                out = original(tensor, *args, **kwargs)
            finally:
                self.depth -= 1
            if self.depth == 0 and self._training() and isinstance(out, torch.Tensor):
                self.add(name, out.detach().to(torch.float64).flatten().tolist())
            return out

        setattr(acc, name, wrapped)


def _rewards(records: dict[str, Any], name: str) -> Any:
    def reward(completions: list[str], trainer_state: Any = None, **kwargs: Any) -> list[float | None]:
        if name == "length":
            out: list[float | None] = [float(len(c.split())) for c in completions]
        else:  # scores only completions that mention an even word; None for the others
            out = [float(c.count("w1")) if any(f"w{k}" in c.split() for k in (4, 6, 8)) else None for c in completions]
        step = str(trainer_state.global_step)
        records.setdefault(f"reward/{name}", {}).setdefault(step, []).append(out)
        return out

    reward.__name__ = name
    return reward


def _token_losses(trainer: Any, records: dict[str, Any]) -> Any:
    """A forward hook: every training micro-batch's float64 token losses from a forward of the model's own submodules.

    TRL's SFT calls the model through a fused head that returns no logits, so the hook recomputes them from the
    transformer and its head (submodule calls, which no hook on the model sees) and records, per micro-batch, the
    summed negative log-likelihood, the summed DFT loss (``nll * exp(-nll)``) and the number of tokens.
    """

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in kwargs}
            logits = module.lm_head(module.transformer(**inputs).last_hidden_state).to(torch.float64)[:, :-1]
        labels = kwargs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        valid = labels != -100
        entry = [float(nll[valid].sum()), float((nll * torch.exp(-nll))[valid].sum()), int(valid.sum())]
        records.setdefault("tokens", {}).setdefault(str(trainer.state.global_step), []).append(entry)

    return hook


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train as ``cfg`` says and return this rank's records (``log_history``, the recorder's values)."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset

    from ema_metrics.trl import attach

    out = Path(cfg["out"])
    common = {
        "output_dir": str(out / "trainer"),
        "per_device_train_batch_size": cfg["batch"],
        "gradient_accumulation_steps": cfg["accumulate"],
        "max_steps": cfg["steps"],
        "learning_rate": cfg.get("lr", 0.05),
        "lr_scheduler_type": "constant",
        "logging_steps": cfg.get("logging_steps", 1),
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "save_strategy": "steps" if cfg.get("save_steps") else "no",
        "save_steps": cfg.get("save_steps") or 500,
    }
    records: dict[str, Any] = {}
    trainer: Any
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # this run's own mixed precision (see the module docstring)
    AcceleratorState._reset_state()
    if cfg["kind"] == "sft":
        pass  # built below
    elif cfg["kind"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=0.5, **common)
        trainer = DPOTrainer(
            model=model(init=0.15),
            ref_model=model(seed=1, init=0.15),  # another model: the rewards differ from zero from the first step
            args=args,
            train_dataset=Dataset.from_list(dpo_data(cfg["samples"])),
            processing_class=tokenizer(),
        )

        def sequential(*_: Any, **__: Any) -> Any:  # the same pairs in the same order in every layout
            return torch.utils.data.SequentialSampler(trainer.train_dataset)

        trainer._get_train_sampler = sequential
    else:
        from trl import GRPOConfig, GRPOTrainer

        policy: Any = model(eos_bias=1.2)
        if cfg.get("beta"):  # GRPO loads the reference model by path (single-process runs only here)
            policy.save_pretrained(out / "model")
            policy = str(out / "model")
        args = GRPOConfig(
            num_generations=2, max_completion_length=6, beta=cfg.get("beta", 0.0), loss_type=cfg["loss_type"], **common
        )
        trainer = GRPOTrainer(
            model=policy,
            args=args,
            reward_funcs=[_rewards(records, "length"), _rewards(records, "even")],
            train_dataset=Dataset.from_list([{"prompt": f"w{3 + i % 37} w{3 + (i * 3) % 37}"} for i in range(64)]),
            processing_class=tokenizer(),
        )
    if cfg["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        from ema_metrics.transformers import EMALossCallback

        args = SFTConfig(loss_type=cfg.get("loss_type", "nll"), bf16=False, **common)  # float32: a tight oracle
        rng = torch.Generator().manual_seed(0)
        texts = [
            " ".join(
                f"w{int(i)}"
                for i in torch.randint(3, 40, (int(torch.randint(2, 12, (1,), generator=rng)),), generator=rng)
            )
            for _ in range(cfg["samples"])
        ]
        callbacks = [EMALossCallback(half_life=cfg["half_life"])] if cfg.get("loss_type", "nll") == "nll" else []
        trainer = SFTTrainer(
            model=model(),  # small weights: padding moves GPT-2's numbers by float32 rounding only
            args=args,
            train_dataset=Dataset.from_list([{"text": t} for t in texts]),
            processing_class=tokenizer(),
            callbacks=callbacks,
        )
        trainer._get_train_sampler = lambda *_, **__: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.model.register_forward_hook(_token_losses(trainer, records), with_kwargs=True)
    callback = attach(trainer, half_life=cfg["half_life"], suffix=cfg.get("suffix", "_ema"))
    recorder = _Recorder(trainer)
    trainer.train(resume_from_checkpoint=cfg.get("resume"))
    records.update(recorder.records)
    records["log_history"] = trainer.state.log_history
    records["keys"] = list(callback.metrics)
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # nor does it leave its own to the next Trainer
    return records


def main(config_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for cfg in json.loads(Path(config_path).read_text()):  # several runs share one launch (and one import of TRL)
        records = run(cfg)
        (Path(cfg["out"]) / f"rank{rank}.json").write_text(json.dumps(records))
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
