"""The README's "Supported versions" table, the ranges ``pyproject.toml`` declares, and the floor pins, in one place.

``make test`` runs the suite in two environments: one with the newest releases and one with ``torchmetrics``,
``lightning``, ``pytorch-lightning`` and ``transformers`` pinned to the floors declared in ``pyproject.toml`` (and
without ``trl``, which needs a newer ``transformers``). It gets those pins from
``python tests/supported_versions.py pins``, and tells the suite which environment it is in with
``EMA_METRICS_TESTED_ENV`` (``floor`` or ``newest``); ``tests/test_supported_versions.py`` then checks the README
table against both.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "EMA_METRICS_TESTED_ENV"
ROWS = ("python", "torch", "torchmetrics", "lightning", "pytorch-lightning", "transformers", "trl")
PINNED = ("torchmetrics", "lightning", "pytorch-lightning", "transformers")  # at their floors in the floor environment
COLUMNS = ("declared", "tested floor", "tested newest", "CI floor env", "CI newest env")
ENVS = ("floor", "newest")
# Packages that a CI environment does not install, and that its column marks with NOT_INSTALLED: trl 1.16 needs
# transformers 4.56.2 or later, so it cannot join the transformers floor.
ABSENT = {"floor": ("trl",), "newest": ()}
NOT_INSTALLED = "—"


def declared() -> dict[str, str]:
    """The range declared for every row: ``requires-python``, and each package's specifier in ``pyproject.toml``.

    A package named in several places (core dependencies, extras) must have the same specifier everywhere.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges: dict[str, set[str]] = {"python": {project["requires-python"]}}
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    for requirement in (Requirement(text) for requirements in lists for text in requirements):
        name = canonicalize_name(requirement.name)
        if name in ROWS:
            ranges.setdefault(name, set()).add(str(requirement.specifier))
    for name, specs in ranges.items():
        if len(specs) != 1:
            raise ValueError(f"pyproject.toml declares {name} with different ranges: {sorted(specs)}")
    return {name: ranges[name].pop() for name in ROWS}


def floor(spec: str) -> str:
    """The version in a ``>=X`` range, the only form of range this project declares."""
    match = re.fullmatch(r">=([0-9][0-9.]*)", spec)
    if match is None:
        raise ValueError(f"Expected a range of the form `>=X`, but got {spec!r}")
    return match.group(1)


def floor_pins() -> list[str]:
    """``name==floor`` for every package that the floor environment pins."""
    ranges = declared()
    return [f"{name}=={floor(ranges[name])}" for name in PINNED]


def readme_table() -> dict[str, dict[str, str]]:
    """The README's "Supported versions" table: ``{row: {column: cell}}``, cells without backticks and footnotes."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Supported versions\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    if tuple(header[1:]) != COLUMNS:
        raise ValueError(f"Expected the README table's columns to be {COLUMNS}, but got {header[1:]}")
    table = {}
    for line in lines[2:]:
        cells = [re.sub(r"[`*]|\s*\[\d+\]", "", cell).strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(COLUMNS, cells[1:], strict=True))
    return table


if __name__ == "__main__":
    if sys.argv[1:] != ["pins"]:
        sys.exit("usage: python tests/supported_versions.py pins")
    print(" ".join(floor_pins()))
