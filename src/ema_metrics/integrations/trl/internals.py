"""Every TRL internal that :mod:`ema_metrics.trl` reads or wraps, each with why and the releases it was checked on.

Checked against TRL 1.16.0 (``trl/trainer/grpo_trainer.py``, ``dpo_trainer.py``, ``sft_trainer.py``, and the fused
head in ``utils.py``). A trainer without TRL's metric store or a wrapped method is refused when the callback is built,
with a message naming what is missing.

What TRL does with the numbers it logs: its trainers append one Python float per micro-batch (already read to the
host by TRL) to ``trainer._metrics["train"][key]`` and log the equal-weight mean of each list in ``log``. The values
below are means over *all* processes (TRL gathers or reduces the per-pair, per-completion or per-token numbers before
it reads them back), so a rank that adds such a value with the weight of **its own** pairs, completions or tokens
contributes exactly its share: summed over ranks, ``sum_r n_r * v = N * v``, the sum over every pair, completion or
token. The weights are made here from the micro-batch's own tensors, on the device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED",
    "Sink",
    "dpo_keys",
    "dpo_weights",
    "grpo_keys",
    "grpo_loss_known",
    "grpo_loss_sum",
    "grpo_reward_weights",
    "grpo_token_weights",
    "install_store",
    "sft_loss_sum",
    "sft_refusal",
    "sft_weights",
    "trainer_kind",
    "trl_class_name",
    "wrap_method",
]

#: The trainers whose numbers the callback knows how to weight.
SUPPORTED = ("GRPOTrainer", "DPOTrainer", "SFTTrainer")

#: DPO's per-pair numbers (TRL 1.16 ``DPOTrainer._compute_loss``: each the mean of an ``accelerator.gather``-ed vector
#: with one entry per pair), and its per-token ones (sums over ``gather_for_metrics``-ed token counts).
DPO_PAIR_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
DPO_TOKEN_KEYS = ("entropy", "mean_token_accuracy")

Sink = Callable[[str, float], None]


def trainer_kind(trainer: Any) -> str | None:
    """The name of the TRL trainer class ``trainer`` is (or subclasses), among :data:`SUPPORTED`, or ``None``."""
    for cls in type(trainer).__mro__:
        if cls.__module__.split(".")[0] == "trl" and cls.__name__ in SUPPORTED:
            return cls.__name__
    return None


def trl_class_name(trainer: Any) -> str:
    """The first TRL class in ``trainer``'s MRO (for error messages), or its own class name."""
    trl_classes = [c.__name__ for c in type(trainer).__mro__ if c.__module__.split(".")[0] == "trl"]
    return trl_classes[0] if trl_classes else type(trainer).__name__


class _RecordingList(list):  # type: ignore[type-arg]
    """A list that hands every appended value to a sink (TRL appends one float per micro-batch)."""

    def __init__(self, key: str, sink: Sink, values: Any = ()) -> None:
        super().__init__(values)
        self._key = key
        self._sink = sink

    def append(self, value: Any) -> None:
        super().append(value)
        self._sink(self._key, value)


class _RecordingStore(defaultdict):  # type: ignore[type-arg]
    """``trainer._metrics["train"]`` with recording lists: TRL's own store, which it still reads and clears."""

    def __init__(self, sink: Sink, existing: Mapping[str, Any]) -> None:
        super().__init__(list)
        self._sink = sink
        for key, values in existing.items():
            super().__setitem__(key, _RecordingList(key, sink, values))

    def __missing__(self, key: str) -> list[Any]:
        values = _RecordingList(key, self._sink)
        super().__setitem__(key, values)
        return values


def install_store(trainer: Any, sink: Sink) -> None:
    """Make ``trainer._metrics["train"]`` hand every value TRL appends to it to ``sink``.

    ``_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}`` is built in ``__init__`` and only appended
    to, read and cleared afterwards (TRL 1.16, GRPO and DPO). The store keeps TRL's behaviour: ``log`` still averages
    and clears it. Only the training store is replaced: evaluation numbers are never observed.
    """
    metrics = getattr(trainer, "_metrics", None)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("train"), Mapping):
        raise RuntimeError(
            f"{type(trainer).__name__} has no `_metrics['train']` store (TRL's per-micro-batch metrics, TRL 1.16);"
            " this TRL version is not supported"
        )
    if isinstance(metrics["train"], _RecordingStore):
        raise RuntimeError(f"{type(trainer).__name__} already has an EMA callback attached to its metrics")
    metrics["train"] = _RecordingStore(sink, metrics["train"])


