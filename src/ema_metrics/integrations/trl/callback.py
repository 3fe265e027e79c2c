"""``EMATRLCallback``: the exact EMA over optimizer steps of the numbers a TRL trainer logs, next to TRL's own keys.

Import it from :mod:`ema_metrics.trl` (install with ``pip install 'ema_metrics[trl]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ema_metrics._functions import synced_values
from ema_metrics.ema import EMAMetric
from ema_metrics.integrations.transformers import internals as hf_internals
from ema_metrics.integrations.transformers import state as rank_states
from ema_metrics.integrations.trl import internals

__all__ = ["EMATRLCallback", "attach"]


class EMATRLCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Log ``<key>_ema`` next to a TRL trainer's own numbers: their exact EMA over optimizer steps, pooled over ranks.

    Build it with :func:`attach` (``attach(trainer, half_life=50)``), which also adds it to the trainer. In every
    training log, next to TRL's ``loss``, ``reward``, ``rewards/chosen``, ... it adds ``loss_ema``, ``reward_ema``,
    ``rewards/chosen_ema``, ...: in ``trainer.state.log_history`` on every rank and in what every ``report_to``
    integration receives. Each optimizer step is one tick; its observation is the number's mean over every
    micro-batch of every process, each weighted by what the number averages over, so ``half_life`` counts optimizer
    steps and layouts that see the same samples per step log the same curves.

    What is smoothed, and the weight of each micro-batch (TRL itself logs the equal-weight mean of the per-micro-batch
    values of the logging window, whatever their sizes):

    - ``GRPOTrainer``: ``loss`` (what ``compute_loss`` returns, brought back to a sum over the micro-batch's
      sequences or tokens as the ``loss_type`` normalizes it, see ``internals.grpo_loss_sum``); ``reward``,
      ``reward_std`` and ``rewards/<function>/mean``, per completion that has a reward (one observation per
      generation batch, at the step that generates it); ``kl`` (with ``beta != 0``) and ``entropy``, per completion
      token.
    - ``DPOTrainer``: ``loss``, ``rewards/chosen|rejected|accuracies|margins`` and ``logps/chosen|rejected`` per
      pair; ``entropy`` and ``mean_token_accuracy`` per completion token.
    - ``SFTTrainer``: ``loss`` per token (the negative log-likelihood, or DFT's loss with ``loss_type="dft"``, summed
      over the micro-batch's shifted labels and divided by their count, whatever count the Trainer divided by),
      ``mean_token_accuracy`` and ``entropy`` per token. Refused with ``compute_loss_func``, label smoothing or a
      mixture-of-experts auxiliary loss (at construction), whose losses are not sums over tokens known here.

    **How the numbers are seen, and why so.** Hugging Face callbacks are not given the trainer, and TRL computes
    these numbers inside its own methods, so the trainer is handed over explicitly. The callback then reads TRL's own
    values where TRL stores them: ``trainer._metrics["train"]`` becomes a store whose lists hand each appended value
    to the callback (TRL still averages and clears it as before). TRL has already read each value back to the host
    and, for these keys, pooled it over all processes; the callback adds it with the weight of this process's own
    pairs, completions or tokens (a device sum, no read-back), which pools exactly. The weights come from the
    micro-batch's tensors, seen by wrapping ``trainer.compute_loss`` (the Trainer's public hook, whose returned loss,
    with the ``num_items_in_batch`` it was given, is also the loss observation) and, for GRPO's rewards,
    ``trainer._calculate_rewards`` (to count the completions each reward function scored). That is the least
    invasive exact hook: no subclass, no second forward, no formula of TRL's recomputed, and no read-back or
    collective per micro-batch. Every TRL internal used is in ``ema_metrics/integrations/trl/internals.py``.

    **Logs, epochs, checkpoints.** As ``EMALossCallback``: one collective per training log (all numbers pooled
    together), none on other steps; the curve runs on across epochs; every rank's state is gathered (one collective)
    when a checkpoint may follow and stored in ``trainer_state.json``, so a resume continues the same curve (bit-exact
    per rank on the same number of processes, pooled on rank 0 otherwise). A step where a number has no observation
    (no generation, say) keeps its value.

    Args:
        trainer: a ``GRPOTrainer``, ``DPOTrainer`` or ``SFTTrainer`` (or a subclass), before ``train()``.
        alpha: smoothing factor in ``(0, 1]``; give exactly one of ``alpha``, ``half_life``, ``span``, ``com``.
        half_life: optimizer steps after which a step's weight halves.
        span: pandas span, ``alpha = 2 / (span + 1)``.
        com: centre of mass, ``alpha = 1 / (1 + com)``.
        adjust: debiased average (``True``) or pandas ``adjust=False``.
        suffix: appended to TRL's key to name the logged EMA (default ``"_ema"``).

    Raises:
        TypeError: If ``suffix`` is not a string.
        ValueError: If the trainer is not a supported TRL trainer, its GRPO ``loss_type`` is unknown, its SFT loss is
            computed another way (see above), ``suffix`` is empty, the trainer's arguments set
            ``restore_callback_states_from_checkpoint=True`` (the Trainer would rebuild the callback without the
            trainer; the callback restores its curves itself), or the parametrisation is invalid (see
            :class:`~ema_metrics.EMAMetric`).

    Example:
        Anything but a TRL trainer is refused, naming what to use instead:

        >>> from ema_metrics.trl import EMATRLCallback
        >>> EMATRLCallback(object(), half_life=50)
        Traceback (most recent call last):
        ...
        ValueError: EMATRLCallback smooths the numbers of TRL's GRPOTrainer, DPOTrainer, SFTTrainer, but got argument \
`trainer` = object. For the loss of a Hugging Face Trainer use ema_metrics.transformers.EMALossCallback; for another \
trainer's numbers, update an EMAMetric with them, weighted by what each averages over.

    """

    def __init__(
        self,
        trainer: Any,
        alpha: float | None = None,
        *,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        suffix: str = "_ema",
    ) -> None:
        if not isinstance(suffix, str):
            raise TypeError(f"Expected argument `suffix` to be a string, but got {suffix!r}")
        if not suffix:
            raise ValueError(f"Expected argument `suffix` to be a non-empty string, but got {suffix!r}")
        kind = internals.trainer_kind(trainer)
        if kind is None:
            raise ValueError(
                f"{type(self).__name__} smooths the numbers of TRL's {', '.join(internals.SUPPORTED)}, but got"
                f" argument `trainer` = {internals.trl_class_name(trainer)}. For the loss of a Hugging Face Trainer"
                " use ema_metrics.transformers.EMALossCallback; for another trainer's numbers, update an EMAMetric"
                " with them, weighted by what each averages over."
            )
        if getattr(getattr(trainer, "args", None), "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                f"{type(self).__name__} cannot be used with TrainingArguments' argument"
                " `restore_callback_states_from_checkpoint` = True: on resume the Trainer rebuilds callbacks without"
                " the trainer this one reads. Leave it False: the callback restores its own curves from the checkpoint"
                " (trainer_state.json) when training resumes."
            )
        if kind == "GRPOTrainer" and not internals.grpo_loss_known(getattr(trainer, "loss_type", None)):
            raise ValueError(
                f"{type(self).__name__} does not know how GRPO's loss_type={trainer.loss_type!r} normalizes the loss,"
                " so it cannot weight its micro-batches"
            )
        if kind == "SFTTrainer" and internals.sft_refusal(trainer) is not None:
            raise ValueError(
                f"{type(self).__name__} cannot weight this SFTTrainer's loss: {internals.sft_refusal(trainer)}"
            )
        if kind == "GRPOTrainer":
            keys = ["loss", *internals.grpo_keys(trainer)]
        elif kind == "DPOTrainer":
            keys = ["loss", *internals.dpo_keys()]
        else:
            keys = ["loss", *internals.SFT_KEYS]
        template = EMAMetric(alpha, half_life=half_life, span=span, com=com, adjust=adjust, nan_strategy="ignore")
        self.kind = kind
        self.suffix = suffix
        # the loss reports a non-finite value (EMAMetric's default); TRL's numbers may be NaN by design (a reward
        # function returning None for a whole batch), and TRL leaves those out of its own means too
        self.metrics: dict[str, EMAMetric] = {
            key: EMAMetric(template.alpha, adjust=adjust, nan_strategy="warn" if key == "loss" else "ignore")
            for key in keys
        }
        self.checkpoint_ranks: dict[str, Any] | None = None
        self._trainer = trainer
        self._weights: dict[str, Any] = {}  # the weight of each number TRL is about to append
        internals.install_store(trainer, self._on_value)
        internals.wrap_method(trainer, "compute_loss", self._compute_loss)
        if kind == "GRPOTrainer":
            internals.wrap_method(trainer, "_calculate_rewards", self._calculate_rewards)

    @property
    def in_tick(self) -> bool:
        """Whether an optimizer step's tick is open."""
        return self.metrics["loss"].in_tick

    # ------------------------------------------------------------------ per micro-batch
    def _observing(self, model: Any) -> bool:
        return bool(getattr(model, "training", False)) and torch.is_grad_enabled() and self.in_tick

    def _compute_loss(self, original: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._observing(model) or not isinstance(inputs, Mapping):
            return original(model, inputs, *args, **kwargs)
        if self.kind == "GRPOTrainer":
            self._weights = internals.grpo_token_weights(inputs)
        elif self.kind == "SFTTrainer":
            self._weights = internals.sft_weights(inputs)
        else:
            self._weights = internals.dpo_weights(inputs)
        try:
            out = original(model, inputs, *args, **kwargs)
        finally:
            self._weights = {}
        loss = out[0] if isinstance(out, tuple) else out
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._add_loss(inputs, loss, kwargs.get("num_items_in_batch"))
        return out

    def _add_loss(self, inputs: Mapping[str, Any], loss: Tensor, num_items: Any) -> None:
        units: Any
        if self.kind == "GRPOTrainer":
            total, units = internals.grpo_loss_sum(self._trainer, inputs, loss)
        elif self.kind == "SFTTrainer":
            total, units = internals.sft_loss_sum(self._trainer, inputs, loss, num_items)
        else:
            units = internals.dpo_weights(inputs)["loss"]
            total = loss.detach().to(torch.float64) * float(units)
        metric = self.metrics["loss"]
        if metric.device != total.device:
            metric.to(total.device)
        if isinstance(units, Tensor):
            count = units.to(torch.float64)
            value = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
            metric.update(value.reshape(()), weight=count.reshape(()))
        else:
            metric.update(total.reshape(()) / max(units, 1), weight=units)

    def _calculate_rewards(self, original: Any, inputs: Any, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        rewards = original(inputs, prompts, *args, **kwargs)
        if self._observing(self._trainer.model) and isinstance(rewards, Tensor):
            self._weights = internals.grpo_reward_weights(self._trainer, rewards, len(prompts))
        return rewards

    def _on_value(self, key: str, value: Any) -> None:
        """A value TRL appended to its training store: add it to its EMA with this micro-batch's weight."""
        metric = self.metrics.get(key)
        weight = self._weights.get(key)
        if metric is None or weight is None or not self.in_tick or isinstance(value, bool):
            return
        if not isinstance(value, (int, float)):
            return
        if isinstance(weight, Tensor) and metric.device != weight.device:
            metric.to(weight.device)
        metric.update(float(value), weight=weight)

    # ------------------------------------------------------------------ checkpoints (ExportableState)
    def state(self) -> dict[str, Any]:
        """What the Trainer stores in ``trainer_state.json``: the arguments, and every rank's state when gathered."""
        return {
            "args": {"alpha": self.metrics["loss"].alpha, "adjust": self.metrics["loss"].adjust, "suffix": self.suffix},
            "attributes": {"checkpoint_ranks": self.checkpoint_ranks},
        }

    def _restore(self, state: Any) -> None:
        where = f"trainer_state.json, {type(self).__name__} {self.suffix!r}"
        saved = rank_states.saved_ranks(state, type(self).__name__, "suffix", self.suffix)
        if not rank_states.state_of_step(saved, state.global_step, where, "the EMAs start"):
            return
        metrics = saved.get("metrics")
        if not isinstance(metrics, dict) or set(metrics) != set(self.metrics):
            got = sorted(metrics) if isinstance(metrics, dict) else metrics
            raise ValueError(f"{where}: expected the states of {sorted(self.metrics)}, but got {got!r}")
        for key, metric in self.metrics.items():  # every state checked before any is loaded
            check: EMAMetric = metric.clone()  # type: ignore[assignment]
            rank_states.restore_states(check, metrics[key], f"{where}, {key!r}")
        for key, metric in self.metrics.items():
            rank_states.restore_states(metric, metrics[key], f"{where}, {key!r}")

    def _gather_if_saving(self, args: Any, state: Any, control: Any) -> None:
        if rank_states.saving_now(args, control):
            gathered = rank_states.gather_states_of(self.metrics)  # one collective for all numbers
            self.checkpoint_ranks = {"step": state.global_step, "metrics": gathered}

    # ------------------------------------------------------------------ training events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Move before the reporters, start every EMA afresh and restore a resumed state."""
        hf_internals.place_before_reporters(self._trainer.callback_handler, self)
        for metric in self.metrics.values():
            metric.reset()
        self.checkpoint_ranks = None
        if state.global_step > 0:  # resumed from a checkpoint
            self._restore(state)
        if isinstance(state.stateful_callbacks, dict):
            # `_save_checkpoint` (transformers 5.24) indexes the entry of every ExportableState callback
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the optimizer step's tick on every EMA."""
        for metric in self.metrics.values():
            if not metric.in_tick:
                metric.begin_tick()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the tick; gather every rank's state if a checkpoint may follow."""
        for metric in self.metrics.values():
            if metric.in_tick:
                metric.end_tick()
        self._weights = {}
        self._gather_if_saving(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gather every rank's state if an epoch-end checkpoint may follow."""
        if self.checkpoint_ranks is None or self.checkpoint_ranks.get("step") != state.global_step:
            self._gather_if_saving(args, state, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the pooled EMAs to a training log (one holding ``loss``) and to its ``log_history`` entry."""
        if logs is None or "loss" not in logs:
            return
        keys = list(self.metrics)
        pooled = synced_values([self.metrics[key] for key in keys])  # one collective, on every rank
        values = {f"{key}{self.suffix}": float(v) for key, v in zip(keys, pooled, strict=True)}
        values = {key: v for key, v in values.items() if math.isfinite(v)}  # a number not observed yet
        hf_internals.add_to_log(state, logs, values)


def attach(
    trainer: Any,
    alpha: float | None = None,
    *,
    half_life: float | None = None,
    span: float | None = None,
    com: float | None = None,
    adjust: bool = True,
    suffix: str = "_ema",
) -> EMATRLCallback:
    """Build an :class:`EMATRLCallback` for ``trainer`` and add it to the trainer's callbacks.

    Example:
        A tiny GPT-2 fine-tuned by TRL's ``SFTTrainer`` on short texts, 2 micro-batches of 2 a step. TRL's own
        ``loss`` divides each step's summed loss by the Trainer's count of *unshifted* labels (for GPT-2), which is
        why it sits far below ``loss_ema``, the EMA of the loss per predicted token:

        >>> import tempfile
        >>> import torch
        >>> from datasets import Dataset
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, PrinterCallback
        >>> from trl import SFTConfig, SFTTrainer
        >>> from ema_metrics.trl import attach
        >>> words = ["[PAD]", "[UNK]", "[EOS]", *(f"w{i}" for i in range(20))]
        >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")
        >>> _ = torch.manual_seed(0)
        >>> config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(words), n_positions=16,
        ...                     bos_token_id=2, eos_token_id=2)
        >>> model = GPT2LMHeadModel(config)
        >>> texts = [" ".join(f"w{(i * k) % 20}" for k in range(1 + i % 6)) for i in range(32)]
        >>> args = SFTConfig(
        ...     tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        ...     learning_rate=0.05, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        ...     disable_tqdm=True, save_strategy="no",
        ... )
        >>> data = Dataset.from_list([{"text": t} for t in texts])
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        >>> trainer.remove_callback(PrinterCallback)  # the Trainer's own printing of every log
        >>> callback = attach(trainer, half_life=2)
        >>> sorted(callback.metrics)
        ['entropy', 'loss', 'mean_token_accuracy']
        >>> _ = trainer.train()
        >>> for h in trainer.state.log_history[:-1]:
        ...     ema = f"loss_ema={h['loss_ema']:.2f} entropy_ema={h['entropy_ema']:.2f}"
        ...     print(h["step"], f"loss={h['loss']:.2f}", ema)
        1 loss=1.80 loss_ema=3.24 entropy_ema=3.13
        2 loss=2.54 loss_ema=3.26 entropy_ema=3.11
        3 loss=2.31 loss_ema=3.14 entropy_ema=3.09
        4 loss=2.46 loss_ema=3.06 entropy_ema=2.99

    """
    callback = EMATRLCallback(trainer, alpha, half_life=half_life, span=span, com=com, adjust=adjust, suffix=suffix)
    trainer.add_callback(callback)
    return callback
