"""The training recipes ship inside the package: bare names work from any folder and from an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from perceivers import cli

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("cifar100-keras", "digits", "imagenet-perceiver-io", "mlm-bytes")


def test_recipes_live_in_the_package():
    package = Path(cli.__file__).resolve().parent
    assert cli.RECIPE_DIR == package / "recipes"
    assert set(RECIPES) <= set(cli.list_recipes())


def test_recipe_lookup_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in RECIPES:
        path = Path(cli.resolve_config(name))
        assert path.is_file() and path == cli.RECIPE_DIR / f"{name}.yaml"
        assert cli.resolve_config(f"{name}.yaml") == str(path)
    (tmp_path / "digits.yaml").write_text("trainer: {max_epochs: 1}\n")  # a file of the same name wins
    assert cli.resolve_config("digits.yaml") == "digits.yaml"


def test_default_recipe_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--trainer.max_steps", "1", "--print_config"])
    assert exit_info.value.code in (0, None)
    captured = capsys.readouterr()
    assert "class_path: perceivers.train.DigitsDataModule" in captured.out and "max_steps: 1" in captured.out
    assert "using the recipe digits" in captured.err


def test_unknown_recipe_lists_the_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", "digitz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perceivers fit: error: --config digitz:")
    assert ", ".join(cli.list_recipes()) in err


def test_a_user_file_still_works(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((cli.RECIPE_DIR / "digits.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(recipe), "--trainer.max_epochs", "7", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "max_epochs: 7" in capsys.readouterr().out


def test_help_names_the_recipes(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "configs/" not in out and ", ".join(cli.list_recipes()) in out


def test_wheel_ships_the_recipes(tmp_path):
    """Build a wheel from a copy of the source (no network, no build folder in the repository), check the recipe
    files are in it, install it into a folder and resolve the default recipe from another directory."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src" / "perceivers", source / "src" / "perceivers",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                            "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("perceivers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in sorted(cli.RECIPE_DIR.glob("*.yaml")):
        assert f"perceivers/recipes/{recipe.name}" in names

    target = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300, check=False)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import perceivers.cli as c; print(c.__file__); print(c.resolve_config('digits'))"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    module, recipe = out.stdout.split()
    assert Path(module).is_relative_to(target), module  # the installed copy, not the source tree
    assert Path(recipe) == target / "perceivers" / "recipes" / "digits.yaml" and Path(recipe).is_file()