def wrap_method(trainer: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Set ``trainer.<name>`` to ``wrapper(original, *args, **kwargs)``, as an instance attribute.

    The Trainer calls ``self.compute_loss(model, inputs, num_items_in_batch=...)`` (transformers 4.46 to 5.25) and
    GRPO calls ``self._calculate_rewards(inputs, prompts, completions, completion_ids_list)`` (TRL 1.16); an instance
    attribute wraps them for this trainer only, keeping any subclass override.
    """
    original = getattr(trainer, name, None)
    if not callable(original):
        raise RuntimeError(f"{type(trainer).__name__} has no method `{name}` (TRL 1.16); this version is not supported")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(trainer, name, wrapped)


# ---------------------------------------------------------------------------------------------------- DPO
def dpo_keys() -> list[str]:
    """DPO's numbers that the callback smooths (besides ``loss``)."""
    return [*DPO_PAIR_KEYS, *DPO_TOKEN_KEYS]


def dpo_weights(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The weight of each DPO number of one micro-batch: its pairs, or its completion tokens.

    DPO's batch holds the chosen rows, then the rejected rows (``completion_mask.chunk(2)``); its token numbers count
    the shifted completion mask, ``completion_mask[..., 1:]`` (TRL 1.16 ``_compute_loss``): ``entropy`` over both
    halves, ``mean_token_accuracy`` over the chosen half. Pairs are a shape (no device work); tokens are device sums.
    """
    mask = inputs["completion_mask"]
    pairs = mask.shape[0] // 2
    shifted = mask[..., 1:]
    weights: dict[str, Any] = dict.fromkeys(DPO_PAIR_KEYS, pairs)
    weights["entropy"] = shifted.sum()
    weights["mean_token_accuracy"] = shifted[:pairs].sum()
    weights["loss"] = pairs  # `compute_loss` returns the mean over pairs of each loss type, weighted (and aux)
    return weights


# ---------------------------------------------------------------------------------------------------- GRPO
def grpo_keys(trainer: Any) -> list[str]:
    """GRPO's numbers that the callback smooths (besides ``loss``).

    ``reward``, ``reward_std``, one mean per reward function, ``kl`` (only logged with ``beta != 0``), ``entropy``.
    """
    names = list(getattr(trainer, "reward_func_names", None) or [])
    keys = ["reward", "reward_std", *(f"rewards/{name}/mean" for name in names)]
    if getattr(trainer, "beta", 0.0) != 0.0:
        keys.append("kl")
    return [*keys, "entropy"]


def grpo_mask(inputs: Mapping[str, Any]) -> Tensor:
    """The completion tokens GRPO's token numbers count: ``completion_mask`` times ``tool_mask`` when there is one."""
    mask: Tensor = inputs["completion_mask"]
    tool_mask = inputs.get("tool_mask")
    return mask * tool_mask if isinstance(tool_mask, Tensor) else mask


def grpo_token_weights(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The weight of ``kl`` and ``entropy`` in one micro-batch: its completion tokens (a device sum).

    Both are ``global_masked_mean``s (TRL 1.16): the sum over every process's masked tokens divided by their count.
    """
    tokens = grpo_mask(inputs).sum()
    return {"kl": tokens, "entropy": tokens}


def grpo_reward_weights(trainer: Any, rewards_per_func: Tensor, local_rows: int) -> dict[str, Any]:
    """The weight of each reward number of one generation batch: this process's completions that have a reward.

    ``_calculate_rewards`` returns the rewards of every process gathered (rows ``rank * local_rows`` onwards are this
    process's, as GRPO's ``process_slice``); a reward function returning ``None`` gives ``NaN``, which TRL's
    ``nanmean``/``nanstd`` leave out: ``rewards/<fn>/mean`` counts the completions that function scored, ``reward``
    and ``reward_std`` the completions that any function scored.
    """
    rank = int(trainer.accelerator.process_index)
    local = rewards_per_func[rank * local_rows : (rank + 1) * local_rows]
    scored = ~torch.isnan(local)
    weights: dict[str, Any] = {
        f"rewards/{name}/mean": scored[:, i].sum() for i, name in enumerate(trainer.reward_func_names)
    }
    any_scored = scored.any(dim=1).sum()
    weights["reward"] = any_scored
    weights["reward_std"] = any_scored
    return weights


_PER_SEQUENCE = ("grpo", "sapo", "luspo")  # mean over the micro-batch's sequences, divided by the accumulation steps
_GLOBAL_TOKENS = ("dapo", "cispo", "vespo")  # sum over tokens divided by a generation batch's token count


def grpo_loss_sum(trainer: Any, inputs: Mapping[str, Any], loss: Tensor) -> tuple[Tensor, Any]:
    """One micro-batch's share of its optimizer step's GRPO loss: ``(loss summed over its units, its units)``.

    ``compute_loss`` returns the micro-batch's loss already divided for the accumulation (TRL 1.16
    ``_compute_loss``, training mode, ``G = current_gradient_accumulation_steps``, ``S = steps_per_generation``,
    ``P`` processes): ``grpo``, ``sapo``, ``luspo``: a mean over its ``B`` sequences over ``G``; ``bnpo``: a mean over
    its tokens over ``G``; ``dr_grpo``: a sum over ``B * max_completion_length`` over ``G``; ``dapo``, ``cispo``,
    ``vespo``: a token sum over ``num_items_in_batch / P * G / S`` (the generation batch's tokens). Multiplying back
    gives the sum over the micro-batch's units, so that the pooled step value is the loss per unit of the step (the
    mean over its sequences, or its tokens). Entropy bonus and auxiliary terms, where enabled, are scaled alike.
    """
    loss_type = trainer.loss_type
    accumulation = float(trainer.current_gradient_accumulation_steps)
    value = loss.detach().to(torch.float64)
    sequences = int(inputs["completion_ids"].shape[0])
    if loss_type in _PER_SEQUENCE:
        return value * (accumulation * sequences), sequences
    tokens = grpo_mask(inputs).sum()
    if loss_type == "bnpo":
        return value * accumulation * tokens.to(torch.float64), tokens
    if loss_type == "dr_grpo":
        units = sequences * int(trainer.max_completion_length)
        return value * (accumulation * units), units
    if loss_type in _GLOBAL_TOKENS:
        items = inputs["num_items_in_batch"]
        scale = accumulation / (float(trainer.accelerator.num_processes) * float(trainer.args.steps_per_generation))
        if isinstance(items, Tensor):
            return value * items.to(torch.float64).clamp(min=1.0) * scale, tokens  # a CPU 0-d one as a scalar
        return value * (max(float(items), 1.0) * scale), tokens
    raise ValueError(f"Unknown GRPO loss_type {loss_type!r}: its normalization is not known to ema_metrics.trl")


def grpo_loss_known(loss_type: Any) -> bool:
    """Whether :func:`grpo_loss_sum` knows how ``loss_type`` normalizes the loss (TRL 1.16's eight)."""
    return loss_type in (*_PER_SEQUENCE, *_GLOBAL_TOKENS, "bnpo", "dr_grpo")


# ---------------------------------------------------------------------------------------------------- SFT
SFT_KEYS = ("mean_token_accuracy", "entropy")


def sft_refusal(trainer: Any) -> str | None:
    """Why the callback cannot weight this ``SFTTrainer``'s loss, or ``None``.

    TRL 1.16 ``SFTTrainer.compute_loss`` computes the loss itself (the fused head's per-token losses, summed and
    divided by ``num_items_in_batch``) unless ``compute_loss_func`` or label smoothing computes it another way, or a
    mixture-of-experts auxiliary loss (a per-micro-batch mean) is added to it.
    """
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "it has a `compute_loss_func`, whose loss is not a sum over tokens known to the callback"
    if getattr(trainer, "label_smoother", None) is not None:
        return "label smoothing computes its loss outside the fused head"
    if getattr(trainer, "aux_loss_enabled", False):
        return "a mixture-of-experts auxiliary loss (a per-micro-batch mean) is added to the token loss"
    return None


def sft_count(inputs: Mapping[str, Any]) -> Tensor:
    """The tokens SFT's loss and token numbers count: ``shift_labels``, or ``labels[:, 1:]``, that are not -100.

    That is the fused head's ``label_mask`` (TRL 1.16 ``_fused_forward``), made from the micro-batch on the device.
    """
    shift_labels = inputs.get("shift_labels")
    labels = shift_labels if isinstance(shift_labels, Tensor) else inputs["labels"][:, 1:]
    return (labels != -100).sum()


def sft_weights(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The weight of ``mean_token_accuracy`` and ``entropy`` in one micro-batch: its counted tokens.

    Both are sums over every process's tokens (``gather_for_metrics``) divided by their count (TRL 1.16).
    """
    tokens = sft_count(inputs)
    return dict.fromkeys(SFT_KEYS, tokens)


def sft_loss_sum(trainer: Any, inputs: Mapping[str, Any], loss: Tensor, num_items: Any) -> tuple[Tensor, Tensor]:
    """One micro-batch's SFT loss summed over its tokens, and its token count.

    ``compute_loss`` returns ``sum / num_items_in_batch``, times the number of processes with
    ``average_tokens_across_devices`` (the Trainer's count of the step's tokens over every process, which for some
    models counts the unshifted labels), or ``sum / count`` without ``num_items_in_batch``; the per-token loss is the
    negative log-likelihood, or DFT's reweighted one with ``loss_type="dft"``.
    """
    count = sft_count(inputs)
    value = loss.detach().to(torch.float64)
    if num_items is None:
        return value * count.to(device=value.device, dtype=torch.float64).clamp(min=1.0), count
    processes = 1.0
    if trainer.args.average_tokens_across_devices:
        processes = float(trainer.accelerator.num_processes // trainer.get_tp_size())
    if isinstance(num_items, Tensor):
        # a CPU 0-d count joins the device kernel as a scalar argument: no copy to the device
        return value * num_items.to(torch.float64) / processes, count
    return value * (float(num_items) / processes), count
