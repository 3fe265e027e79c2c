"""MLflow (local file store) logs the same smoothed points as the CSV logger: one per logged optimizer step."""

from __future__ import annotations

from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")
mlflow_client = pytest.importorskip("mlflow.tracking", reason="MLflow is in the `test` extra (mlflow-skinny)")

from ema_metrics.lightning import EMACallback  # noqa: E402
from tests.lightning_helpers import ema_oracle, read_csv_metric, read_records  # noqa: E402
from tests.test_lightning_acceptance import HALF_LIFE, LOG_EVERY, STEPS, B, RegressionModule  # noqa: E402


@pytest.mark.lightning
def test_mlflow_file_store_reads_back_one_point_per_logged_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    uri = f"file:{tmp_path / 'mlruns'}"
    mlflow = pl.loggers.MLFlowLogger(experiment_name="ema", tracking_uri=uri)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        log_every_n_steps=LOG_EVERY,
        logger=[pl.loggers.CSVLogger(tmp_path / "csv"), mlflow],
        callbacks=[EMACallback()],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RegressionModule(str(record_dir), batch_size=B))
    history = mlflow_client.MlflowClient(uri).get_metric_history(mlflow.run_id, "train_loss")
    from_mlflow = sorted((m.step, m.value) for m in history)
    expected_steps = [s for s in range(STEPS) if (s + 1) % LOG_EVERY == 0]
    assert [s for s, _ in from_mlflow] == expected_steps
    from_csv = read_csv_metric(tmp_path / "csv", "train_loss")
    assert [s for s, _ in from_csv] == expected_steps
    assert [v for _, v in from_mlflow] == pytest.approx([v for _, v in from_csv], rel=1e-12)
    oracle = ema_oracle(read_records(record_dir), HALF_LIFE)
    assert [v for _, v in from_mlflow] == pytest.approx([oracle[s] for s in expected_steps], rel=1e-6)
