"""The README's "Supported versions" table says what ``pyproject.toml`` declares and what CI ran.

``make test`` runs the suite twice and sets ``EMA_METRICS_TESTED_ENV`` to ``newest`` or ``floor``; in each run the
table's column for that environment must name the versions actually installed, or say that a package is not installed
there when it is not, so the table cannot drift from CI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

import pytest
import torch
from packaging.version import Version

from tests.supported_versions import (
    ABSENT,
    ENV_VAR,
    ENVS,
    NOT_INSTALLED,
    PINNED,
    ROWS,
    declared,
    floor,
    floor_pins,
    readme_table,
)

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


@pytest.mark.parametrize("env", ENVS)
def test_only_the_packages_absent_from_an_environment_are_marked_not_installed(env: str) -> None:
    column = f"CI {env} env"
    assert tuple(row for row in ROWS if TABLE[row][column] == NOT_INSTALLED) == ABSENT[env]


@pytest.mark.parametrize("row", ABSENT["floor"])
def test_the_floor_of_a_package_absent_from_the_floor_env_is_what_the_newest_env_runs(row: str) -> None:
    cells = TABLE[row]
    assert cells["CI newest env"] == cells["tested floor"], (
        f"{row} is not in the floor environment, so CI tests its declared floor only while the newest environment runs"
        f" it: the newest run has {cells['CI newest env']}, the floor is {cells['tested floor']}"
    )


def _installed(row: str) -> str:
    if row == "python":
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    if row == "torch":
        return Version(torch.__version__).base_version  # without a local tag such as +cpu
    return importlib.metadata.version(row)


def _ci_env() -> str:
    env = os.environ.get(ENV_VAR)
    if env is None:
        pytest.skip(f"{ENV_VAR} is set by `make test` (to `newest` or `floor`); without it there is no CI column")
    assert env in ENVS, f"{ENV_VAR} must be `newest` or `floor`, but got {env!r}"
    return env


@pytest.mark.parametrize("row", ROWS)
def test_table_names_what_this_ci_environment_runs(row: str) -> None:
    env = _ci_env()
    column = f"CI {env} env"
    if TABLE[row][column] == NOT_INSTALLED:
        assert row in ABSENT[env]
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(row)  # the table says it is not installed here: it must not be
        return
    assert TABLE[row][column] == _installed(row), (
        f"the README's Supported versions table says {row} {TABLE[row][column]} for {column!r}, but this"
        f" environment runs {_installed(row)}: update the table"
    )


# Each integration module and the row of the package it needs.
INTEGRATIONS = {
    "lightning.pytorch": "lightning",
    "pytorch_lightning": "pytorch-lightning",
    "ema_metrics.lightning": "lightning",
    "transformers": "transformers",
    "ema_metrics.transformers": "transformers",
    "trl": "trl",
    "ema_metrics.trl": "trl",
}


@pytest.mark.parametrize(("module", "row"), INTEGRATIONS.items())
def test_integrations_import_in_ci(module: str, row: str) -> None:
    """The integration tests skip when their framework is missing; in CI a missing or broken one must fail instead.

    Where a package is not installed (``ABSENT``, which the table marks), the import must fail, and ``ema_metrics``'
    own module must name the extra to install.
    """
    env = _ci_env()
    if row not in ABSENT[env]:
        importlib.import_module(module)
        return
    match = rf"ema_metrics\[{row}\]" if module.startswith("ema_metrics.") else row
    with pytest.raises(ModuleNotFoundError, match=match):
        importlib.import_module(module)
