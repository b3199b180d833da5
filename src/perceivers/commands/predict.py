"""``perceivers predict``: run a model on an image, a masked text or a pair of frames.

- one image → the top-k classes (ImageNet names for 1000-class models);
- text (``--text`` or a ``.txt`` file) with ``[MASK]`` markers (one masked byte each) and/or
  ``--mask-span START:END`` (byte offsets, as the official colab's ``51:60``) → the text with the masked
  bytes filled by the model's most likely bytes;
- two images (frames) → optical flow rendered as a colour PNG (``--output``), tiled at the model's
  size for any image size.

The task follows the model (``--model`` or the checkpoint's own config); without either it follows
the inputs (one image: vision-perceiver-fourier, text: language-perceiver, two images:
optical-flow-perceiver).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._loading import add_model_arguments, load_model, parse_overrides

__all__ = ["build_parser", "main", "predict_flow", "predict_image", "predict_text"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


_TRAINED_RUN = """\
A trained run instead: with a YAML --config (a run's config.yaml or a recipe) or Lightning options
(--ckpt_path, --model.*, --data.*, --trainer.*), `perceivers predict` runs Lightning's Trainer.predict on the
data module's test split (validation when it has none):
  perceivers predict --config runs/digits/config.yaml --ckpt_path runs/digits/checkpoints/last.ckpt
`perceivers predict --config digits --help` lists those options."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceivers predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TRAINED_RUN)
    parser.add_argument("inputs", nargs="*", help="an image, a .txt file, or two frames")
    parser.add_argument("--text", help="text to fill (instead of a .txt file)")
    parser.add_argument("--mask-span", action="append", default=[], metavar="START:END",
                        help="mask bytes [START, END) of the UTF-8 text (repeatable)")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="wrap the text in [CLS] … [SEP] (transformers' layout; the official model sees none)")
    parser.add_argument("--top-k", type=_positive_int, default=5, help="classes to show (default 5)")
    parser.add_argument("--resample", choices=("tf", "pil", "torch"), default="tf",
                        help="bicubic kernel of the image resize (tf: the official pipeline)")
    parser.add_argument("--output", default="flow.png", help="flow PNG to write (default flow.png)")
    parser.add_argument("--save-flow", help="also save the raw flow [H, W, 2] as .npy")
    parser.add_argument("--min-overlap", type=int, default=20, help="flow tile overlap in pixels (default 20)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_arguments(parser)
    return parser


def _task_of(model: nn.Module) -> str:
    name = getattr(model, "model_name", "") or ""
    if name.startswith("vision-perceiver"):
        return "image"
    if name == "language-perceiver":
        return "text"
    if name == "optical-flow-perceiver":
        return "flow"
    raise ValueError(f"predict supports image classifiers, the masked LM and optical flow; got "
                     f"{name or type(model).__name__}")


def _default_model(args: argparse.Namespace) -> str | None:
    if args.text is not None or any(Path(p).suffix == ".txt" for p in args.inputs):
        return "language-perceiver"
    if len(args.inputs) == 2:
        return "optical-flow-perceiver"
    if len(args.inputs) == 1 and Path(args.inputs[0]).suffix.lower() in _IMAGE_SUFFIXES:
        return "vision-perceiver-fourier"
    return None


# ------------------------------------------------------------------------------------------------ image


def predict_image(model: nn.Module, image: Any, *, top_k: int = 5, resample: str = "tf") -> list[dict[str, Any]]:
    """Top-k ``[{"rank", "index", "label", "probability"}]`` for one image (path, PIL, array)."""
    from ..data import ImageNetEvalTransform, imagenet_class_names

    size = tuple(getattr(model.config, "image_size", (224, 224)))
    x = ImageNetEvalTransform(size=size, resample=resample)(image)[None]
    with torch.no_grad():
        logits = model(x.to(next(model.parameters()).device)).logits[0].float().cpu()
    probs = logits.softmax(-1)
    names = imagenet_class_names() if probs.numel() == 1000 else None
    top = probs.topk(min(top_k, probs.numel()))
    return [
        {"rank": r + 1, "index": int(i), "label": names[int(i)] if names else f"class {int(i)}", "probability": float(p)}
        for r, (p, i) in enumerate(zip(top.values, top.indices))
    ]


# ------------------------------------------------------------------------------------------------- text


def _parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError as e:
        raise ValueError(f"--mask-span must be START:END (byte offsets), got {text!r}") from e
    if not 0 <= start < end:
        raise ValueError(f"--mask-span needs 0 <= START < END, got {text!r}")
    return start, end


def predict_text(
    model: nn.Module,
    text: str,
    *,
    mask_spans: Sequence[tuple[int, int]] = (),
    add_special_tokens: bool = False,
) -> dict[str, Any]:
    """Fill the masked bytes of ``text`` (``[MASK]`` markers and byte ``mask_spans``) with the argmax bytes.

    Returns ``{"input", "output", "masked_positions", "predicted_ids"}``; ``output`` is the decoded
    sequence with the predictions in place (invalid UTF-8 shows as U+FFFD).
    """
    from ..data import ByteTokenizer

    max_len = model.config.max_position_embeddings
    tok = ByteTokenizer(max_len, add_special_tokens=add_special_tokens, parse_special_tokens=True)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    if len(ids) > max_len:
        raise ValueError(f"text is {len(ids)} tokens long; the model takes at most {max_len}")
    shift = 1 if add_special_tokens else 0
    for start, end in mask_spans:
        if end + shift > len(ids) - shift:
            raise ValueError(f"--mask-span {start}:{end} is past the end of the {len(ids) - 2 * shift}-byte text")
        ids[start + shift : end + shift] = tok.mask_id
    masked = (ids == tok.mask_id).nonzero().flatten()
    if masked.numel() == 0:
        raise ValueError("nothing to fill: put [MASK] markers in the text or pass --mask-span START:END")
    with torch.no_grad():
        logits = model(ids[None].to(next(model.parameters()).device),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0].cpu()
    predicted = logits[masked].argmax(-1)
    filled = ids.clone()
    filled[masked] = predicted
    return {"input": text, "output": tok.decode(filled), "masked_positions": masked.tolist(),
            "predicted_ids": predicted.tolist()}


# ------------------------------------------------------------------------------------------------- flow


def predict_flow(model: nn.Module, frame1: Any, frame2: Any, *, min_overlap: int = 20) -> torch.Tensor:
    """Flow ``[H, W, 2]`` in pixels from ``frame1`` to ``frame2`` (paths, PIL or arrays), tiled at the model size."""
    from ..data import load_image
    from ..data.flow import flow_model_fn, tile_flow

    f1, f2 = load_image(frame1), load_image(frame2)
    if f1.shape != f2.shape:
        raise ValueError(f"frames must have the same size, got {f1.shape[:2]} and {f2.shape[:2]}")
    return tile_flow(flow_model_fn(model), f1, f2, tile_size=tuple(model.config.train_size), min_overlap=min_overlap)


# ------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, args.checkpoint, parse_overrides(args.config), numerics=args.numerics, float32=True,
                           default_model=_default_model(args))
        task = _task_of(model)
        result = _run(task, model, args)
    except (ValueError, OSError, TypeError) as e:  # OSError: a missing, unreadable or unwritable path
        print(f"perceivers predict: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _print(task, result)
    return 0


# the options that only one task reads (a default value counts as not given)
_TASK_OPTIONS = {"text": ("--text", "--mask-span", "--add-special-tokens"), "image": ("--top-k", "--resample"),
                 "flow": ("--output", "--save-flow", "--min-overlap")}


def _check_options(task: str, args: argparse.Namespace) -> None:
    """Refuse options of another task (they would be silently ignored) and flow outputs that cannot be written."""
    parser = build_parser()
    for other, options in _TASK_OPTIONS.items():
        dests = {o: o[2:].replace("-", "_") for o in options}
        given = [o for o, d in dests.items() if other != task and getattr(args, d) != parser.get_default(d)]
        if given:
            raise ValueError(f"{', '.join(given)} apply to {other} models, not to this {task} model")
    if task == "text" and args.text is not None and args.inputs:
        raise ValueError("give the text with --text or as one .txt file, not both")
    if task == "flow":
        for option, path in (("--output", args.output), ("--save-flow", args.save_flow)):
            if path is not None and (Path(path).is_dir() or not Path(path).absolute().parent.is_dir()):
                raise ValueError(f"{option} {path}: cannot write a file there (a directory, or its folder does not "
                                 "exist)")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); the language model takes a "
                         ".txt file or --text") from e


