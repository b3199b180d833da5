"""``perceivers convert SRC DST``: rewrite a checkpoint in another format.

SRC may be a DeepMind Haiku pickle (``--model`` names the variant; ``--config`` gives non-official
sizes), a transformers directory or Hub repo id, a perceivers directory, or a bare
``.safetensors``/``.pt`` state dict (with ``--model``). DST is a directory written as ``--to
perceivers`` (our format: ``config.json`` + ``model.safetensors``, the default) or ``--to
transformers`` (loadable with transformers' ``PerceiverFor….from_pretrained``; only for sizes
transformers can express).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._loading import add_model_arguments, load_model, parse_overrides

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceivers convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (file, directory or Hub repo id)")
    parser.add_argument("dst", help="directory to write")
    parser.add_argument("--to", choices=("perceivers", "transformers"), default="perceivers",
                        help="output format (default perceivers)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty DST")
    add_model_arguments(parser, checkpoint=False)  # the checkpoint is SRC
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.numerics != "deepmind":
        # transformers' GELU and conv stem are run-time switches that no checkpoint format records
        print("perceivers convert: error: --numerics applies to predict; convert writes DeepMind numerics",
              file=sys.stderr)
        return 2
    dst = Path(args.dst)
    try:
        _check_destination(dst, force=args.force)
        model = load_model(args.model, args.src, parse_overrides(args.config), numerics=args.numerics)
        if args.to == "perceivers":
            from ..hub import save_pretrained

            save_pretrained(model, dst)
        else:
            from ..convert.transformers import save_transformers

            save_transformers(model, dst)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"perceivers convert: error: {e}", file=sys.stderr)
        return 2
    name = getattr(model, "model_name", type(model).__name__)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {name} ({count:,} parameters) to {dst} in {args.to} format")
    return 0


def _check_destination(dst: Path, *, force: bool) -> None:
    """Refuse a DST that is (or lies under) a file, and a non-empty DST without ``--force``, before any work."""
    from ..hub import _check_directory

    _check_directory(dst)
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ValueError(f"{dst} exists and is not empty (use --force)")


if __name__ == "__main__":
    raise SystemExit(main())
