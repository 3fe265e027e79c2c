"""The built wheel and sdist are complete, and the wheel works in a fresh environment without Lightning.

Builds with ``python -m build`` (isolated: hatchling comes from the package index), then installs the wheel into a new
virtual environment, CPU torch first so that no CUDA build is pulled in, and runs a snippet there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import ema_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The exact torch build running the tests (2.13.0+cpu from the Makefile's TORCH_SPEC): its local version label keeps
# pip from swapping in a multi-GB CUDA build.
TORCH_SPEC = f"torch=={torch.__version__}"

SNIPPET = """
import importlib.util, json
import ema_metrics
m = ema_metrics.EMAMetric(alpha=0.5)
m(1.0)
m(3.0)
out = {"value": float(m.compute()), "file": ema_metrics.__file__, "version": ema_metrics.__version__,
       "has_lightning": importlib.util.find_spec("lightning") is not None}
try:
    import ema_metrics.lightning
except ImportError as err:
    out["error"] = [type(err).__name__, str(err)]
print(json.dumps(out))
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)], cwd=out)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1, wheels
    assert len(sdists) == 1, sdists
    return wheels[0], sdists[0]


def test_wheel_contents(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    assert wheel.name == f"ema_metrics-{ema_metrics.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(f"ema_metrics-{ema_metrics.__version__}.dist-info/METADATA").decode()
    assert "ema_metrics/py.typed" in names
    assert "ema_metrics/__init__.py" in names
    assert "ema_metrics/ema.py" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/")) or "/tests/" in n]
    assert all(n.startswith(("ema_metrics/", "ema_metrics-")) for n in names), names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: torchmetrics") for r in requires), requires
    assert not [r for r in requires if "lightning" in r and "extra ==" not in r], "lightning must stay optional"
    assert not [r for r in requires if "transformers" in r and "extra ==" not in r], "transformers must stay optional"
    assert any(r.startswith("Requires-Dist: transformers") and "extra == 'transformers'" in r for r in requires)


def test_sdist_contents(dists: tuple[Path, Path]) -> None:
    _, sdist = dists
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for required in ("pyproject.toml", "README.md", "src/ema_metrics/__init__.py", "src/ema_metrics/py.typed"):
        assert required in names, required
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]


def test_wheel_in_fresh_venv_without_lightning(dists: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, _ = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # torch first: the wheel's plain `torch` requirement is then already met by the CPU build
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", TORCH_SPEC], cwd=tmp_path)
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", str(wheel)], cwd=tmp_path)
    out = json.loads(_run([str(python), "-c", SNIPPET], cwd=tmp_path).strip().splitlines()[-1])

    assert Path(out["file"]).is_relative_to(venv), out["file"]  # the installed wheel, not the source tree
    assert out["version"] == ema_metrics.__version__
    beta = 1 - 0.5
    assert out["value"] == pytest.approx((beta * 1.0 + 3.0) / (beta + 1.0), rel=1e-12)  # 7/3
    assert not out["has_lightning"]  # the wheel pulls torchmetrics, not lightning
    assert "error" in out, "import ema_metrics.lightning succeeded without lightning installed"
    kind, message = out["error"]
    assert kind == "ModuleNotFoundError"
    assert "ema_metrics[lightning]" in message, message
