"""``ema_metrics.trl``: what it refuses (with a message naming the argument and the value, nothing changed), and its
per-micro-batch code on a stand-in accelerator (no read-back, no copy of host data; see ``tests/device_utils.py``).

The trainers here are TRL's classes made without ``__init__`` and given only the attributes the callback reads, so
that each check runs in milliseconds; the real runs are in ``test_trl_ema.py``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="the TRL tests need `ema_metrics[trl]`")

from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer

from ema_metrics.trl import EMATRLCallback, attach
from tests.device_utils import recording

DEV = torch.device("meta")


def _bare(cls: Any, **attributes: Any) -> Any:
    trainer = cls.__new__(cls)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


@pytest.mark.parametrize(
    ("trainer", "match"),
    [
        (_bare(RewardTrainer), r"argument `trainer` = RewardTrainer\. For the loss .* use ema_metrics\.transformers"),
        (object(), r"GRPOTrainer, DPOTrainer, SFTTrainer, but got argument `trainer` = object"),
        (_bare(GRPOTrainer, loss_type="ppo"), r"does not know how GRPO's loss_type='ppo' normalizes the loss"),
        (_bare(SFTTrainer, compute_loss_func=len), r"this SFTTrainer's loss: it has a `compute_loss_func`"),
        (_bare(SFTTrainer, compute_loss_func=None, label_smoother=len), r"label smoothing computes its loss outside"),
        (_bare(SFTTrainer, aux_loss_enabled=True), r"auxiliary loss \(a per-micro-batch mean\)"),
        (
            _bare(DPOTrainer, args=SimpleNamespace(restore_callback_states_from_checkpoint=True)),
            r"`restore_callback_states_from_checkpoint` = True: .* rebuilds callbacks without the trainer",
        ),
    ],
)
def test_unsupported_trainers_are_refused_and_left_unchanged(trainer: Any, match: str) -> None:
    store = getattr(trainer, "_metrics", {}).get("train")
    with pytest.raises(ValueError, match=match):
        EMATRLCallback(trainer, half_life=3)
    assert getattr(trainer, "_metrics", {}).get("train") is store  # TRL's store was not replaced
    assert "compute_loss" not in vars(trainer) if hasattr(trainer, "__dict__") else True


@pytest.mark.parametrize(("suffix", "error"), [(1, TypeError), ("", ValueError)])
def test_a_bad_suffix_is_refused_naming_it(suffix: Any, error: type[Exception]) -> None:
    trainer = _bare(DPOTrainer)
    with pytest.raises(error, match=rf"argument `suffix` .* but got {suffix!r}"):
        EMATRLCallback(trainer, half_life=3, suffix=suffix)
    assert type(trainer._metrics["train"]) is defaultdict


def test_a_trainer_is_attached_once() -> None:
    trainer = _bare(DPOTrainer, callback_handler=SimpleNamespace(callbacks=[]))
    trainer.add_callback = trainer.callback_handler.callbacks.append
    callback = attach(trainer, half_life=3)
    assert trainer.callback_handler.callbacks == [callback]
    with pytest.raises(RuntimeError, match="already has an EMA callback attached"):
        attach(trainer, half_life=3)


def _dpo_inputs() -> dict[str, Any]:
    return {"completion_mask": torch.ones((4, 6), dtype=torch.long, device=DEV)}


def test_dpo_micro_batches_read_nothing_back_and_copy_nothing() -> None:
    trainer = _bare(DPOTrainer)
    loss = torch.full((), 0.5, device=DEV)  # made before recording: the test's loss is not the callback's work

    def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        for key in ("rewards/chosen", "rewards/margins", "entropy", "mean_token_accuracy"):
            trainer._metrics["train"][key].append(0.25)  # TRL appends host floats it read itself
        return loss

    trainer.compute_loss = compute_loss
    callback = EMATRLCallback(trainer, half_life=3)
    model = torch.nn.Linear(2, 2).train()
    for metric in callback.metrics.values():
        metric.to(DEV)
    callback.on_step_begin(None, None, None)
    with recording() as record:
        for _ in range(3):
            trainer.compute_loss(model, _dpo_inputs(), num_items_in_batch=None)
    assert not record, record.summary()
    counts = {key: metric._numel for key, metric in callback.metrics.items()}
    assert counts == {
        "loss": 3,
        "rewards/chosen": 3,
        "rewards/rejected": 0,
        "rewards/accuracies": 0,
        "rewards/margins": 3,
        "logps/chosen": 0,
        "logps/rejected": 0,
        "entropy": 3,
        "mean_token_accuracy": 3,
    }


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_micro_batches_read_nothing_back_and_copy_nothing(loss_type: str) -> None:
    model = torch.nn.Linear(2, 2).train()
    trainer = _bare(
        GRPOTrainer,
        loss_type=loss_type,
        beta=0.1,
        reward_func_names=["f", "g"],
        current_gradient_accumulation_steps=2,
        max_completion_length=6,
        model=model,
        args=SimpleNamespace(steps_per_generation=2),
        accelerator=SimpleNamespace(num_processes=1, process_index=0),
    )

    loss, rewards = torch.full((), 0.5, device=DEV), torch.zeros((4, 2), device=DEV)

    def calculate_rewards(inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        return rewards

    def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        for key in ("kl", "entropy"):
            trainer._metrics["train"][key].append(0.25)
        return loss

    trainer._calculate_rewards = calculate_rewards
    trainer.compute_loss = compute_loss
    callback = EMATRLCallback(trainer, half_life=3)
    for metric in callback.metrics.values():
        metric.to(DEV)
    inputs = {
        "completion_ids": torch.ones((2, 6), dtype=torch.long, device=DEV),
        "completion_mask": torch.ones((2, 6), dtype=torch.long, device=DEV),
        "num_items_in_batch": torch.full((), 24, device=DEV),
    }
    callback.on_step_begin(None, None, None)
    with recording() as record:
        trainer._calculate_rewards([{}] * 4, ["p"] * 4, ["c"] * 4, [[1]] * 4)
        for key in ("reward", "reward_std", "rewards/f/mean", "rewards/g/mean"):
            trainer._metrics["train"][key].append(1.5)
        for _ in range(2):
            trainer.compute_loss(model, inputs, num_items_in_batch=None)
    assert not record, record.summary()
    counts = {key: metric._numel for key, metric in callback.metrics.items()}
    assert counts == dict.fromkeys(["reward", "reward_std", "rewards/f/mean", "rewards/g/mean"], 1) | {
        "loss": 2,
        "kl": 2,
        "entropy": 2,
    }


@pytest.mark.parametrize("num_items", [None, 9, "cpu 0-d", "device"])
def test_sft_micro_batches_read_nothing_back_and_copy_nothing(num_items: Any) -> None:
    trainer = _bare(
        SFTTrainer,
        args=SimpleNamespace(average_tokens_across_devices=True),
        accelerator=SimpleNamespace(num_processes=1),
        get_tp_size=lambda: 1,
    )
    loss = torch.full((), 0.5, device=DEV)

    def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        for key in ("mean_token_accuracy", "entropy"):
            trainer._metrics["train"][key].append(0.25)
        return loss

    trainer.compute_loss = compute_loss
    callback = EMATRLCallback(trainer, half_life=3)
    for metric in callback.metrics.values():
        metric.to(DEV)
    items = {"device": torch.full((), 9, device=DEV), "cpu 0-d": torch.tensor(9)}.get(num_items, num_items)
    inputs = {"labels": torch.ones((2, 6), dtype=torch.long, device=DEV)}
    callback.on_step_begin(None, None, None)
    with recording() as record:
        for _ in range(2):
            trainer.compute_loss(torch.nn.Linear(2, 2).train(), inputs, num_items_in_batch=items)
    assert not record, record.summary()
    assert {key: metric._numel for key, metric in callback.metrics.items()} == dict.fromkeys(
        ["loss", "mean_token_accuracy", "entropy"], 2
    )
