"""The ``perceivers`` command.

``fit | validate | test`` run LightningCLI (:mod:`perceivers.train.cli`); ``predict`` does too when it
gets Lightning options (``--config``, ``--ckpt_path``, ``--model.*``, ``--data.*``, ``--trainer.*``) and
otherwise runs the inference command :mod:`perceivers.commands.predict`; ``convert`` runs
:mod:`perceivers.commands.convert`. Everything heavy is imported only once a command is chosen, so
``perceivers --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "resolve_config"]

TRAIN_COMMANDS = ("fit", "validate", "test")
# `predict` options that mean Lightning; the inference command has its own --model NAME, --checkpoint
# PATH and --config JSON, so only the dotted forms and YAML configs count.
LIGHTNING_FLAGS = ("--ckpt_path", "--print_config", "--seed_everything", "--return_predictions")
LIGHTNING_SECTIONS = ("--model.", "--data.", "--trainer.", "--checkpoint.", "--plots.")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = "digits"

USAGE = f"""usage: perceivers <command> [options]

Train, evaluate and run the Perceiver family.

commands:
  fit         train (LightningCLI); without --config uses configs/{DEFAULT_CONFIG}.yaml
  validate    evaluate on the validation split (LightningCLI)
  test        evaluate on the test split (LightningCLI)
  predict     with --config/--ckpt_path/--model.*/--data.*/--trainer.*: Lightning prediction;
              otherwise the inference command (`perceivers predict --help`)
  convert     convert official / transformers / perceiver-pytorch checkpoints

Training options come from YAML recipes and dotted overrides:
  perceivers fit --config configs/cifar100-keras.yaml --data.root data/cifar-100-python
  perceivers fit --config digits --trainer.max_epochs 5 --print_config
  perceivers fit --config digits --resume true          # continue after a crash
  torchrun --standalone --nproc_per_node 2 $(which perceivers) fit --config digits
A bare recipe name (`digits`, `cifar100-keras`, ...) means {CONFIG_DIR}/<name>.yaml.
Run `perceivers <command> --help` for every option."""


def resolve_config(value: str) -> str:
    """A config path as given, or a recipe name from ``configs/`` (``digits`` → ``configs/digits.yaml``)."""
    path = Path(value)
    if path.exists():
        return value
    for candidate in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return value  # let jsonargparse report it


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
    if not _has_config(args) and not asks_help and command in TRAIN_COMMANDS:
        default = CONFIG_DIR / f"{DEFAULT_CONFIG}.yaml"
        if default.is_file():
            print(f"perceivers {command}: no --config given, using {default}", file=sys.stderr)
            args = ["--config", str(default), *args]
    from .data.datasets import DataError
    from .train.cli import run_cli
    from .train.tasks import ConfigError

    try:
        run_cli([command, *_with_configs(args)])
    except Exception as err:
        ours = _find_cause(err, (ConfigError, DataError))
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
        print(USAGE)
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
    if command == "convert":
        return _run_command("perceivers.commands.convert", command, args)
    print(f"perceivers: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
