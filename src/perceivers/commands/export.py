"""``perceivers export OUTPUT``: write a model as an ONNX file or a ``torch.export`` program, checked.

The model comes from ``--checkpoint`` (a ``perceivers fit`` checkpoint, a perceivers or transformers
directory, a Hub repo id, a Haiku pickle or a state dict with ``--model``) or ``--model`` alone (random
weights). ``OUTPUT`` ending in ``.onnx`` is ONNX (``torch.onnx.export(dynamo=True)``, extra ``onnx``);
``.pt2`` is a ``torch.export`` program (``torch.export.load``; with ``--native`` it keeps perceivers' native CPU
kernels and needs ``import perceivers`` before loading). The batch is dynamic, and so are the
image size (Fourier-position image models) and the text length (language models) unless
``--static-size``; where the model fixes a size, the program keeps the traced one and says so. The
written file is run on inputs of two shapes and compared with the eager model (``--no-verify`` skips
that).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..layers.attention import fused_export, native_export
from ..layers.stream import onnx_export
from ._loading import add_model_arguments, load_model, parse_overrides

__all__ = ["ExportInputs", "build_parser", "example_inputs", "main"]

_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas (e.g. 1,3,224,224), got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be ≥ 1, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceivers export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("output", help="file to write: .onnx or .pt2")
    parser.add_argument("--input-shape", type=_shape, metavar="B,…",
                        help="shape of the example input (default: the model's own size; needed for the "
                             "perceiver-pytorch family, e.g. 1,224,224,3)")
    parser.add_argument("--static-size", action="store_true",
                        help="fix the image size / text length to the example's (the batch stays dynamic)")
    parser.add_argument("--native", action="store_true",
                        help=".pt2 only: keep perceivers' native CPU kernels (grid and fused attention, oneDNN products) "
                             "as operators; the program runs at eager speed and needs `import perceivers` to load")
    parser.add_argument("--no-verify", action="store_true", help="skip running the written file against the model")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    add_model_arguments(parser)
    return parser


Axes = dict[int, tuple[str, int, int | None]]  # axis -> (name, min, max)


class ExportInputs:
    """An example input of ``model`` (a tensor, or a mapping of tensors) and which of its axes may vary.

    ``batch_axes`` / ``size_axes``: ``{axis: (name, min, max)}`` for the batch and for the sizes the model
    follows (image height and width, text length); for a mapping, one such dict per key. ``size_oblivious``:
    trace under torch's ``backed_size_oblivious``, so that a size derived from a dynamic one (lucidrains' Perceiver
    AR: ``L - P`` logits) may be 1 without torch.export fixing the dynamic size.
    """

    def __init__(self, value: Tensor | dict[str, Tensor], batch_axes: Axes | dict[str, Axes],
                 size_axes: Axes | dict[str, Axes] | None = None, *, size_oblivious: bool = False) -> None:
        self.value, self.batch_axes, self.size_axes = value, batch_axes, size_axes or {}
        self.size_oblivious = size_oblivious

    def _per_tensor(self) -> list[tuple[str | None, Tensor, Axes, Axes]]:
        if isinstance(self.value, dict):
            return [(k, v, self.batch_axes.get(k, {}), self.size_axes.get(k, {})) for k, v in self.value.items()]
        return [(None, self.value, self.batch_axes, self.size_axes)]

    def dynamic_shapes(self, sizes: bool) -> tuple[Any]:
        """``torch.export``'s ``dynamic_shapes``: the batch, and the sizes if ``sizes``."""
        dims: dict[str, torch.export.Dim] = {}

        def dim(name: str, low: int, high: int | None) -> torch.export.Dim:
            return dims.setdefault(name, torch.export.Dim(name, min=low, max=high))

        specs = {key: {axis: dim(*entry) for axis, entry in {**batch, **(size if sizes else {})}.items()}
                 for key, _, batch, size in self._per_tensor()}
        return (specs if isinstance(self.value, dict) else specs[None],)

    @property
    def has_sizes(self) -> bool:
        """Whether any size (not only the batch) may vary."""
        return any(size for *_, size in self._per_tensor())

    @property
    def batch_size(self) -> int:
        return self._per_tensor()[0][1].shape[0]

    def resized(self, batch: int, scale: float) -> Tensor | dict[str, Tensor]:
        """An input of another batch and (scaled by ``scale`` where sizes vary) other sizes, random as the
        example."""
        gen = torch.Generator().manual_seed(batch)
        out = {}
        for key, value, _, size in self._per_tensor():
            shape = list(value.shape)
            shape[0] = batch
            for axis, (_, low, high) in size.items():
                shape[axis] = max(low, min(high or 1 << 30, round(shape[axis] * scale)))
            if value.dtype.is_floating_point:
                out[key] = torch.rand(shape, generator=gen, dtype=value.dtype) * 2 - 1
            else:
                out[key] = torch.randint(int(value.min()), int(value.max()) + 1, shape, generator=gen, dtype=value.dtype)
        return out if isinstance(self.value, dict) else out[None]


