"""The ``perceivers`` command.

``fit | validate | test`` run LightningCLI (:mod:`perceivers.train.cli`); ``predict`` does too when it
gets Lightning options (``--config``, ``--ckpt_path``, ``--model.*``, ``--data.*``, ``--trainer.*``) and
otherwise runs the inference command :mod:`perceivers.commands.predict`; ``convert`` and ``export`` run
:mod:`perceivers.commands.convert` and :mod:`perceivers.commands.export`. Everything heavy is imported only once a command is chosen, so
``perceivers --help`` answers at once.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["list_recipes", "main", "recipe_path", "resolve_config"]

TRAIN_COMMANDS = ("fit", "validate", "test")
# `predict` options that mean Lightning; the inference command has its own --model NAME, --checkpoint
# PATH and --config JSON, so only the dotted forms and YAML configs count.
LIGHTNING_FLAGS = ("--ckpt_path", "--print_config", "--seed_everything", "--return_predictions")
LIGHTNING_SECTIONS = ("--model.", "--data.", "--trainer.", "--checkpoint.", "--plots.")
# The training recipes ship inside the package (package data), so bare names work from any folder and any install.
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_CONFIG = "digits"
# a bare recipe name: no folder, no inline YAML/JSON (`--config '{trainer: {max_epochs: 1}}'` is jsonargparse's)
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

USAGE = f"""usage: perceivers <command> [options]

Train, evaluate and run the Perceiver family.

commands:
  fit         train (LightningCLI); without --config uses the recipe {DEFAULT_CONFIG!r}
  validate    evaluate on the validation split (LightningCLI)
  test        evaluate on the test split (LightningCLI)
  predict     with --config/--ckpt_path/--model.*/--data.*/--trainer.*: Lightning prediction;
              otherwise the inference command (`perceivers predict --help`)
  convert     convert official / transformers / perceiver-pytorch checkpoints
  export      write a model as ONNX or a torch.export program, checked against the model

Training options come from YAML recipes and dotted overrides:
  perceivers fit --config cifar100-keras --data.init_args.root data/cifar-100-python
  perceivers fit --config digits --trainer.max_epochs 5 --print_config
  perceivers fit --config digits --resume true          # continue after a crash
  perceivers fit --config my-recipe.yaml                # your own file (start from --print_config)
  torchrun --standalone --nproc_per_node 2 $(which perceivers) fit --config digits
--config takes a YAML file or the name of a recipe shipped with perceivers:
  {{recipes}}
Run `perceivers <command> --help` for every option."""


def _usage() -> str:
    return USAGE.replace("{recipes}", ", ".join(list_recipes()))


class RecipeError(ValueError):
    """A ``--config`` value that is neither a file nor the name of a shipped recipe."""


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``perceivers fit --config NAME``), sorted."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of a shipped recipe (``"digits"`` or ``"digits.yaml"``); :class:`RecipeError` if unknown."""
    path = RECIPE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"--config {name}: no such file here ({Path.cwd()}) and no recipe of that name; the recipes shipped with "
            f"perceivers are {', '.join(list_recipes()) or '(none found in ' + str(RECIPE_DIR) + ')'}; "
            "give one of these names or the path of a YAML file"
        )
    return path


def resolve_config(value: str) -> str:
    """A config path as given, or a recipe name (``digits`` → ``<package>/recipes/digits.yaml``).

    A bare name that is neither an existing file nor a recipe raises :class:`RecipeError` listing the recipes;
    paths with a folder and inline YAML/JSON are returned unchanged (jsonargparse reports what is wrong with them).
    """
    if Path(value).is_file():
        return value
    if _RECIPE_NAME.fullmatch(value):
        return str(recipe_path(value))
    return value


def _with_configs(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        i += 1
    return out


def _has_config(argv: Sequence[str]) -> bool:
    return any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)


def _is_yaml_config(value: str) -> bool:
    value = value.strip()
    return not (value.startswith("{") or value.endswith(".json"))  # JSON: the inference command's overrides


def _wants_lightning(argv: Sequence[str]) -> bool:
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in LIGHTNING_FLAGS or arg.startswith(LIGHTNING_SECTIONS):
            return True
        if name in ("--config", "-c"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if _is_yaml_config(value):
                return True
    return False


def _run_lightning(command: str, args: list[str]) -> int:
    asks_help = any(a in ("-h", "--help") for a in args)
    try:
        if not _has_config(args) and not asks_help and command in TRAIN_COMMANDS:
            default = recipe_path(DEFAULT_CONFIG)
            print(f"perceivers {command}: no --config given, using the recipe {DEFAULT_CONFIG} ({default})",
                  file=sys.stderr)
            args = ["--config", str(default), *args]
        args = _with_configs(args)
    except RecipeError as err:
        print(f"perceivers {command}: error: {err}", file=sys.stderr)
        return 2
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .data.datasets import DataError
    from .train.cli import run_cli
    from .train.tasks import ConfigError

    try:
        run_cli([command, *args])
    except Exception as err:  # ours, and Lightning's for a trainer setting it refuses (e.g. devices=0)
        ours = _find_cause(err, (ConfigError, DataError, MisconfigurationException))
        if ours is None:
            raise
        print(f"perceivers {command}: error: {ours}", file=sys.stderr)
        return 2
    return 0


def _find_cause(err: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """``err`` or the first exception of ``types`` in its cause/context chain (jsonargparse wraps errors
    raised while instantiating classes in a ValueError whose cause is the original)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _run_command(module: str, command: str, args: list[str]) -> int:
    try:
        target = importlib.import_module(module)
    except ImportError as err:
        print(f"perceivers {command}: the command is not available ({module} failed to import: {err})", file=sys.stderr)
        return 2
    result = target.main(args)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``perceivers`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"perceivers {__version__}")
        return 0
    command, args = argv[0], argv[1:]
    if command in TRAIN_COMMANDS:
        return _run_lightning(command, args)
    if command == "predict":
        if _wants_lightning(args):
            return _run_lightning(command, args)
        return _run_command("perceivers.commands.predict", command, args)
    if command in ("convert", "export"):
        return _run_command(f"perceivers.commands.{command}", command, args)
    print(f"perceivers: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
