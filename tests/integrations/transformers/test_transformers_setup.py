"""``EMALossCallback`` refuses what it cannot see exactly, checks arguments and saved states, needs its extra."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer tests need `ema_metrics[transformers]`")

from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, Trainer, TrainingArguments

from ema_metrics import EMAMetric
from ema_metrics.integrations.transformers.internals import loss_shifts_labels
from ema_metrics.integrations.transformers.state import gather_states, restore_states
from ema_metrics.transformers import EMALossCallback
from tests.hf_worker import VOCAB, make_data

CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": VOCAB, "n_positions": 16, "bos_token_id": 0}


def _train(tmp_path: Path, model: torch.nn.Module | None = None, **kwargs: Any) -> EMALossCallback:
    callback = EMALossCallback(half_life=3)
    trainer_kwargs = {k: kwargs.pop(k) for k in ("compute_loss_func",) if k in kwargs}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )
    torch.manual_seed(0)
    model = model if model is not None else GPT2LMHeadModel(GPT2Config(**CONFIG, eos_token_id=0))
    Trainer(model=model, args=args, train_dataset=make_data(8, seed=1), callbacks=[callback], **trainer_kwargs).train()
    return callback


def test_label_smoothing_is_refused_when_training_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`label_smoothing_factor` to 0, but got 0\.1"):
        _train(tmp_path, label_smoothing_factor=0.1)


def test_compute_loss_func_is_refused_at_the_first_micro_batch(tmp_path: Path) -> None:
    def loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        return outputs.logits.float().mean()

    with pytest.raises(RuntimeError, match=r"called with no `labels`.*compute_loss_func"):
        _train(tmp_path, compute_loss_func=loss_func)


class _NoLoss(torch.nn.Module):
    """Takes labels but returns only logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> dict[str, Any]:
        return {"logits": self.emb(input_ids)}


def test_a_model_that_returns_no_loss_is_refused_at_the_first_micro_batch(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"called with `labels` but returned loss None"):
        _train(tmp_path, model=_NoLoss())


def test_a_short_run_logs_loss_ema_and_unhooks_the_model(tmp_path: Path) -> None:
    callback = _train(tmp_path, logging_steps=1)
    assert callback.metric.ticks == 2  # one tick per optimizer step
    assert callback._hook is None


def test_resume_from_a_checkpoint_written_without_the_callback_warns_and_restarts(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG, eos_token_id=0))
    Trainer(model=model, args=args, train_dataset=make_data(16, seed=1)).train()  # no EMALossCallback
    args.max_steps = 4
    callback = EMALossCallback(half_life=3)
    trainer = Trainer(model=model, args=args, train_dataset=make_data(16, seed=1), callbacks=[callback])
    with pytest.warns(UserWarning, match=r"checkpoint of step 2 holds no state .* loss_ema starts again"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # and saves at step 4
    assert callback.metric.ticks == 2
    assert [h["step"] for h in trainer.state.log_history if "loss_ema" in h] == [3, 4]
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["EMALossCallback"]["attributes"]["checkpoint_ranks"]["step"] == 4


def test_a_micro_batch_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    callback = EMALossCallback(half_life=3)
    callback._shifts = True
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, -100, -100]])
    module = torch.nn.Linear(1, 1).train()
    callback.metric.begin_tick()

    def read_back(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, read_back)
        for loss, num_items in [(torch.tensor(2.0), None), (torch.tensor(0.5), torch.tensor(6))]:
            kwargs = {"labels": labels, "num_items_in_batch": num_items}
            callback._on_forward(module, (), kwargs, {"loss": loss})
    callback.metric.end_tick()
    # 3 shifted tokens with mean loss 2, then a token sum of 0.5 * 6 over 3 tokens: (6 + 3) / 6
    assert float(callback.metric.compute()) == pytest.approx(9 / 6, rel=1e-12)


def test_token_count_shifts_labels_for_causal_lms_only() -> None:
    assert loss_shifts_labels(GPT2LMHeadModel(GPT2Config(**CONFIG)))  # loss_type None: found by its class
    assert not loss_shifts_labels(GPT2ForSequenceClassification(GPT2Config(**CONFIG, pad_token_id=0)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": 3}, TypeError, r"`name` to be a string, but got 3"),
        ({"name": ""}, ValueError, r"`name` to be a non-empty string, but got ''"),
        ({"shift_labels": "yes"}, TypeError, r"`shift_labels` to be None or a bool, but got 'yes'"),
        ({"half_life": -3}, ValueError, r"half_life"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EMALossCallback(**{"half_life": 3, **kwargs})


def _metric_with(values: list[tuple[float, int]]) -> EMAMetric:
    m = EMAMetric(alpha=0.5)
    for value, weight in values:
        with m.tick():
            m.update(value, weight=weight)
    return m


def test_saved_states_restore_exactly_and_damaged_ones_are_refused() -> None:
    saved = _metric_with([(1.0, 3), (2.5, 7)])
    data = gather_states(saved)
    restored = EMAMetric(alpha=0.5)
    restore_states(restored, data, "entry")
    assert restored.ticks == 2
    assert float(restored.compute()) == float(saved.compute())
    other = gather_states(_metric_with([(4.0, 1), (0.5, 1)]))["ranks"][0]
    two_ranks = {"world_size": 2, "ranks": [data["ranks"][0], other]}
    pooled = EMAMetric(alpha=0.5)
    restore_states(pooled, two_ranks, "entry")  # saved on 2 processes, resumed on 1: rank 0 takes the sum
    expected = _metric_with([(1.0 * 3 / 4 + 4.0 / 4, 4), ((2.5 * 7 + 0.5) / 8, 8)])
    assert float(pooled.compute()) == pytest.approx(float(expected.compute()), rel=1e-12)

    uneven = {"ranks": [data["ranks"][0], gather_states(_metric_with([(4.0, 1)]))["ranks"][0]]}
    damaged = {"ranks": [{**data["ranks"][0], "sums": {"shape": [4], "values": [1.0, "x", 0.0, 0.0]}}]}
    for bad, match in [
        (None, r"entry: expected a dict with a non-empty list 'ranks', but got None"),
        ({"ranks": [{"sums": 1}]}, r"entry, rank 0: expected a state with keys"),
        (damaged, r"entry, rank 0: entry 'sums' is not a saved tensor"),
        (uneven, r"entry: the saved ranks ticked different numbers of times \(\[1, 2\]\)"),
    ]:
        before = restored.state_dict()
        with pytest.raises(ValueError, match=match):
            restore_states(restored, bad, "entry")
        torch.testing.assert_close(restored.state_dict()["sums"], before["sums"], rtol=0, atol=0)


def test_import_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    monkeypatch.delitem(sys.modules, "ema_metrics.transformers")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'ema_metrics\[transformers\]'"):
        importlib.import_module("ema_metrics.transformers")
    monkeypatch.undo()
    assert importlib.import_module("ema_metrics.transformers").EMALossCallback is EMALossCallback