def _run(task: str, model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    _check_options(task, args)
    if task == "image":
        if len(args.inputs) != 1:
            raise ValueError(f"an image classifier takes one image, got {len(args.inputs)} inputs")
        return {"task": task, "image": args.inputs[0],
                "top": predict_image(model, args.inputs[0], top_k=args.top_k, resample=args.resample)}
    if task == "text":
        if args.text is not None:
            text = args.text
        elif len(args.inputs) == 1:
            text = _read_text(args.inputs[0])
        else:
            raise ValueError("give the text with --text or as one .txt file")
        spans = [_parse_span(s) for s in args.mask_span]
        return {"task": task, **predict_text(model, text, mask_spans=spans, add_special_tokens=args.add_special_tokens)}
    if len(args.inputs) != 2:
        raise ValueError(f"optical flow takes two frames, got {len(args.inputs)} inputs")
    flow = predict_flow(model, args.inputs[0], args.inputs[1], min_overlap=args.min_overlap)
    from ..data import save_flow_png
    from ..safe_files import atomic_path

    raw_file = atomic_path(args.save_flow) if args.save_flow else contextlib.nullcontext()
    with atomic_path(args.output) as png, raw_file as raw:  # both files are written, or neither changes
        save_flow_png(flow, png)
        if raw is not None:
            import numpy as np

            with open(raw, "wb") as f:
                np.save(f, flow.numpy())
    magnitude = flow.norm(dim=-1)
    return {"task": task, "output": str(args.output), "height": flow.shape[0], "width": flow.shape[1],
            "mean_magnitude": float(magnitude.mean()), "max_magnitude": float(magnitude.max())}


def _print(task: str, result: dict[str, Any]) -> None:
    if task == "image":
        for row in result["top"]:
            print(f"{row['rank']}. {row['label']} (class {row['index']}): {row['probability']:.4f}")
    elif task == "text":
        print(result["output"])
    else:
        print(f"wrote {result['output']} ({result['width']}×{result['height']}); flow magnitude mean "
              f"{result['mean_magnitude']:.3f}, max {result['max_magnitude']:.3f} px")


if __name__ == "__main__":
    raise SystemExit(main())
