"""MLflow (local file store) and W&B (offline) log the same smoothed points as the CSV logger, read back from disk."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.integrations.lightning.test_lightning_acceptance import HALF_LIFE, LOG_EVERY, STEPS, B, RegressionModule  # noqa: E402
from tests.lightning_helpers import ema_oracle, read_csv_metric, read_records  # noqa: E402

EXPECTED_STEPS = [s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0]


def _fit_and_check(tmp_path: Path, logger: Any, read_back: Any) -> None:
    """Fit with the CSV logger and ``logger``; ``read_back()`` gives ``logger``'s (step, train_loss) points."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        log_every_n_steps=LOG_EVERY,
        logger=[pl.loggers.CSVLogger(tmp_path / "csv"), logger],
        callbacks=[EMAMetricsCallback()],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RegressionModule(str(record_dir), batch_size=B))
    points = read_back()
    assert [s for s, _ in points] == EXPECTED_STEPS  # one point per logged optimizer step
    from_csv = read_csv_metric(tmp_path / "csv", "train_loss")
    assert [s for s, _ in from_csv] == EXPECTED_STEPS
    assert [v for _, v in points] == pytest.approx([v for _, v in from_csv], rel=1e-12)
    oracle = ema_oracle(read_records(record_dir), HALF_LIFE)
    assert [v for _, v in points] == pytest.approx([oracle[s] for s in EXPECTED_STEPS], rel=1e-6)


@pytest.mark.lightning
def test_mlflow_file_store_reads_back_one_point_per_logged_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow_client = pytest.importorskip("mlflow.tracking", reason="MLflow is in the `test` extra (mlflow-skinny)")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = f"file:{tmp_path / 'mlruns'}"
    mlflow = pl.loggers.MLFlowLogger(experiment_name="ema", tracking_uri=uri)

    def read_back() -> list[tuple[int, float]]:
        history = mlflow_client.MlflowClient(uri).get_metric_history(mlflow.run_id, "train_loss")
        return sorted((m.step, m.value) for m in history)

    _fit_and_check(tmp_path, mlflow, read_back)


def _read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """History rows of an offline W&B run: a LevelDB-style log of protobuf records (32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, pending, records = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 1:  # full record
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


@pytest.mark.lightning
def test_wandb_offline_run_reads_back_one_point_per_logged_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="W&B is in the `test` extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb_logger = pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="ema")

    def read_back() -> list[tuple[int, float]]:
        wandb_logger.experiment.finish()  # flush the run file (W&B's writer may still be finishing it under load)
        (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
        deadline = time.monotonic() + 30.0
        while True:
            rows = [r for r in _read_wandb_history(run_file) if "train_loss" in r]
            if len(rows) >= len(EXPECTED_STEPS) or time.monotonic() > deadline:
                return [(int(r["trainer/global_step"]), float(r["train_loss"])) for r in rows]
            time.sleep(0.2)

    _fit_and_check(tmp_path, wandb_logger, read_back)
