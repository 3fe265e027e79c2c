"""The tour notebook runs top to bottom and shows what it claims; the notebook in the repository stores no outputs.

The notebook is executed with nbclient on a kernel started with this interpreter (``sys.executable``), through a
kernelspec written into a temporary folder, so the result does not depend on which kernelspecs the machine has.
Its last code cell prints a JSON summary of the numbers it shows; they are checked here.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.ddp_utils import require_gloo

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ema_metrics_tour.ipynb"
MAX_SECONDS = 120.0
N_FIGURES = 5


def _read_notebook() -> Any:
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def _kernel_manager(tmp_path: Path) -> Any:
    """A kernel manager whose ``python3`` kernel is this interpreter, whatever kernelspecs are installed."""
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (the test's interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _visible_files(folder: Path) -> set[str]:
    """Names under ``folder`` (one level), leaving out Python's bytecode caches."""
    return {p.name for p in folder.iterdir() if p.name != "__pycache__"}


def test_notebook_stores_no_outputs() -> None:
    nb = _read_notebook()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]
    assert "outputs are not stored" in nb.cells[0].source.lower()


@pytest.mark.slow
@pytest.mark.lightning
@pytest.mark.ddp
def test_notebook_runs_and_shows_what_it_claims(tmp_path: Path) -> None:
    require_gloo()
    for module in ("lightning.pytorch", "matplotlib", "pandas", "nbclient"):
        pytest.importorskip(module)
    from nbclient import NotebookClient

    nb = _read_notebook()
    km = _kernel_manager(tmp_path)
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", km=km, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    watched = (NOTEBOOK.parent, ROOT / "examples")
    had_lightning_logs = (ROOT / "lightning_logs").exists()
    before = {folder: _visible_files(folder) for folder in watched}
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f} s")  # shown with `pytest -s`

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code_cells for o in c.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) >= N_FIGURES

    stdout = "".join(o.text for o in code_cells[-1].outputs if o.output_type == "stream" and o.name == "stdout")
    summary = json.loads(stdout.strip().splitlines()[-1])
    # the EMA + EMAMetricsCallback curves of the five layouts coincide; `self.log(loss, on_step=True)` ones do not
    assert summary["ema_max_rel_diff_across_layouts"] < 1e-5
    assert summary["raw_max_rel_diff_across_layouts"] > 1e-3
    # and the EMA curves are the pandas EWM of the per-step loss pooled over all micro-batches and processes
    assert summary["ema_vs_pandas_max_abs_diff_lightning"] < 1e-9
    assert summary["ema_vs_pandas_max_abs_diff_adjust"] < 1e-9
    assert len(summary["layouts"]) == 5
    # the smoothed accuracy has followed the drift to the late level
    final, early, late = (summary[k] for k in ("final_smoothed_accuracy", "early_true_accuracy", "late_true_accuracy"))
    assert abs(final - late) < abs(final - early)
    assert abs(final - late) < 0.05

    # nothing was written into the repository: the logs went to a temporary folder, removed now
    log_dir = Path(summary["log_dir"])
    assert log_dir.is_dir()
    assert log_dir.resolve().parent == Path(tempfile.gettempdir()).resolve()
    shutil.rmtree(log_dir)
    assert {folder: _visible_files(folder) for folder in watched} == before
    assert (ROOT / "lightning_logs").exists() == had_lightning_logs
    assert seconds < MAX_SECONDS, f"the notebook took {seconds:.0f} s"
