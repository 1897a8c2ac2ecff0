"""The top-level parts import only downward: contract <- operator, jobrunner <- dev stack; and
the dev stack's substrate (beam_devstack.substrate) imports nothing of the project.

import-linter reads the real import graph of the installed packages; the layers are in
pyproject.toml ([tool.importlinter]). An upward import (the contract importing the operator, the
jobrunner importing the operator, a shipped program importing the dev stack) or a cycle fails.
"""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_the_layers_in_pyproject_hold():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_the_check_sees_real_imports(tmp_path):
    # The same graph against inverted layers must break: the operator does import the contract.
    inverted = tmp_path / "inverted.toml"
    inverted.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["beam_contract", "beam_operator", "beam_jobrunner"]\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "inverted"\ntype = "layers"\nlayers = ["beam_contract", "beam_operator | beam_jobrunner"]\n'
    )
    assert lint_imports(config_filename=str(inverted), no_cache=True) == 1
