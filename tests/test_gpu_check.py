"""``benchmarks/gpu_check.py`` (``make gpu-check``) runs, as a dry run on the CPU with a gloo group of one process.

On a GPU the same script turns every hidden synchronization into an error and counts the copies between host and
device with the profiler; here it checks that the script runs the current code end to end, so that it is ready when a
GPU is at hand, that its forced one-process collectives give the local values, and that its Lightning and Trainer runs
log the values of their float64 oracles (``docs/gpu.md`` has what it printed on an H100).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--calls", "50"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"]
    assert all(form["ok"] for form in summary["hot_path"]["forms"].values())
    assert summary["sync"]["backend"] == "gloo"
    assert all(summary["sync"][f"synced_values k={k}"]["equal_local"] for k in (1, 3, 8))
    assert summary["sync"]["cpu metric"]["value"] == 4.0
    assert summary["timing"]["forward / MeanMetric.forward"] < 1.0
    lightning = summary["lightning"]  # a real fit, read back from its CSV log, against the recorded losses
    assert lightning["module metric matches"]
    assert lightning["zero-code key matches"]
    assert lightning["steps"] == list(range(8))
    hf = summary["transformers"]  # a real Trainer run against per-token losses recomputed from the logits
    assert hf["matches oracle"]
    assert hf["compiled matches eager"]
    assert hf["compiled frames flat"]
