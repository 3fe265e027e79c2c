"""``EMALossCallback``: a Hugging Face ``Trainer`` callback that logs the exact EMA of the token-weighted loss.

Import it from :mod:`ema_metrics.transformers` (install with ``pip install 'ema_metrics[transformers]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ema_metrics._fast import compiling, run_eagerly
from ema_metrics._functions import synced_values, synced_values_by_rank
from ema_metrics.ema import EMAMetric
from ema_metrics.integrations.transformers import internals
from ema_metrics.integrations.transformers import state as rank_states

__all__ = ["EMALossCallback"]

_IGNORE_INDEX = -100


class EMALossCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Log ``loss_ema``: the exact EMA over optimizer steps of the token-weighted training loss, pooled over ranks.

    ``Trainer(..., callbacks=[EMALossCallback(half_life=50)])`` adds ``loss_ema`` next to the Trainer's own ``loss``
    in every training log: in ``trainer.state.log_history`` on every rank and in what every ``report_to``
    integration receives (TensorBoard, W&B, MLflow, ...). Each optimizer step is one tick; its observation is the
    mean loss per token over every micro-batch of every process, so the curve is the same for any
    ``gradient_accumulation_steps`` and world size giving the same samples per step, and ``half_life`` counts
    optimizer steps.

    **How the loss is seen.** A forward hook (with keyword arguments) on the model the Trainer trains: it receives
    the ``labels``, the model's own ``loss`` and the ``num_items_in_batch`` the Trainer passed, if any. That is the
    least invasive exact hook: no ``Trainer`` subclass, no change to ``compute_loss``, and no second pass over the
    logits. Forwards that train nothing are not counted: in eval mode, with gradients disabled (``generate()``, a
    reference model's forward through the policy), or outside the optimizer step's tick. The Trainer's own
    per-micro-batch loss cannot be used: it is already rescaled (for accumulation and the number of processes) in ways
    that depend on the model and the Trainer version. Per micro-batch the hook adds the
    token-summed loss and the token count to the open tick as device tensors: no collective, no host read-back (the
    Trainer itself reads every micro-batch's loss back while ``logging_nan_inf_filter=True``, its default).

    **Token count.** For a decoder-only causal LM (detected from the model's ``loss_type``, or its class in the
    causal-LM auto mapping) the count is that of the *shifted* labels that are not ``-100``,
    ``(labels[..., 1:] != -100).sum()``, or of ``shift_labels`` when the batch provides them; for other models it is
    the number of ``labels`` entries that are not ``-100`` (masked-LM and token-classification tokens,
    sequence-to-sequence target tokens, one per sample for single-label classification). ``shift_labels=`` overrides
    the detection. The Trainer's ``num_items_in_batch`` is not used as the count (for some models it counts the
    unshifted labels). The model's loss is taken to be the mean over the counted labels or, when the Trainer passes
    ``num_items_in_batch``, their sum divided by it, as the cross-entropy losses of ``transformers`` compute it (the
    Trainer's gradient scaling assumes the same; a loss that ignores a ``num_items_in_batch`` it is passed, such as
    the MSE of a regression head, is not supported).

    **Refused setups**, which change the loss out of the hook's sight: TRL trainers other than ``SFTTrainer`` with
    ``loss_type="nll"`` (DPO, GRPO, KTO, RLOO, reward, distillation: they optimize a loss of their own while calling the
    model with labels; at train begin), ``label_smoothing_factor`` (at train begin),
    several GPUs in one process (``DataParallel``; launch one process per GPU), and at the first micro-batch a model
    called without ``labels`` or returning no loss (``compute_loss_func`` and label smoothing take the labels out of
    the model call). A ``compute_loss`` override that computes another loss from the outputs is not seen.

    **Reaching the reporters.** ``Trainer.log`` appends the logs to ``state.log_history`` and then runs every
    callback's ``on_log``, reporters first. When training starts (and when the Trainer is built) the callback moves
    itself to just after ``DefaultFlowCallback``, before every reporter; its ``on_log`` then adds the pooled value to
    the logs and to the ``log_history`` entry just appended. That pooling is one collective, on every rank, in each
    training log (those that hold ``loss``), and none on other steps.

    **Epochs and checkpoints.** The EMA runs on across epochs. The callback is an ``ExportableState``: when a
    checkpoint may follow (``control.should_save`` at ``on_step_end`` or ``on_epoch_end``, and every evaluation step
    with ``save_strategy="best"``) it gathers every rank's state (one collective), and the Trainer stores them in
    ``trainer_state.json``, which every rank reads back on ``resume_from_checkpoint``. Each rank then takes its own
    state back on the same number of processes (bit-exact); on another number rank 0 takes the pooled sums and the
    others start from zero, which continues the same pooled curve. A checkpoint with no state for the current step
    (written without the callback, or requested by a callback after its ``on_step_end``) restarts the EMA, with a
    warning.

    Args:
        alpha: smoothing factor in ``(0, 1]``; give exactly one of ``alpha``, ``half_life``, ``span``, ``com``.
        half_life: optimizer steps after which a step's weight halves.
        span: pandas span, ``alpha = 2 / (span + 1)``.
        com: centre of mass, ``alpha = 1 / (1 + com)``.
        adjust: debiased average (``True``) or pandas ``adjust=False``.
        name: the key logged (default ``"loss_ema"``).
        shift_labels: count ``labels[..., 1:]`` (``True``) or all ``labels`` (``False``); default: detect.
        rank_spread: also log ``<name>/rank_min`` and ``<name>/rank_max``, the smallest and largest of the ranks'
            own EMAs, from the same collective (a rank whose data or replica went wrong shows up as an outlier).

    Raises:
        TypeError: If ``name`` is not a string, ``shift_labels`` is not ``None`` or a bool, or ``rank_spread`` is not
            a bool.
        ValueError: If the parametrisation is invalid (see :class:`~ema_metrics.EMAMetric`) or ``name`` is empty.

    Example:
        >>> from ema_metrics.transformers import EMALossCallback
        >>> callback = EMALossCallback(half_life=50)
        >>> print(f"{callback.name} alpha={callback.metric.alpha:.4f}")
        loss_ema alpha=0.0138

    """

    def __init__(
        self,
        alpha: float | None = None,
        *,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        name: str = "loss_ema",
        shift_labels: bool | None = None,
        rank_spread: bool = False,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Expected argument `name` to be a string, but got {name!r}")
        if not name:
            raise ValueError(f"Expected argument `name` to be a non-empty string, but got {name!r}")
        if not isinstance(rank_spread, bool):
            raise TypeError(f"Expected argument `rank_spread` to be a bool, but got {rank_spread!r}")
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"Expected argument `shift_labels` to be None or a bool, but got {shift_labels!r}")
        self.metric = EMAMetric(alpha, half_life=half_life, span=span, com=com, adjust=adjust)
        self.name = name
        self.shift_labels = shift_labels
        self.rank_spread = rank_spread
        self.checkpoint_ranks: dict[str, Any] | None = None  # every rank's state, gathered before a possible save
        self._hook: Any = None
        self._shifts = False

    # ------------------------------------------------------------------ checkpoints (ExportableState)
    def state(self) -> dict[str, Any]:
        """What the Trainer stores in ``trainer_state.json``: the arguments, and every rank's state when gathered."""
        return {
            "args": {
                "alpha": self.metric.alpha,
                "adjust": self.metric.adjust,
                "name": self.name,
                "shift_labels": self.shift_labels,
            },
            "attributes": {"checkpoint_ranks": self.checkpoint_ranks},
        }

    def _restore(self, state: Any) -> None:
        where = f"trainer_state.json, {type(self).__name__} {self.name!r}"
        saved = rank_states.saved_ranks(state, type(self).__name__, "name", self.name)
        if rank_states.state_of_step(saved, state.global_step, where, f"{self.name} starts"):
            rank_states.restore_states(self.metric, saved, where)

    def _gather_if_saving(self, args: Any, state: Any, control: Any) -> None:
        if rank_states.saving_now(args, control):
            self.checkpoint_ranks = {"step": state.global_step, **rank_states.gather_states(self.metric)}

    # ------------------------------------------------------------------ training events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Move before the reporters, if the Trainer's callback list can be reached now."""
        handler = internals.callback_handler(self)
        if handler is not None:
            internals.place_before_reporters(handler, self)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Check the setup, move before the reporters, hook the model and restore a resumed state."""
        problem = internals.trl_refusal(args)
        if problem is not None:
            raise ValueError(
                f"{type(self).__name__} cannot smooth this run's loss: {problem}, so `{self.name}` would be another"
                " number than the `loss` the trainer logs and optimizes. It supports the Trainer and TRL's SFTTrainer"
                " with loss_type='nll'. To smooth another trainer's loss, update an EMAMetric with what its"
                " compute_loss returns."
            )
        if args.label_smoothing_factor:
            raise ValueError(
                f"{type(self).__name__} cannot see the loss with label smoothing: the Trainer computes it outside the"
                f" model. Set `label_smoothing_factor` to 0, but got {args.label_smoothing_factor!r}"
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support several GPUs in one process (DataParallel, `n_gpu` ="
                f" {args.n_gpu}): launch one process per GPU (torchrun or accelerate launch)"
            )
        handler = internals.callback_handler(self)
        if handler is None:
            raise RuntimeError(
                f"{type(self).__name__} could not find the Trainer's CallbackHandler calling it (an internal of"
                " transformers that it uses to run before the reporters); this transformers version is not supported"
            )
        internals.place_before_reporters(handler, self)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{type(self).__name__} needs the model in `on_train_begin`, but got {model!r}")
        self._shifts = internals.loss_shifts_labels(model) if self.shift_labels is None else self.shift_labels
        self._remove_hook()
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self.metric.reset()
        self.checkpoint_ranks = None
        if state.global_step > 0:  # resumed from a checkpoint
            self._restore(state)
        if isinstance(state.stateful_callbacks, dict):
            # A checkpoint written without this callback has no entry for it, and `_save_checkpoint` (5.24) indexes
            # the entry of every ExportableState callback: give it one, or the next save raises a KeyError.
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the optimizer step's tick: every micro-batch of every rank until ``on_step_end`` pools into it."""
        if not self.metric.in_tick:
            self.metric.begin_tick()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the tick (after ``optimizer.step()``); gather every rank's state if a checkpoint may follow."""
        if self.metric.in_tick:
            self.metric.end_tick()
        self._gather_if_saving(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gather every rank's state if an epoch-end checkpoint may follow."""
        if self.checkpoint_ranks is None or self.checkpoint_ranks.get("step") != state.global_step:
            self._gather_if_saving(args, state, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the pooled EMA to a training log (one holding ``loss``) and to its ``log_history`` entry."""
        if logs is None or "loss" not in logs:
            return
        if self.rank_spread:  # the same one collective gives each rank's own EMA
            (spread,) = synced_values_by_rank([self.metric])
            values = {
                self.name: float(spread.pooled),
                f"{self.name}/rank_min": float(spread.min),
                f"{self.name}/rank_max": float(spread.max),
            }
        else:
            values = {self.name: float(synced_values([self.metric])[0])}  # one collective, on every rank
        internals.add_to_log(state, logs, values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the forward hook (the metric keeps this rank's state)."""
        self._remove_hook()

    # ------------------------------------------------------------------ micro-batches
    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if compiling():  # a compiled model (`torch_compile=True`): the hook runs eagerly, one deliberate graph break
            return run_eagerly(self._on_forward, module, args, kwargs, output)  # type: ignore[no-any-return]
        if not module.training or not self.metric.in_tick or not torch.is_grad_enabled():
            # evaluation, a call outside the training loop, or a forward that trains nothing: generation (generate()
            # runs under no_grad, also in training mode) and reference forwards (under no_grad)
            return
        labels = kwargs.get("labels")
        loss = internals.model_loss(output) if isinstance(labels, Tensor) else None
        if not isinstance(labels, Tensor) or loss is None or loss.numel() != 1:
            got = "no `labels`" if not isinstance(labels, Tensor) else f"`labels` but returned loss {loss!r}"
            raise RuntimeError(
                f"{type(self).__name__} needs every training forward (training mode, gradients enabled) to get"
                f" `labels` and return its scalar loss, but the model was called with {got}. A trainer that computes"
                " its loss outside the model (`compute_loss_func`, label smoothing, a compute_loss override that"
                " passes no labels) hides the loss from the model call; a batch without `labels` has no loss to"
                " smooth."
            )
        count = self._count(labels, kwargs.get("shift_labels")).to(loss.device)
        num_items = kwargs.get("num_items_in_batch")
        # The model's loss is a mean over `count` tokens, or a sum divided by `num_items_in_batch` when it is passed:
        # a tensor on the device, or a number on the host (transformers 4.46-4.48, Unsloth), which multiplies as a
        # kernel argument instead of being copied to the device.
        loss64 = loss.detach().to(torch.float64)
        if num_items is None:
            total = loss64 * count.to(torch.float64)
        elif isinstance(num_items, Tensor) and (num_items.device == loss.device or num_items.dim() > 0):
            total = loss64 * num_items.to(device=loss.device, dtype=torch.float64)
        else:
            total = loss64 * float(num_items)  # a Python number, or a CPU 0-d tensor (host memory)
        value = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        if self.metric.device != loss.device:
            self.metric.to(loss.device)
        self.metric.update(value.reshape(()), weight=count.reshape(()))

    def _count(self, labels: Tensor, shift_labels: Any) -> Tensor:
        if isinstance(shift_labels, Tensor):
            return (shift_labels != _IGNORE_INDEX).sum()
        counted = labels[..., 1:] if self._shifts else labels
        return (counted != _IGNORE_INDEX).sum()
