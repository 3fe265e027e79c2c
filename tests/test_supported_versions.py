"""The README's "Supported versions" table says what ``pyproject.toml`` declares and what CI ran.

``make test`` runs the suite twice and sets ``EMA_METRICS_TESTED_ENV`` to ``newest`` or ``floor``; in each run the
table's column for that environment must name the versions actually installed, so the table cannot drift from CI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

import pytest
import torch
from packaging.version import Version

from tests.supported_versions import ENV_VAR, PINNED, ROWS, declared, floor, floor_pins, readme_table

TABLE = readme_table()
DECLARED = declared()


def test_table_has_one_row_per_dependency() -> None:
    assert tuple(TABLE) == ROWS


@pytest.mark.parametrize("row", ROWS)
def test_table_states_the_declared_range_and_its_floor_is_tested(row: str) -> None:
    cells = TABLE[row]
    assert cells["declared"] == DECLARED[row], "update the README's Supported versions table"
    assert Version(cells["tested floor"]) == Version(floor(DECLARED[row])), "the declared floor must be the tested one"
    assert Version(cells["tested floor"]) <= Version(cells["tested newest"])


@pytest.mark.parametrize("row", PINNED)
def test_pinned_packages_are_tested_by_ci_at_both_ends(row: str) -> None:
    cells = TABLE[row]
    assert cells["CI floor env"] == cells["tested floor"]
    assert cells["CI newest env"] == cells["tested newest"]


def test_floor_pins_are_the_declared_floors() -> None:
    assert floor_pins() == [f"{name}=={TABLE[name]['tested floor']}" for name in PINNED]


def _installed(row: str) -> str:
    if row == "python":
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    if row == "torch":
        return Version(torch.__version__).base_version  # without a local tag such as +cpu
    return importlib.metadata.version(row)


@pytest.mark.parametrize("row", ROWS)
def test_table_names_what_this_ci_environment_runs(row: str) -> None:
    env = os.environ.get(ENV_VAR)
    if env is None:
        pytest.skip(f"{ENV_VAR} is set by `make test` (to `newest` or `floor`); without it there is no CI column")
    assert env in ("newest", "floor"), f"{ENV_VAR} must be `newest` or `floor`, but got {env!r}"
    column = f"CI {env} env"
    assert TABLE[row][column] == _installed(row), (
        f"the README's Supported versions table says {row} {TABLE[row][column]} for {column!r}, but this"
        f" environment runs {_installed(row)}: update the table"
    )


@pytest.mark.parametrize("module", ["lightning.pytorch", "pytorch_lightning", "ema_metrics.lightning"])
def test_lightning_imports_in_ci(module: str) -> None:
    """The Lightning tests skip when Lightning is missing; in CI a missing or broken Lightning must fail instead."""
    if os.environ.get(ENV_VAR) is None:
        pytest.skip(f"{ENV_VAR} is set by `make test`; outside it the Lightning tests may be skipped on purpose")
    importlib.import_module(module)
