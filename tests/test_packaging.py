"""The distribution: every package folder is installed, the CLI under a name no other
distribution uses, and the console scripts resolve."""

import importlib
import importlib.util

import pytest

from builders import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("libra_tok", "libra_lm")
               for p in (ROOT / top).rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert on_disk | {"libra_cli"} == listed


def test_the_cli_installs_as_libra_cli():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"libra_cli": "cli"}
    assert importlib.util.find_spec("libra_cli").origin == str(ROOT / "cli" / "__init__.py")


def test_console_scripts_resolve():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"libra-tok", "libra-lm"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert module.startswith("libra_cli.")
        assert callable(getattr(importlib.import_module(module), attr))