def example_inputs(model: nn.Module, input_shape: Sequence[int] | None = None) -> ExportInputs:
    """What ``perceivers export`` traces ``model`` with (see :class:`ExportInputs`).

    Registered task models take their sizes from their config, and the language models of the peer APIs
    (``PerceiverLM``, both Perceiver ARs) their longest text; ``Perceiver`` and other modules need
    ``input_shape``.
    """
    name = getattr(model, "model_name", None) or ""
    config = getattr(model, "config", None)
    gen = torch.Generator().manual_seed(0)
    batch = {0: ("batch", 1, None)}

    def floats(shape: Sequence[int]) -> Tensor:
        return torch.rand(tuple(shape), generator=gen) * 2 - 1

    if name.startswith("vision-perceiver"):
        shape = input_shape or (1, config.in_channels, *config.image_size)
        _check_shape(shape, 4, "[batch, channels, height, width]")
        low = 16 if name == "vision-perceiver-conv" else 1  # the conv stem's padding rules (torch asks for it)
        sizes = {} if name == "vision-perceiver-learned" else {2: ("height", low, 4096), 3: ("width", low, 4096)}
        return ExportInputs(floats(shape), batch, sizes)
    tokens = _token_input(model)
    if tokens is not None:
        shape = input_shape or (1, tokens.longest)
        _check_shape(shape, 2, "[batch, length]", lengths=(tokens.shortest, tokens.longest))
        ids = torch.randint(0, tokens.vocab, tuple(shape), generator=gen)
        return ExportInputs(ids, batch, {1: ("length", tokens.shortest, tokens.longest)},
                            size_oblivious=tokens.size_oblivious)
    if name == "optical-flow-perceiver":
        shape = input_shape or (1, 2, 3, *config.train_size)
        _check_shape(shape, 5, "[batch, 2, channels, height, width]")
        return ExportInputs(floats(shape), batch)
    if name == "multimodal-perceiver":
        if input_shape is not None:
            raise ValueError("--input-shape does not apply to the multimodal model (its sizes are fixed by its config)")
        inputs = {"audio": floats((1, config.num_audio_samples, 1)),
                  "image": floats((1, config.num_frames, config.in_channels, *config.image_size))}
        return ExportInputs(inputs, {k: batch for k in inputs})
    if input_shape is None:
        raise ValueError(f"{type(model).__name__} has no size of its own: pass --input-shape (e.g. 1,224,224,3 for a "
                         "Perceiver on RGB images, channels last)")
    sizes = {}
    if getattr(model, "fourier_encode_data", False):  # the Perceiver's axes carry Fourier positions: any size
        sizes = {axis: (f"axis{axis}", 1, 4096) for axis in range(1, len(input_shape) - 1)}
    return ExportInputs(floats(input_shape), batch, sizes)


class _Tokens(NamedTuple):
    """A language model's token input: its vocabulary, shortest and longest length, and whether to trace it under
    ``backed_size_oblivious`` (see :class:`ExportInputs`)."""

    vocab: int
    shortest: int
    longest: int
    size_oblivious: bool = False


def _token_input(model: nn.Module) -> _Tokens | None:
    """A language model's token input, or ``None`` for a model of other inputs."""
    from ..krasserm.text import MaskedLanguageModel, TextClassifier
    from ..models.perceiver_ar import CausalLanguageModel
    from ..models.perceiver_io import PerceiverLM
    from ..perceiver_ar_pytorch import PerceiverAR

    if (getattr(model, "model_name", None) or "").startswith("language-perceiver"):
        return _Tokens(model.config.vocab_size, 1, model.config.max_position_embeddings)
    if isinstance(model, PerceiverLM):
        return _Tokens(model.num_tokens, 1, model.max_seq_len)
    if isinstance(model, (MaskedLanguageModel, TextClassifier)):  # krasserm's: the MLM's logits cover its queries
        text = model.config.encoder
        longest = min(text.max_seq_len, getattr(model.config.decoder, "max_seq_len", text.max_seq_len))
        return _Tokens(text.vocab_size, 1, longest)
    if isinstance(model, CausalLanguageModel):  # the latents are the last num_latents positions
        return _Tokens(model.config.vocab_size, model.num_latents, model.max_seq_len)
    if isinstance(model, PerceiverAR):  # the logits cover the L - P positions after the prefix, down to one
        return _Tokens(model.num_tokens, model.cross_attn_seq_len + 1, model.max_seq_len, size_oblivious=True)
    return None


