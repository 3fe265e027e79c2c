"""Every use of a ``transformers`` internal by :mod:`ema_metrics.transformers`, each with what it is for.

Checked against transformers 4.48, 4.51, 4.57 and 5.24. A missing internal fails when training starts, with a
message naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor


def add_to_log(state: Any, logs: dict[str, Any], values: Mapping[str, float]) -> None:
    """Add ``values`` to a training log, and to the ``log_history`` entry the Trainer already made of it.

    ``Trainer.log`` appends ``{**logs, "step": ...}`` to ``state.log_history`` before it calls the callbacks'
    ``on_log`` with ``logs`` (transformers 4.48 to 5.25): the reporters read ``logs``, ``log_history`` is what
    ``trainer_state.json`` keeps, so both get the values.
    """
    logs.update(values)
    last = state.log_history[-1] if state.log_history else None
    if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
        last.update(values)


def callback_handler(callback: Any) -> Any | None:
    """The Trainer's ``CallbackHandler`` that is dispatching an event to ``callback`` right now, or ``None``.

    Callbacks are not given the Trainer or its handler. ``CallbackHandler.call_event`` (every version since 4.0)
    calls each callback from a frame whose ``self`` is the handler, so it is found a few frames up the stack.
    """
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(8):
            if f is None:
                break
            owner = f.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                return owner
            f = f.f_back
    finally:
        del frame
    return None


def place_before_reporters(handler: Any, callback: Any) -> None:
    """Move ``callback`` right after ``DefaultFlowCallback`` in ``handler.callbacks``.

    The Trainer's list is ``[DefaultFlowCallback, <report_to integrations>, <user callbacks>, <progress callback>]``
    and ``on_log`` runs them in that order, so a key added by a user callback's ``on_log`` would reach no reporter.
    After ``DefaultFlowCallback``, because its ``on_step_end`` decides ``control.should_save``, which ours reads.
    The move is safe while the handler iterates over the list: the callbacks after this one keep their positions.
    """
    from transformers.trainer_callback import DefaultFlowCallback

    callbacks: list[Any] = handler.callbacks
    callbacks[:] = [cb for cb in callbacks if cb is not callback]
    flows = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flows[-1] + 1 if flows else 0, callback)


def loss_shifts_labels(model: Any) -> bool:
    """Whether ``model``'s loss predicts ``labels[..., 1:]`` (a decoder-only causal LM).

    ``loss_type`` and ``LOSS_MAPPING`` (transformers >= 4.46) name the loss function; a model whose ``loss_type`` is
    ``None`` (GPT-2 in 5.24) falls back to ``ForCausalLMLoss`` inside the model, so its class is looked up in the
    causal-LM auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, the list the Trainer uses for label smoothing).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model wraps the real one
    config = getattr(inner, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers < 4.46
        LOSS_MAPPING, ForCausalLMLoss = {}, None
    loss_type = getattr(inner, "loss_type", None)
    if loss_type is not None and loss_type in LOSS_MAPPING:
        return LOSS_MAPPING[loss_type] is ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(inner).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def model_loss(output: Any) -> Tensor | None:
    """The loss in a model's output, read as ``Trainer.compute_loss`` does: ``outputs["loss"]`` or ``outputs[0]``."""
    if isinstance(output, Mapping):  # ModelOutput is a Mapping; its missing fields are absent keys
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = None
    return loss if isinstance(loss, Tensor) else None


def trl_refusal(args: Any) -> str | None:
    """Why the model's labelled loss is not the loss of the TRL trainer that ``args`` configures, or ``None``.

    TRL's trainers take a config that subclasses ``TrainingArguments`` (``DPOConfig``, ``GRPOConfig``, ...; TRL 0.9 to
    1.16), so the config tells the trainer without reaching it (callbacks are not given the trainer). Only
    ``SFTConfig`` with ``loss_type="nll"`` (its default) trains on the negative log-likelihood of the labels the model
    is called with; every other TRL trainer optimizes a loss of its own (preference, reward, policy-gradient,
    distillation) while it calls the model with completion labels, and SFT's ``loss_type="dft"`` reweights the NLL.
    """
    trl_class = next((c for c in type(args).__mro__ if c.__module__.split(".")[0] == "trl"), None)
    if trl_class is None:
        return None
    name = trl_class.__name__
    if name == "SFTConfig":
        loss_type = getattr(args, "loss_type", "nll")
        if loss_type in (None, "nll"):
            return None
        return (
            f"SFTTrainer with loss_type={loss_type!r} optimizes another loss than the negative log-likelihood of the"
            " labels, which the model returns"
        )
    trainer = f"{name[: -len('Config')]}Trainer" if name.endswith("Config") else f"the trainer of {name}"
    return (
        f"{trainer} ({name}) optimizes a loss of its own, not the language-model loss of the labels that the model"
        " returns (its generation and reference forwards call the model too)"
    )
