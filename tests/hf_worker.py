"""One Hugging Face Trainer run for the tests, on one process or one of several launched by ``torch.distributed.run``.

``python tests/hf_worker.py CONFIG.json`` trains a tiny GPT-2 built from a config (nothing downloaded) on random,
padded token data, with :class:`~ema_metrics.transformers.EMALossCallback`. Independently of the callback, a
test-only forward hook recomputes every micro-batch's per-token cross-entropy in float64 from the logits and writes,
per rank and optimizer step, each micro-batch's summed token loss and token count. Also written per rank: the
``log_history``, the callback's metric state after every step (and at train begin), and every collective issued from
``ema_metrics`` code with the step it ran at. Workers end with ``os._exit`` after a final barrier: interpreter
shutdown sometimes hangs with gloo.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ = 16
VOCAB = 64


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random tokens, padded to ``SEQ`` (labels -100 on padding); lengths alternate short and long in pairs."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        low, high = (2, 4) if (i // 2) % 3 == 0 else (10, SEQ)
        length = int(torch.randint(low, high + 1, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        mask = (torch.arange(SEQ) < length).long()
        data.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return data


def _ema_caller() -> str | None:
    """Name of the outermost ``ema_metrics`` function on the stack (outside the tests), or None."""
    found = None
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace(os.sep, "/")
        if "/ema_metrics/" in name and "/tests/" not in name:
            found = f.f_code.co_name
        f = f.f_back
    return found


def count_collectives(record: list[Any], step: Any) -> None:
    """Wrap the collectives of ``torch.distributed``: record (step, caller) for those issued by ema_metrics."""
    depth = [0]
    for name in (
        "all_gather",
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_reduce",
        "broadcast",
        "gather",
        "reduce",
        "barrier",
    ):
        original = getattr(dist, name)

        def wrapped(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            if depth[0] == 0:
                caller = _ema_caller()
                if caller is not None:
                    record.append([step(), _name, caller])
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(dist, name, functools.wraps(original)(wrapped))


def make_recorder(ema: Any, records: dict[str, Any]) -> Any:
    """A test-only callback: per-token losses recomputed from the logits, and ``ema``'s state after every step.

    ``records["tokens"][str(step)]`` gets ``[summed token loss, token count]`` per micro-batch (float64 cross-entropy
    of the shifted labels that are not -100), ``records["states"]`` the metric's state at train begin and after each
    optimizer step (when ``ema`` is given).
    """
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):  # type: ignore[misc]
        step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if ema is not None:
                records.setdefault("states", {})["begin"] = _state(ema)
            model.register_forward_hook(self.hook, with_kwargs=True)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step = state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if ema is not None:
                records.setdefault("states", {})[str(state.global_step)] = _state(ema)

        def hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if not module.training:
                return
            logits = output.logits.detach().to(torch.float64)[:, :-1]
            labels = kwargs["labels"][:, 1:]
            per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            valid = labels != -100
            entry = [float(per_token[valid].sum()), int(valid.sum())]
            records.setdefault("tokens", {}).setdefault(str(self.step), []).append(entry)

    return Recorder()


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ema_metrics.transformers import EMALossCallback

    class SequentialTrainer(Trainer):  # type: ignore[misc]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    out = Path(cfg["out"])
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=cfg["accumulate"],
        num_train_epochs=cfg["epochs"],
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=cfg["logging_steps"],
        save_strategy="steps" if cfg.get("save_steps") else "no",
        save_steps=cfg.get("save_steps") or 500,
        report_to=cfg.get("report_to", []),
        use_cpu=True,
        dataloader_drop_last=True,
        average_tokens_across_devices=True,
        disable_tqdm=True,
        seed=0,
    )
    rank = args.process_index
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_head=2,
            n_embd=16,
            vocab_size=VOCAB,
            n_positions=SEQ,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    ema = EMALossCallback(half_life=cfg["half_life"], rank_spread=cfg.get("rank_spread", False))
    records: dict[str, Any] = {"tokens": {}, "states": {}, "collectives": []}

    recorder = make_recorder(ema, records)

    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=make_data(cfg["samples"], seed=1), callbacks=[ema, recorder]
    )
    count_collectives(records["collectives"], lambda: trainer.state.global_step)
    trainer.train(resume_from_checkpoint=cfg.get("resume"))
    records["log_history"] = trainer.state.log_history
    records["callbacks"] = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    (out / f"rank{rank}.json").write_text(json.dumps(records))
    if "wandb" in cfg.get("report_to", []):
        import wandb

        wandb.finish()  # flush the offline run file: os._exit skips W&B's exit handler
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _state(ema: Any) -> dict[str, Any]:
    """The callback metric's tick count and the tensors of its ``state_dict``."""
    tensors = {k: v.tolist() for k, v in ema.metric.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"ticks": ema.metric.ticks, "tensors": tensors}


if __name__ == "__main__":
    main(sys.argv[1])