def _check_shape(shape: Sequence[int], rank: int, layout: str, *, lengths: tuple[int, int] | None = None) -> None:
    """``shape`` has ``rank`` sizes and, for a language model, a length (axis 1) within its ``lengths``
    (shortest, longest): the program would be traced at the clamped length (:meth:`ExportInputs.resized`)
    and the eager model refuse the example."""
    text = ",".join(map(str, shape))
    if len(shape) != rank:
        raise ValueError(f"--input-shape must be {layout} ({rank} sizes), got {text}")
    if lengths is not None and not lengths[0] <= shape[1] <= lengths[1]:
        raise ValueError(f"--input-shape {text}: the model takes {lengths[0]} to {lengths[1]} tokens")


class _Outputs(nn.Module):
    """The model with plain tensor outputs: ``logits`` of the task models' output dataclasses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        out = self.model(inputs)
        logits = getattr(out, "logits", None)
        return out if logits is None else logits


def export_program(model: nn.Module, inputs: ExportInputs, *, static_size: bool = False
                   ) -> tuple[torch.export.ExportedProgram, str, bool]:
    """``torch.export`` of ``model`` with the batch dynamic and, unless ``static_size``, the sizes; if the
    model fixes its sizes (or the batch), falls back to fewer dynamic axes. Returns the program, a line
    saying which axes are dynamic, and whether the sizes are."""
    wrapped = _Outputs(model).eval()
    # torch.export fixes any axis whose example size is 1: trace a batch of 2
    value = inputs.resized(2, 1.0) if inputs.batch_size == 1 else inputs.value
    attempts = [("batch and size", True), ("batch", False)] if inputs.has_sizes and not static_size else [
        ("batch", False)]
    errors = []
    try:
        for label, with_sizes in attempts:
            try:
                with _size_oblivious(inputs.size_oblivious and with_sizes):
                    program = torch.export.export(wrapped, (value,), dynamic_shapes=inputs.dynamic_shapes(with_sizes))
                return program, f"dynamic: {label}", with_sizes
            except RuntimeError as err:  # torch's constraint violations (UserError: a size the model fixes)
                errors.append(f"{label}: {str(err).splitlines()[0]}")
        program = torch.export.export(wrapped, (inputs.value,))  # the example's own shapes
    except (ValueError, TypeError) as err:  # the model's input checks: no fewer dynamic axes help
        raise ValueError(f"the model refuses an input of shape {_shapes(inputs.value)}: {err}") from None
    return program, "static shapes (" + "; ".join(errors) + ")", False


def _size_oblivious(enabled: bool) -> contextlib.AbstractContextManager:
    """torch's ``backed_size_oblivious`` (sizes of 1 are not asked about while tracing) if ``enabled`` and this
    torch has it."""
    from torch.fx.experimental import _config

    if enabled and hasattr(_config, "backed_size_oblivious"):
        return _config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _shapes(value: Tensor | dict[str, Tensor]) -> str:
    """The shapes of ``value``'s tensors, for messages (the traced ones read as s0, s1, …)."""
    return ", ".join(str(tuple(t.shape)) for t in torch.utils._pytree.tree_leaves(value))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    fmt = _FORMATS.get(output.suffix)
    try:
        if fmt is None:
            raise ValueError(f"{output}: the file name must end in .onnx (ONNX) or .pt2 (torch.export), "
                             f"got {output.suffix or 'no suffix'!r}")
        if output.is_dir():
            raise ValueError(f"{output} is a directory")
        if output.exists() and not args.force:
            raise ValueError(f"{output} exists (use --force)")
        if output.parent and not output.parent.is_dir():
            raise ValueError(f"{output.parent} is not a directory")
        model = load_model(args.model, args.checkpoint, parse_overrides(args.config), numerics=args.numerics, float32=True)
        inputs = example_inputs(model, args.input_shape)
        if fmt == "onnx":
            if args.native:
                raise ValueError("--native is for .pt2 programs: ONNX has no perceivers operators")
            try:
                import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
            except ImportError:
                raise ValueError("ONNX export needs the extra 'onnx' (pip install 'perceivers[onnx]')") from None
        # a .pt2 program keeps aten's fused CPU attention where the model streams its input (and with --native
        # perceivers' operators); ONNX has no such kernel, and gets a fixed-size stream as a loop (onnxruntime would
        # attend every unrolled chunk at once)
        tracing = onnx_export() if fmt == "onnx" else native_export() if args.native else fused_export()
        with torch.no_grad(), tracing:
            program, dynamic, sizes = export_program(model, inputs, static_size=args.static_size)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"perceivers export: error: {e}", file=sys.stderr)
        return 2
    _write(program, output, fmt)
    name = getattr(model, "model_name", None) or type(model).__name__
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {name} ({count:,} parameters) to {output} ({fmt}; {dynamic})")
    if args.no_verify:
        return 0
    if verify(model, output, fmt, inputs, sizes=sizes):
        return 0
    print(f"perceivers export: error: verification failed (above); {output} is kept as written", file=sys.stderr)
    return 1


