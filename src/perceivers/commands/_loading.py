"""Building a model from ``--model`` / ``--checkpoint`` / ``--config`` for the commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["add_model_arguments", "load_model", "parse_overrides"]


def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoint: bool = True) -> None:
    """``--model``, ``--checkpoint`` (unless ``checkpoint=False``: the command takes it positionally),
    ``--config`` and ``--numerics``."""
    parser.add_argument("--model", help="registered model name (see perceivers.list_models()); needed for "
                        "Haiku pickles and bare state dicts, implied by perceivers/transformers directories")
    if checkpoint:
        parser.add_argument("--checkpoint", help="weights: a perceivers fit checkpoint (.ckpt), a Haiku pickle, a transformers or "
                            "perceivers directory, a Hub repo id, or a .safetensors/.pt state dict")
    parser.add_argument("--config", help="create_model overrides as JSON (inline or a .json file), for checkpoints "
                        "whose sizes differ from the official ones")
    parser.add_argument("--numerics", choices=("deepmind", "transformers"), default="deepmind",
                        help="for transformers checkpoints: compute as DeepMind (default) or reproduce transformers")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``--config``: inline JSON or a path to a JSON file → dict."""
    if not text:
        return {}
    path, start = Path(text), text.lstrip()[:1]
    inline = start in ("{", "[") or not path.exists()
    if not inline and not path.is_file():
        raise ValueError(f"--config {text!r} is a directory, not a JSON file")
    try:
        raw = text if inline else path.read_text(encoding="utf-8")
        value = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ValueError(f"--config file {text!r} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        if inline and start not in ("{", "[", '"'):
            raise FileNotFoundError(f"--config {text!r} is neither JSON nor an existing file") from e
        raise ValueError(f"--config must be a JSON object or a JSON file, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise TypeError(f"--config must be a JSON object, got {type(value).__name__}")
    return value


def load_model(
    model: str | None,
    checkpoint: str | None,
    overrides: dict[str, Any] | None = None,
    *,
    numerics: str = "deepmind",
    default_model: str | None = None,
    float32: bool = False,
) -> nn.Module:
    """The model the user asked for, in eval mode.

    perceivers / transformers directories and ``perceivers fit`` checkpoints build their own model
    (``--model`` must agree if given), in the checkpoint's dtype unless ``float32`` (the commands that compute
    on float32 inputs: predict, export);
    other checkpoints are loaded into ``create_model(model, **overrides)``. Without a checkpoint the
    weights are random (a warning is printed).
    """
    from ..hub import detect_format, fit_checkpoint_config, from_pretrained, load_checkpoint, resolve
    from ..tasks import create_model

    overrides = overrides or {}
    if checkpoint:
        path = resolve(checkpoint)
        fmt = detect_format(path)
        if fmt == "torch" and fit_checkpoint_config(path) is not None:
            fmt = "perceivers fit"
        if fmt in ("perceivers", "transformers", "perceivers fit"):
            if overrides:
                raise ValueError(f"--config does not apply to a {fmt} checkpoint (it carries its own config)")
            if fmt != "transformers":
                _deepmind_numerics_only(numerics, f"{checkpoint} is a {fmt} checkpoint, which carries its own numerics")
            options = {"numerics": numerics} if fmt == "transformers" else {}
            built = from_pretrained(path, **options)
            name = getattr(built, "model_name", None)
            if model is not None and name != model:
                raise ValueError(f"--model {model} but {checkpoint} holds {name or type(built).__name__}")
            return (built.float() if float32 else built).eval()
        name = model or default_model
        if name is None:
            raise ValueError(f"{checkpoint} is a {fmt} checkpoint without a config: pass --model")
        _deepmind_numerics_only(numerics, f"{checkpoint} holds bare {fmt} weights")
        built = create_model(name, **overrides)
        load_checkpoint(built, path)
        return built.eval()
    if model is None and default_model is not None:
        # Nothing chosen: the official weights of the model the inputs call for, from the Hub.
        from ..tasks.registry import model_entry

        pretrained = model_entry(default_model).pretrained
        if pretrained is not None and pretrained.hf_hub_id and not overrides:
            print(f"using {pretrained.hf_hub_id} (the official weights from the Hub; --checkpoint PATH for others, "
                  f"--model {default_model} alone for random weights)", file=sys.stderr)
            return load_model(None, pretrained.hf_hub_id, numerics=numerics, float32=float32)
    name = model or default_model
    if name is None:
        raise ValueError("pass --model and/or --checkpoint")
    _deepmind_numerics_only(numerics, "random weights take DeepMind's numerics")
    print(f"warning: no --checkpoint, {name} has random weights", file=sys.stderr)
    return create_model(name, **overrides).eval()


def _deepmind_numerics_only(numerics: str, source: str) -> None:
    """Refuse ``--numerics`` other than DeepMind's for a model that is not a transformers checkpoint (it would be
    ignored); ``source`` says what the model is."""
    if numerics != "deepmind":
        raise ValueError(f"--numerics {numerics} applies to transformers checkpoints (directories with their "
                         f"config.json); {source}")