def _write(program: torch.export.ExportedProgram, output: Path, fmt: str) -> None:
    from ..safe_files import atomic_path

    with atomic_path(output) as tmp:
        if fmt == "pt2":
            with open(tmp, "wb") as f:
                torch.export.save(program, f)
            return
        quiet = {name: logging.getLogger(name) for name in ("torch.onnx", "onnxscript")}
        levels = {name: log.level for name, log in quiet.items()}
        try:  # the exporter's progress and notes on operators it skips
            for log in quiet.values():
                log.setLevel(logging.ERROR)
            # without autograd: torch's conversion retraces a decoding scan (a dynamic query count) through scan's
            # autograd rule otherwise, which fails on the sizes it carries
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                onnx_program = torch.onnx.export(program, (), dynamo=True, external_data=False, verbose=False)
        finally:
            for name, log in quiet.items():
                log.setLevel(levels[name])
        onnx_program.save(str(tmp))


def verify(model: nn.Module, output: Path, fmt: str, inputs: ExportInputs, *, sizes: bool,
           rtol: float = 1e-4, atol: float = 1e-4) -> bool:
    """Run the written file on the example input and on one of another batch (and sizes, when they are
    dynamic); print the largest difference from the eager model; ``False`` if any exceeds the tolerance
    or the file or the eager model refuses the input."""
    run = _runner(output, fmt)
    ok = True
    other = "batch 3" + (", sizes ×0.75" if sizes else "")
    for label, value in (("example", inputs.value), (other, inputs.resized(3, 0.75 if sizes else 1.0))):
        shapes = _shapes(value)
        refused = "the model itself"
        try:
            with torch.no_grad():
                want = torch.utils._pytree.tree_leaves(_Outputs(model).eval()(value))
            refused = "the exported file"
            got = run(value)
        except Exception as err:  # noqa: BLE001 - any refusal (the model's checks, a program guard, onnxruntime's)
            print(f"  {label} {shapes}: {refused} refused it: {str(err).splitlines()[-1]}")
            ok = False
            continue
        if len(got) != len(want):
            raise RuntimeError(f"the exported file returned {len(got)} outputs, the model {len(want)}")
        diff = max((g - w).abs().max().item() for g, w in zip(got, want))
        close = all(torch.allclose(g, w, rtol=rtol, atol=atol) for g, w in zip(got, want))
        print(f"  {label} {shapes}: max |exported - eager| = {diff:.2e}" + ("" if close else "  <- too large"))
        ok &= close
    return ok


def _runner(output: Path, fmt: str):
    """A function running the written file on one input (a tensor or a mapping of tensors) → its outputs,
    flattened as ``torch.utils._pytree`` flattens the model's."""
    if fmt == "pt2":
        module = torch.export.load(output).module()

        def run(value: Any) -> list[Tensor]:
            with torch.no_grad():
                return torch.utils._pytree.tree_leaves(module(value))
        return run
    import onnxruntime as ort

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])

    def run(value: Any) -> list[Tensor]:
        leaves = torch.utils._pytree.tree_leaves(value)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), leaves)}
        return [torch.from_numpy(out) for out in session.run(None, feeds)]
    return run


if __name__ == "__main__":
    raise SystemExit(main())
