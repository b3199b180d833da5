"""The main models compile without graph breaks and export (torch.export, ONNX) with equal outputs.

Small sizes; ``torch.compile`` with Inductor and ONNX export are the slow parts (marked ``slow``
where they take more than a few seconds here).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import perceivers

torch._dynamo.config.cache_size_limit = 64


class _Logits(nn.Module):
    """Returns a plain tensor (the ONNX comparison wants tensors; task models return output dataclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs)
        return out.logits if hasattr(out, "logits") else out


def _perceiver(chunk_size: int | None = None):
    torch.manual_seed(0)
    model = perceivers.Perceiver(num_freq_bands=4, depth=3, max_freq=10.0, num_latents=8, latent_dim=32,
                                 latent_heads=2, cross_dim_head=16, latent_dim_head=16, num_classes=5,
                                 weight_tie_layers=True, chunk_size=chunk_size)
    return model.eval(), (torch.randn(2, 10, 12, 3),)


def _perceiver_io(**decoder):
    torch.manual_seed(0)
    model = perceivers.PerceiverIO(dim=16, queries_dim=8, logits_dim=4, depth=2, num_latents=8, latent_dim=32,
                                   latent_heads=2, latent_dim_head=16, cross_dim_head=16, **decoder)

    class WithQueries(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.io = model

        def forward(self, data: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            return self.io(data, queries=queries)

    return WithQueries().eval(), (torch.randn(2, 40, 16), torch.randn(2, 6, 8))


def _vision():
    from perceivers.tasks.registry import model_entry

    torch.manual_seed(0)
    tiny = dict(model_entry("vision-perceiver-fourier").tiny)
    h, w = tiny["image_size"]
    model = perceivers.create_model("vision-perceiver-fourier", **tiny)
    return _Logits(model).eval(), (torch.randn(2, 3, h, w),)


def _perceiver_lm():
    torch.manual_seed(0)
    model = perceivers.PerceiverLM(num_tokens=50, dim=16, depth=2, max_seq_len=10, num_latents=4, latent_dim=16)
    return model.eval(), (torch.randint(0, 50, (2, 10)),)


def _language():
    torch.manual_seed(0)
    model = perceivers.create_model("language-perceiver", tiny=True)
    return _Logits(model).eval(), (torch.randint(0, 262, (2, 16)),)


MODELS = {
    "perceiver": _perceiver,
    "perceiver-streamed": lambda: _perceiver(chunk_size=60),
    "perceiver-io": _perceiver_io,
    "perceiver-io-deep-decoder": lambda: _perceiver_io(decoder_depth=2, decoder_self_attends=1, decoder_ff=True),
    "perceiver-lm": _perceiver_lm,  # token-range checks read values: skipped while tracing
    "vision-perceiver-fourier": _vision,
    "language-perceiver": _language,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_no_graph_breaks(name: str) -> None:
    model, args = MODELS[name]()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("amx", [None, True])
@pytest.mark.parametrize("name", ["perceiver", "language-perceiver"])
def test_no_graph_breaks_under_bfloat16_autocast(name: str, amx: bool | None, monkeypatch) -> None:
    """CPU bfloat16 autocast, in inference and training, on this processor (``None``: its flags are read from
    ``/proc/cpuinfo``, which Dynamo cannot trace, so the attention rules must not ask for them inside the compiled
    region) and with AMX's rules."""
    from perceivers import kernels

    if amx is not None:
        monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    model, args = MODELS[name]()
    for grad in (False, True):
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            explanation = torch._dynamo.explain(model)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", ["perceiver", "vision-perceiver-fourier"])
def test_compile_traces_once_for_every_image_size(name: str) -> None:
    """Under ``torch.compile(dynamic=True)`` the Fourier features follow the symbolic image size: one graph
    for every size (``torch.linspace`` would fix it: a recompile per size)."""
    from torch._dynamo.testing import CompileCounter

    model, _ = MODELS[name]()
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for h, w in ((10, 12), (16, 16), (20, 31), (40, 8)):
        shape = [2, h, w, 3] if name == "perceiver" else [2, 3, h, w]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_matches_eager(name: str) -> None:
    model, args = MODELS[name]()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_matches_eager(name: str) -> None:
    model, args = MODELS[name]()
    exported = torch.export.export(model, args)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args), model(*args), atol=1e-5, rtol=1e-5)


def _with_batch(args: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs repeated (or cut) to ``batch`` samples."""
    return tuple(a.repeat(-(-batch // a.shape[0]), *([1] * (a.dim() - 1)))[:batch] for a in args)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_with_a_dynamic_batch(name: str) -> None:
    """One program for every batch size: no size heuristic of perceivers' (e.g. when oneDNN's products pay
    off) leaves a guard on the batch in the exported program (they capped it at 63-511 samples)."""
    model, args = MODELS[name]()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, args, dynamic_shapes=tuple({0: batch} for _ in args))
    for size in (1, 3, 600):
        inputs = _with_batch(args, size)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["perceiver", "vision-perceiver-fourier"])
def test_torch_export_with_a_dynamic_image_size(name: str) -> None:
    """One program for every image size: the Fourier features are computed from the symbolic size (not a
    table fixed at the traced one), so other sizes and aspect ratios match eager, and the streaming rule
    leaves no guard on the size."""
    model, (image,) = MODELS[name]()
    h_axis = 1 if name == "perceiver" else 2  # [B, H, W, C] / [B, C, H, W]
    dims = {0: torch.export.Dim("batch"), h_axis: torch.export.Dim("h", max=1024),
            h_axis + 1: torch.export.Dim("w", max=1024)}
    exported = torch.export.export(model, (image,), dynamic_shapes=(dims,))
    # 200 x 190 pixels: above the size where eager mode streams (the program must not refuse it)
    for batch, h, w in ((1, 2, 7), (3, 17, 9), (2, 64, 33), (2, 200, 190)):
        shape = [batch, h, w, 3] if name == "perceiver" else [batch, 3, h, w]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_perceiver_io_with_dynamic_lengths() -> None:
    """Any number of inputs and of queries, up to where eager mode would start streaming them (65536 with
    autograd, as export traces; torch asks for that ``max``)."""
    model, args = MODELS["perceiver-io"]()
    batch = torch.export.Dim("batch")
    shapes = ({0: batch, 1: torch.export.Dim("n", max=65536)}, {0: batch, 1: torch.export.Dim("m", max=65536)})
    exported = torch.export.export(model, args, dynamic_shapes=shapes)
    for b, n, m in ((1, 1, 1), (3, 700, 50)):
        data, queries = torch.randn(b, n, 16), torch.randn(b, m, 8)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(data, queries), model(data, queries), atol=1e-5, rtol=1e-5)


def test_exported_grid_coordinates_match_linspace() -> None:
    """With a symbolic length ``axis_coordinates`` builds ``linspace(-1, 1, n)`` from ``arange``: the
    ends exact, every value within an ulp of torch.linspace's, a single point at -1 as linspace gives."""
    from perceivers.layers.position import axis_coordinates

    class Coordinates(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return axis_coordinates(x.shape[0], dtype=x.dtype)

    exported = torch.export.export(Coordinates(), (torch.zeros(5),),
                                   dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},))
    for n in (*range(1, 130), 224, 1000, 4096):
        got, want = exported.module()(torch.zeros(n)), torch.linspace(-1.0, 1.0, n)
        assert got.shape == want.shape and got[0] == -1 and (n == 1 or got[-1] == 1)
        torch.testing.assert_close(got, want, atol=1.2e-7, rtol=0)


def test_torch_export_language_with_dynamic_batch_and_length() -> None:
    """Text of any length up to the position table's: the fold's cost model takes a symbolic length as
    "many" instead of guarding on it."""
    model, (ids,) = MODELS["language-perceiver"]()
    shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=ids.shape[1])},)
    exported = torch.export.export(model, (ids[:, :12].contiguous(),), dynamic_shapes=shapes)
    for batch, length in ((1, 1), (3, 5), (2, 16)):
        inputs = torch.randint(0, 262, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def _attention_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if "attention" in str(node.target)}


def test_fused_export_keeps_the_fused_kernel_in_streamed_attention() -> None:
    """Inside ``fused_export`` a streamed model's program attends each chunk with aten's fused CPU kernel (no score
    matrix), with a dynamic batch and a key mask, and equals eager mode; outside it the program is portable."""
    from perceivers.layers.attention import fused_export

    model, (x,) = _perceiver(chunk_size=60)  # 120 pixels: two chunks
    mask = torch.rand(2, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    batch = {0: torch.export.Dim("batch")}
    with torch.no_grad():
        with fused_export():
            program = torch.export.export(model, (x, mask), dynamic_shapes=(batch, batch))
        portable = torch.export.export(model, (x, mask))
        fused_op = "aten._scaled_dot_product_flash_attention_for_cpu.default"
        assert fused_op in _attention_ops(program) and fused_op not in _attention_ops(portable)
        for rows in ([0, 1], [1, 0, 1]):
            torch.testing.assert_close(program.module()(x[rows], mask[rows]), model(x[rows], mask[rows]),
                                       atol=1e-5, rtol=1e-5)


def _all_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The operators a program calls, in its submodules too (autocast regions are higher-order calls)."""
    return {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function"}


_RUN_PROGRAM = """
import sys, torch, perceivers
program = torch.export.load(sys.argv[1]).module()
cases = torch.load(sys.argv[2])
with torch.no_grad():
    for x, want in cases:
        torch.testing.assert_close(program(x), want, atol=1e-5, rtol=1e-5)
print("ok", len(cases))
"""


@pytest.mark.parametrize("name", ["perceiver", "vision-perceiver-fourier"])
def test_native_export_keeps_the_native_kernels_with_a_dynamic_size(name: str, tmp_path) -> None:
    """Inside ``native_export`` a program with a dynamic batch and image size calls perceivers' operators (the grid
    kernel for the whole image, no ``while_loop``; the fused attention kernel where the processor has it; oneDNN's
    products where they serve) and equals eager mode at other sizes; saved and loaded in a fresh process with the
    kernels off, the operators compute the same in PyTorch operations. Outside it the program has none of them."""
    import subprocess
    import sys

    from perceivers.commands.export import example_inputs, export_program
    from perceivers.layers import fused_export, grid_attention, native_attention, native_export, use_onednn

    model, (image,) = MODELS[name]()
    inputs = example_inputs(getattr(model, "model", model), tuple(image.shape))  # the task model, not its _Logits
    onednn = torch.backends.mkldnn.is_available()
    with torch.no_grad(), native_export(), use_onednn(onednn):
        program, dynamic, _ = export_program(model, inputs)
    assert dynamic == "dynamic: batch and size"
    ops = _all_ops(program)
    assert ("perceivers.grid_attention.default" in ops) == grid_attention.available()
    assert ("perceivers.native_attention.default" in ops) == native_attention.available()
    assert ("perceivers.onednn_linear.default" in ops) == onednn
    assert not any("while_loop" in op for op in ops)
    cases = []
    for batch, h, w in ((1, 7, 9), (3, 17, 12), (2, 40, 33)):
        shape = [batch, h, w, 3] if name == "perceiver" else [batch, 3, h, w]
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
        cases.append((x, want))
    torch.export.save(program, tmp_path / "native.pt2")
    torch.save(cases, tmp_path / "cases.pt")
    run = subprocess.run([sys.executable, "-c", _RUN_PROGRAM, str(tmp_path / "native.pt2"), str(tmp_path / "cases.pt")],
                         check=False, env={**os.environ, "PERCEIVERS_NATIVE": "0"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok 3" in run.stdout, run.stderr[-3000:]
    with torch.no_grad(), fused_export(), use_onednn(onednn):
        portable = torch.export.export(model, (image,))
    assert not any(op.startswith("perceivers.") for op in _all_ops(portable))


def test_native_export_takes_a_video_grid_with_dynamic_sizes() -> None:
    """A video's frames and rows are the grid's rows: with the batch, frame count and frame size dynamic, the program
    attends it in the grid kernel (no loop) and equals eager mode."""
    from perceivers.commands.export import example_inputs, export_program
    from perceivers.layers import grid_attention, native_export

    torch.manual_seed(0)
    model = perceivers.Perceiver(input_channels=3, input_axis=3, num_freq_bands=4, max_freq=10.0, depth=1,
                                 num_latents=16, latent_dim=32, cross_dim_head=16, latent_dim_head=16,
                                 num_classes=5).eval()
    with torch.no_grad(), native_export():
        program, dynamic, _ = export_program(model, example_inputs(model, (2, 4, 20, 18, 3)))
    ops = _all_ops(program)
    assert dynamic == "dynamic: batch and size" and not any("while_loop" in op for op in ops)
    assert ("perceivers.grid_attention.default" in ops) == grid_attention.available()
    for shape in ((1, 3, 11, 9, 3), (3, 5, 33, 20, 3)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_ignores_fused_export(tmp_path) -> None:
    """ONNX has no fused kernel: ``torch.onnx.export`` inside the context still gives a correct file."""
    from perceivers.layers.attention import fused_export

    model, args = _perceiver(chunk_size=60)
    with fused_export():
        session = _onnx_session(model, args, tmp_path / "streamed.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: args[0].numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(*args), atol=1e-5, rtol=1e-4)


def _onnx_session(model: nn.Module, args: tuple, path, dynamic_shapes=None):
    """``model`` exported to ONNX at ``path`` (``dynamo=True``), opened in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["perceiver", "perceiver-io", "vision-perceiver-fourier"])
def test_onnx_matches_onnxruntime(name: str, tmp_path) -> None:
    model, args = MODELS[name]()
    session = _onnx_session(model, args, tmp_path / f"{name}.onnx")
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = model(*args)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_onnx_with_a_dynamic_image_size(tmp_path) -> None:
    model, args = MODELS["vision-perceiver-fourier"]()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", max=512), 3: torch.export.Dim("w", max=512)}
    session = _onnx_session(model, args, tmp_path / "vision.onnx", (dims,))
    for batch, h, w in ((1, 7, 9), (3, 40, 23), (1, 128, 128)):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_onnx_with_a_dynamic_batch(tmp_path) -> None:
    model, args = MODELS["language-perceiver"]()
    session = _onnx_session(model, args, tmp_path / "language.onnx", ({0: torch.export.Dim("batch")},))
    for size in (1, 200):
        inputs = _with_batch(args, size)
        (got,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_dynamic_size_export_streams_in_a_while_loop(chunk_size: int | None) -> None:
    """With a dynamic image size the Perceiver's program attends its input in a ``torch.while_loop`` over chunks
    (gathered rows: pixels and their Fourier features), as eager mode streams, instead of the whole input at
    once; with a key mask (one sample without any key), several chunks and a partial last one, it equals eager."""
    model, (x,) = _perceiver(chunk_size=chunk_size)
    mask = torch.rand(2, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("h", max=512), 2: torch.export.Dim("w", max=512)}
    with torch.no_grad():
        program = torch.export.export(model, (x, mask), dynamic_shapes=(dims, dims))
    assert "while_loop" in {str(node.target) for node in program.graph.nodes}
    gen = torch.Generator().manual_seed(1)
    for batch, h, w in ((1, 2, 3), (3, 7, 9), (2, 17, 31)):  # 17·31 = 527 pixels: 33 chunks of 16, the last of 15
        x, mask = torch.randn(batch, h, w, 3, generator=gen), torch.rand(batch, h, w, generator=gen) > 0.3
        mask[-1] = False
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def test_dynamic_size_export_attends_whole_with_chunk_size_0() -> None:
    model, args = _perceiver(chunk_size=0)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("h", max=512), 2: torch.export.Dim("w", max=512)}
    with torch.no_grad():
        program = torch.export.export(model, args, dynamic_shapes=(dims,))
    assert "while_loop" not in {str(node.target) for node in program.graph.nodes}


@pytest.mark.slow
def test_onnx_streams_a_dynamic_image_size(tmp_path) -> None:
    """The while_loop becomes an ONNX ``Loop``: onnxruntime runs sizes of one and of many chunks."""
    model, args = _perceiver(chunk_size=16)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("h", max=512), 2: torch.export.Dim("w", max=512)}
    session = _onnx_session(model, args, tmp_path / "looped.onnx", (dims,))
    for batch, h, w in ((1, 2, 3), (3, 17, 31)):
        x = torch.randn(batch, h, w, 3, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-4)


def _has_while_loop(program: torch.export.ExportedProgram) -> bool:
    return "while_loop" in {str(node.target) for node in program.graph.nodes}


def _loops(program: torch.export.ExportedProgram, kinds: tuple[str, ...] = ("while_loop", "scan")) -> int:
    """The program's loops: ``torch.while_loop`` (streams, in-place decoding) and ``scan`` (portable decoding)."""
    return sum(str(node.target).endswith(kinds) for node in program.graph.nodes)


def _export(model: nn.Module, args: tuple, dims: tuple, fused: bool = False) -> torch.export.ExportedProgram:
    import contextlib

    from perceivers.layers.attention import fused_export

    with torch.no_grad(), (fused_export() if fused else contextlib.nullcontext()):
        return torch.export.export(model, args, dynamic_shapes=dims)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_dynamic_length_export_loops_over_per_sample_coordinates(chunk_size: int | None) -> None:
    """``Perceiver(data, pos=...)`` with a dynamic number of points: the program gathers the points and encodes
    their coordinates chunk by chunk in a ``torch.while_loop`` (it attended them whole: matmul's reshape inside the
    loop left the guard ``1 % min(16, n) != 0``), for one point as for many."""
    model, _ = _perceiver(chunk_size=chunk_size)

    class WithPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, data: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return self.model(data, pos=pos)

    wrapped = WithPositions().eval()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("n", max=100000)}
    with torch.no_grad():
        program = torch.export.export(wrapped, (torch.randn(2, 40, 3), torch.rand(2, 40, 2) * 2 - 1),
                                      dynamic_shapes=(dims, dims))
    assert _has_while_loop(program)
    gen = torch.Generator().manual_seed(2)
    for batch, n in ((1, 1), (3, 5), (2, 527)):  # 527 points: 33 chunks of 16
        data, pos = torch.randn(batch, n, 3, generator=gen), torch.rand(batch, n, 2, generator=gen) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(program.module()(data, pos), wrapped(data, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_dynamic_size_export_with_a_grid_mask_takes_one_pixel_wide_images(chunk_size: int | None) -> None:
    """A ``[B, H, W]`` mask left the guard ``H != H·W`` (check_mask compared the mask's axes with ``(H·W,)``
    first), so a program refused images one pixel wide."""
    model, (x,) = _perceiver(chunk_size=chunk_size)
    mask = torch.rand(2, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("h", max=512), 2: torch.export.Dim("w", max=512)}
    with torch.no_grad():
        program = torch.export.export(model, (x, mask), dynamic_shapes=(dims, dims))
    gen = torch.Generator().manual_seed(3)
    for batch, h, w in ((1, 5, 1), (2, 1, 7), (1, 1, 1), (2, 33, 1)):
        x, mask = torch.randn(batch, h, w, 3, generator=gen), torch.rand(batch, h, w, generator=gen) > 0.3
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def _image_encoder(prep: str = "pixels", pos: str = "fourier", *, s: int = 1, mode: str = "concat",
                   project: int = -1, linear: bool = False, grid: tuple[int, ...] = (8, 6)) -> nn.Module:
    """DeepMind's ImagePreprocessor streaming its tokens (chunks of 16) into a PerceiverEncoder → latents (a video's
    with a 3-D ``grid``)."""
    from perceivers.io import PerceiverEncoder, build_position_encoding
    from perceivers.io.processors import ImagePreprocessor

    torch.manual_seed(0)
    enc = build_position_encoding(pos, num_dims=len(grid), index_shape=grid, num_bands=3, project_pos_dim=project)
    pre = ImagePreprocessor(prep, position_encoding=enc, spatial_downsample=s, num_channels=6,
                            conv_after_patching=linear, concat_or_add_pos=mode)
    encoder = PerceiverEncoder(pre.num_channels, num_latents=5, latent_channels=16, num_blocks=1,
                               num_self_attends_per_block=1, num_self_attention_heads=2)

    class Streamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.encoder = pre, encoder

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.encoder(self.pre(images, chunk_size=16).inputs)

    return Streamed().eval()


IMAGE_STREAMS = {
    "pixels-fourier": {},
    "patches-none": {"prep": "patches", "s": 2, "pos": "none"},
    "conv1x1-stride2-projected": {"prep": "conv1x1", "s": 2, "project": 5},
    "patches-linear-add": {"prep": "patches", "s": 2, "linear": True, "mode": "add", "project": 6},
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", list(IMAGE_STREAMS))
def test_dynamic_size_export_streams_image_tokens_in_a_while_loop(case: str, fused: bool) -> None:
    """An ImagePreprocessor's stream with a symbolic image size gives its tokens by position (pixels or patches,
    their 1×1 conv or Linear, Fourier features gathered from per-axis tables, projected, concatenated or added),
    which the encoder's cross-attention gathers in a ``torch.while_loop``; the program equals the whole token
    array's encoder, inside ``fused_export`` too, for images one token tall or wide (a stride-2 stream's position
    tables of ``⌈H / 2⌉`` rows had left the guard ``⌈H / 2⌉ ≠ 1``)."""
    import contextlib

    from perceivers.layers.attention import fused_export

    model = _image_encoder(**IMAGE_STREAMS[case])
    s = IMAGE_STREAMS[case].get("s", 1)
    dims = {0: torch.export.Dim("batch"), 2: s * torch.export.Dim("h", max=512), 3: s * torch.export.Dim("w", max=512)}
    with torch.no_grad(), (fused_export() if fused else contextlib.nullcontext()):
        program = torch.export.export(model, (torch.randn(2, 3, 8 * s, 6 * s),), dynamic_shapes=(dims,))
    assert _has_while_loop(program)
    gen = torch.Generator().manual_seed(4)
    for batch, h, w in ((1, 2, 3), (3, 17, 31), (2, 5, 2), (1, 1, 3), (2, 4, 1), (1, 1, 1)):  # 17·31: 33 chunks
        x = torch.randn(batch, 3, h * s, w * s, generator=gen)
        with torch.no_grad():
            whole = model.encoder(model.pre(x).inputs)
            torch.testing.assert_close(program.module()(x), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", ["pixels-fourier", "conv1x1-stride2-projected", "patches-linear-add"])
def test_dynamic_size_export_streams_video_tokens_in_a_while_loop(case: str, fused: bool) -> None:
    """A video of a dynamic size (frames, height, width): the stream gives its tokens by position (each from its own
    frame's pixels, 3-D positions from per-axis tables), gathered in a ``torch.while_loop``; eager mode streams it
    frame after frame. The program equals the whole token array's encoder."""
    model = _image_encoder(**IMAGE_STREAMS[case], grid=(3, 8, 6))
    s = IMAGE_STREAMS[case].get("s", 1)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("t", max=64), 3: s * torch.export.Dim("h", max=512),
            4: s * torch.export.Dim("w", max=512)}
    program = _export(model, (torch.randn(2, 3, 3, 8 * s, 6 * s),), (dims,), fused)
    assert _loops(program) == 1
    gen = torch.Generator().manual_seed(8)
    one = 2 if IMAGE_STREAMS[case].get("prep") == "patches" else 1  # patches of one frame drop the time axis (flow)
    for batch, t, h, w in ((1, one, 2, 3), (2, 3, 5, 7), (1, 2, 17, 31), (1, one, 1, 4), (2, 2, 3, 1)):  # 66 chunks
        x = torch.randn(batch, t, 3, h * s, w * s, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model.encoder(model.pre(x).inputs), atol=1e-5, rtol=1e-5)


def test_dynamic_size_export_of_a_vision_model_streams_in_a_while_loop() -> None:
    model, (x,) = MODELS["vision-perceiver-fourier"]()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", max=1024), 3: torch.export.Dim("w", max=1024)}
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    assert _has_while_loop(program)
    for batch, h, w in ((1, 1, 1), (3, 17, 9), (2, 200, 190)):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_streams_image_tokens_of_a_dynamic_size(tmp_path) -> None:
    """The image stream's while_loop becomes an ONNX ``Loop`` that onnxruntime runs (patches and a conv 1×1 stem
    with projected Fourier features; a video's patches)."""
    for case in ("pixels-fourier", "conv1x1-stride2-projected"):
        model = _image_encoder(**IMAGE_STREAMS[case])
        s = IMAGE_STREAMS[case].get("s", 1)
        dims = {0: torch.export.Dim("batch"), 2: s * torch.export.Dim("h", max=512),
                3: s * torch.export.Dim("w", max=512)}
        with torch.no_grad():
            session = _onnx_session(model, (torch.randn(2, 3, 8 * s, 6 * s),), tmp_path / f"{case}.onnx", (dims,))
        for batch, h, w in ((1, 2, 3), (3, 17, 31), (1, 1, 5)):  # one token tall
            x = torch.randn(batch, 3, h * s, w * s, generator=torch.Generator().manual_seed(h))
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(got), model.encoder(model.pre(x).inputs),
                                           atol=1e-5, rtol=1e-4)
    model = _image_encoder(**IMAGE_STREAMS["patches-linear-add"], grid=(3, 8, 6))  # a video of a dynamic size
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("t", max=64), 3: 2 * torch.export.Dim("h", max=512),
            4: 2 * torch.export.Dim("w", max=512)}
    with torch.no_grad():
        session = _onnx_session(model, (torch.randn(2, 3, 3, 16, 12),), tmp_path / "video.onnx", (dims,))
    for batch, t, h, w in ((1, 2, 2, 3), (2, 3, 17, 31), (1, 2, 3, 1)):
        x = torch.randn(batch, t, 3, 2 * h, 2 * w, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model.encoder(model.pre(x).inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_dynamic_query_count_export_decodes_in_a_loop(fused: bool) -> None:
    """PerceiverIO with a dynamic number of queries decodes them in a loop over chunks (a ``scan``), as eager mode
    decodes large query sets (it decoded them whole: all of their attention at once), for one query as for many
    chunks, a partial last chunk too; inside ``fused_export`` each chunk is written into one output in
    ``torch.while_loop``s. A dynamic number of inputs is attended in a loop too."""
    model, (data, queries) = _perceiver_io(decode_chunk_size=16, chunk_size=16)
    batch = torch.export.Dim("batch")
    dims = ({0: batch, 1: torch.export.Dim("n", max=10**6)}, {0: batch, 1: torch.export.Dim("m", max=10**6)})
    program = _export(model, (data, queries), dims, fused)
    # the inputs' loop, the queries' (a scan; in place, while_loops: the first chunk's write is a loop of its own)
    assert _loops(program) == (3 if fused else 2)
    assert _loops(program, ("scan",)) == (0 if fused else 1)
    gen = torch.Generator().manual_seed(5)
    for b, n, m in ((1, 1, 1), (2, 3, 2), (3, 40, 16), (2, 7, 17), (1, 700, 50)):
        data, queries = torch.randn(b, n, 16, generator=gen), torch.randn(b, m, 8, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(data, queries), model(data, queries), atol=1e-5, rtol=1e-5)


def test_dynamic_query_count_export_decodes_wide_outputs_whole_unless_written_in_place() -> None:
    """Logits as wide as the decoder's intermediates: a portable loop (the scan holds the output twice: its stacked
    steps, then the rows in order) would hold more than the whole query set's decoding, so only ``fused_export``'s
    program, which writes each chunk in place, loops."""
    torch.manual_seed(0)
    wide = perceivers.PerceiverIO(dim=16, queries_dim=8, logits_dim=64, depth=1, num_latents=8, latent_dim=32,
                                  latent_heads=2, latent_dim_head=16, cross_dim_head=16, decode_chunk_size=16)

    class WithQueries(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.io = wide

        def forward(self, data: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            return self.io(data, queries=queries)

    model, args = WithQueries().eval(), (torch.randn(2, 40, 16), torch.randn(2, 6, 8))
    batch = torch.export.Dim("batch")
    dims = ({0: batch}, {0: batch, 1: torch.export.Dim("m", max=10**6)})
    assert _loops(_export(model, args, dims)) == 0
    program = _export(model, args, dims, fused=True)
    assert _loops(program) == 2  # the first chunk's write, then the others
    data, queries = torch.randn(2, 40, 16), torch.randn(2, 37, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(data, queries), model(data, queries), atol=1e-5, rtol=1e-5)


def _subsampled_decoder(kind: str) -> nn.Module:
    """A PerceiverIOModel decoding Fourier (8×9 grid) or trainable queries at a number of subsampled points, masked,
    in chunks of 16 through a row-wise postprocessor (``[B, Q, 3]``)."""
    from perceivers.io import (
        BasicDecoder,
        FourierQueries,
        PerceiverEncoder,
        PerceiverIOModel,
        TrainableQueries,
    )
    from perceivers.io.processors import ProjectionPostprocessor

    torch.manual_seed(0)
    encoder = PerceiverEncoder(6, num_latents=5, latent_channels=16, num_blocks=1, num_self_attends_per_block=1,
                               num_self_attention_heads=2)
    queries = FourierQueries((8, 9), 3) if kind == "fourier" else TrainableQueries(72, 10)
    decoder = BasicDecoder(queries, latent_channels=16, output_channels=8, num_heads=2)
    decoder.chunk_size = 16
    model = PerceiverIOModel(encoder, decoder, output_postprocessor=ProjectionPostprocessor(8, 3))

    class AtPoints(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(x, subsampled_output_points=points, query_mask=mask).logits

    return AtPoints().eval()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["fourier", "trainable"])
def test_dynamic_point_count_export_decodes_queries_by_position(kind: str, fused: bool) -> None:
    """A dynamic number of subsampled output points: the program builds each chunk's queries from those points only
    (Fourier features of their coordinates, rows of the trainable table) and decodes them in a ``torch.while_loop``
    through the row-wise postprocessor; masked queries as eager mode."""
    model = _subsampled_decoder(kind)
    batch, q = torch.export.Dim("batch"), torch.export.Dim("q", max=72)
    program = _export(model, (torch.randn(2, 7, 6), torch.arange(40), torch.ones(2, 40, dtype=torch.bool)),
                      ({0: batch}, {0: q}, {0: batch, 1: q}), fused)
    assert _loops(program) == (2 if fused else 1)
    gen = torch.Generator().manual_seed(6)
    for b, n in ((1, 1), (3, 5), (2, 16), (2, 17), (1, 72)):
        x, points = torch.randn(b, 7, 6, generator=gen), torch.randperm(72, generator=gen)[:n]
        mask = torch.rand(b, n, generator=gen) > 0.3
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, points, mask), model(x, points, mask), atol=1e-5, rtol=1e-5)


def _image_queries() -> nn.Module:
    """Pixels with Fourier features, streamed into the encoder and decoded as one query each (``InputQueries``, as
    optical flow), chunks of 16 → ``[B, H·W, 2]``."""
    from perceivers.io import (
        BasicDecoder,
        InputQueries,
        PerceiverEncoder,
        PerceiverIOModel,
        build_position_encoding,
    )
    from perceivers.io.processors import ImagePreprocessor

    torch.manual_seed(0)
    pre = ImagePreprocessor("pixels", position_encoding=build_position_encoding(
        "fourier", num_dims=2, index_shape=(8, 6), num_bands=3), spatial_downsample=1)
    encoder = PerceiverEncoder(pre.num_channels, num_latents=5, latent_channels=16, num_blocks=1,
                               num_self_attends_per_block=1, num_self_attention_heads=2)
    decoder = BasicDecoder(InputQueries(pre.num_channels), latent_channels=16, output_channels=2)
    decoder.chunk_size = 16
    return _Logits(PerceiverIOModel(encoder, decoder, input_preprocessor=pre, chunk_size=16)).eval()


def test_dynamic_size_export_decodes_image_token_queries_in_a_while_loop() -> None:
    """Queries made of the streamed image tokens (one per pixel): with a dynamic size the program gathers each
    chunk's tokens by position for the decoder as for the encoder, two while_loops; no token array is built."""
    model = _image_queries()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", max=512), 3: torch.export.Dim("w", max=512)}
    program = _export(model, (torch.randn(2, 3, 8, 6),), (dims,))
    assert _loops(program) == 2
    gen = torch.Generator().manual_seed(7)
    for b, h, w in ((1, 1, 1), (3, 17, 31), (2, 5, 2)):
        x = torch.randn(b, 3, h, w, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def _flow_queries() -> nn.Module:
    """Optical flow's preprocessor (frame pairs ``[B, 2, 3 or 27, H, W]``) streamed into the encoder, its tokens
    decoded as one query each by a ``BasicDecoder`` (chunks of 16) → ``[B, H·W, 2]``."""
    from perceivers.io import BasicDecoder, InputQueries, PerceiverEncoder, PerceiverIOModel
    from perceivers.io.processors import FlowPreprocessor

    torch.manual_seed(0)
    pre = FlowPreprocessor(image_size=(6, 8), num_bands=3, num_channels=8)
    encoder = PerceiverEncoder(pre.num_channels, num_latents=5, latent_channels=16, num_blocks=1,
                               num_self_attends_per_block=1, num_self_attention_heads=2)
    decoder = BasicDecoder(InputQueries(pre.num_channels), latent_channels=16, output_channels=2)
    decoder.chunk_size = 16
    return _Logits(PerceiverIOModel(encoder, decoder, input_preprocessor=pre, chunk_size=16)).eval()


FLOW_DIMS = {0: torch.export.Dim("batch"), 3: torch.export.Dim("h", max=512), 4: torch.export.Dim("w", max=512)}


@pytest.mark.parametrize("channels", [3, 27])
def test_dynamic_size_export_of_flow_streams_frames_and_decodes_pixel_queries_in_loops(channels: int) -> None:
    """Optical flow's preprocessor (frame pairs, raw or as 3×3 patches) with a dynamic size: the tokens are gathered by
    position (a raw token's 3×3 neighbourhood of both frames, zeros beyond the border) for the encoder and for the
    pixel queries of a ``BasicDecoder``, two while_loops; one pixel as many (the gathered tokens' Linear had left the
    guard ``B·min(16, H·W) ≠ B``)."""
    model = _flow_queries()
    program = _export(model, (torch.randn(2, 2, channels, 6, 8),), (FLOW_DIMS,))
    assert _loops(program) == 2
    gen = torch.Generator().manual_seed(9)
    for b, h, w in ((1, 1, 1), (2, 5, 7), (1, 17, 31)):
        x = torch.randn(b, 2, channels, h, w, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_dynamic_query_count_export_decodes_whole_with_chunk_size_0() -> None:
    model = _subsampled_decoder("fourier")
    model.model.decoder.chunk_size = 0
    q = torch.export.Dim("q", max=72)
    program = _export(model, (torch.randn(2, 7, 6), torch.arange(40), torch.ones(2, 40, dtype=torch.bool)),
                      ({0: torch.export.Dim("batch")}, {0: q}, {0: torch.export.Dim("batch"), 1: q}))
    assert _loops(program) == 0


@pytest.mark.slow
def test_onnx_decodes_a_dynamic_query_count_in_a_loop(tmp_path) -> None:
    """The decoders' scan becomes an ONNX ``Scan`` (each chunk's rows stacked, then gathered in order once) that
    onnxruntime runs for one query and for many chunks: PerceiverIO's queries, subsampled Fourier queries, flow's pixels."""
    model, args = _perceiver_io(decode_chunk_size=16)
    batch = torch.export.Dim("batch")
    dims = ({0: batch, 1: torch.export.Dim("n", max=10**6)}, {0: batch, 1: torch.export.Dim("m", max=10**6)})
    with torch.no_grad():
        session = _onnx_session(model, args, tmp_path / "pio.onnx", dims)
    names = [i.name for i in session.get_inputs()]
    for b, n, m in ((1, 1, 1), (2, 7, 17)):
        data, queries = torch.randn(b, n, 16), torch.randn(b, m, 8)
        (got,) = session.run(None, dict(zip(names, (data.numpy(), queries.numpy()))))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(data, queries), atol=1e-5, rtol=1e-4)
    model = _subsampled_decoder("fourier")
    q = torch.export.Dim("q", max=72)
    with torch.no_grad():
        session = _onnx_session(model, (torch.randn(2, 7, 6), torch.arange(40), torch.ones(2, 40, dtype=torch.bool)),
                                tmp_path / "points.onnx", ({0: batch}, {0: q}, {0: batch, 1: q}))
    names = [i.name for i in session.get_inputs()]
    for b, n in ((1, 1), (2, 17)):
        x, points, mask = torch.randn(b, 7, 6), torch.randperm(72)[:n], torch.rand(b, n) > 0.3
        (got,) = session.run(None, dict(zip(names, (x.numpy(), points.numpy(), mask.numpy()))))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x, points, mask), atol=1e-5, rtol=1e-4)
    model = _flow_queries()  # raw frame pairs of a dynamic size: tokens gathered with their 3×3 neighbourhoods
    with torch.no_grad():
        session = _onnx_session(model, (torch.randn(2, 2, 3, 6, 8),), tmp_path / "flow.onnx", (FLOW_DIMS,))
    for b, h, w in ((1, 1, 1), (2, 17, 9)):
        x = torch.randn(b, 2, 3, h, w)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-4)


def test_a_program_for_onnx_streams_a_fixed_size_in_a_while_loop() -> None:
    """Inside ``onnx_export`` (as ``torch.onnx.export`` by itself, and ``perceivers export`` for ``.onnx`` files) a
    streamed context of a fixed size is attended in a ``torch.while_loop`` too: unrolled, onnxruntime computed every
    chunk's scores before consuming the first (the README Perceiver's static ONNX at 512²: 330 MiB). Outside it the
    program keeps the unrolled chunks (pt2 runs them in order)."""
    from perceivers.layers import onnx_export

    model, (x,) = _perceiver(chunk_size=16)  # 120 pixels: 8 chunks
    mask = torch.rand(2, 10, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[1] = False
    with onnx_export():
        program = _export(model, (x, mask), None)
    assert _loops(program) >= 1 and _loops(_export(model, (x, mask), None)) == 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_streams_a_fixed_size_in_a_loop(tmp_path) -> None:
    """``torch.onnx.export`` of a model that streams a fixed-size input: one ONNX ``Loop`` over the chunks (its non-strict
    capture had refused the loop, whose carried running maximum changed strides, and the strict one unrolled it)."""
    onnx = pytest.importorskip("onnx")
    model, args = _perceiver(chunk_size=16)
    session = _onnx_session(model, args, tmp_path / "fixed.onnx")
    assert "Loop" in {node.op_type for node in onnx.load(str(tmp_path / "fixed.onnx")).graph.node}
    (got,) = session.run(None, {session.get_inputs()[0].name: args[0].numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(*args), atol=1e-5, rtol=1e-4)


def test_compile_dynamic_trains_a_streamed_model() -> None:
    """A model streaming its input (``chunk_size``) in training under ``torch.compile(fullgraph=True, dynamic=True)``:
    each chunk is recomputed in the backward pass (a ``checkpoint`` per chunk), and the context norm's ``eps``, a float
    that dynamic compilation traces as a symbol, was first read inside the first chunk's checkpoint subgraph, so the
    second chunk failed ('lift_tracked_freevar_to_input should not be called on root SubgraphTracer'). Outputs and
    gradients equal eager mode's."""
    torch.manual_seed(0)
    model = perceivers.Perceiver(num_freq_bands=2, depth=1, max_freq=10.0, num_latents=4, latent_dim=16, latent_heads=2,
                                 cross_dim_head=8, latent_dim_head=8, num_classes=3, chunk_size=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    x = torch.randn(2, 5, 5, 3, generator=torch.Generator().manual_seed(0))  # 25 pixels: 2 chunks, the last of 9
    want = model(x)
    want.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close([p.grad for p in model.parameters()], grads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_compile_dynamic_streams_every_length_of_a_chunk_count_in_one_graph(train, monkeypatch) -> None:
    """``torch.compile(dynamic=True)`` of models streaming with an explicit ``chunk_size`` (the encoder's context, a
    decoder's query set): the chunk loop ran over ``range(0, length, step)``, which specialised each graph to one
    length, a recompilation per input size (the 9th fell back to eager). Chunks are now counted, so a graph holds for
    every length with as many chunks; outputs (and gradients in training) equal eager mode's. (The image's chunks, not
    the grid kernel, which takes the whole image as one operator: test_compile_takes_any_image_size_to_the_grid_kernel.)"""
    from torch._dynamo.testing import CompileCounter

    from perceivers.layers import grid_attention

    monkeypatch.setattr(grid_attention, "serves", lambda *args, **kwargs: False)
    torch.manual_seed(0)
    perceiver = perceivers.Perceiver(num_freq_bands=2, depth=1, max_freq=10.0, num_latents=4, latent_dim=16,
                                     latent_heads=2, cross_dim_head=8, latent_dim_head=8, num_classes=3, chunk_size=16)
    io = perceivers.PerceiverIO(depth=1, dim=5, queries_dim=6, logits_dim=2, num_latents=4, latent_dim=16,
                                cross_dim_head=8, latent_dim_head=8, chunk_size=16, decode_chunk_size=16)
    cases = [(perceiver, lambda h: {"data": torch.randn(2, h, 4, 3)}),  # h·4 pixels, chunks of whole rows (16)
             (io, lambda h: {"data": torch.randn(2, 4 * h, 5), "queries": torch.randn(2, 4 * h, 6)})]
    for model, make in cases:
        model.train(train)
        counter = CompileCounter()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
        for h in (6, 8):  # 24 and 32 elements: 2 chunks each (a last chunk of one image row would be a graph of its own)
            inputs = make(h)
            with torch.set_grad_enabled(train):
                got, want = compiled(**inputs), model(**inputs)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                if train:
                    grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
                    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), list(model.parameters())),
                                               grads, atol=1e-5, rtol=1e-5)
        assert counter.frame_count == 1, (type(model).__name__, counter.frame_count)
        with torch.set_grad_enabled(train):
            compiled(**make(10))  # 40 elements: a third chunk, a second graph
        assert counter.frame_count == 2, type(model).__name__


@pytest.mark.parametrize("train", [False, True])
def test_compile_takes_any_image_size_to_the_grid_kernel(train, monkeypatch) -> None:
    """Under ``torch.compile(dynamic=True)`` a streamed image goes to the native grid kernel as one operator
    (``perceivers::grid_attention``) whatever its number of chunks: one graph for every size, outputs (and gradients)
    equal eager mode's, which takes the kernel too."""
    from torch._dynamo.testing import CompileCounter

    from perceivers.layers import grid_attention

    if not grid_attention.available():
        pytest.skip("no C compiler for the native kernel")
    calls = []
    real = grid_attention._forward
    monkeypatch.setattr(grid_attention, "_forward", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    model = perceivers.Perceiver(num_freq_bands=2, depth=1, max_freq=10.0, num_latents=4, latent_dim=16, latent_heads=2,
                                 cross_dim_head=8, latent_dim_head=8, num_classes=3, chunk_size=16).train(train)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for h in (6, 8, 10):  # 2, 2 and 3 chunks of 16 pixels
        x = torch.randn(2, h, 4, 3)
        with torch.set_grad_enabled(train):
            got, want = compiled(x), model(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if train:
                grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
                torch.testing.assert_close(torch.autograd.grad(got.square().sum(), list(model.parameters())),
                                           grads, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert len(calls) == 6  # compiled and eager, every size


def test_onnx_conv_vision_model_takes_odd_image_sizes(tmp_path) -> None:
    """The conv stem's TF 'SAME' padding of a dynamic image size: ONNX divides integers truncating toward zero, so a
    ceiling written as ``-(-n // 2)`` became a floor in the file, and onnxruntime padded odd sizes by one pixel too
    few (logits off by 0.13-0.16 at 17×31 and 37×16, where the ``.pt2`` program was right)."""
    from perceivers.tasks.registry import model_entry

    torch.manual_seed(0)
    tiny = dict(model_entry("vision-perceiver-conv").tiny)
    model = _Logits(perceivers.create_model("vision-perceiver-conv", **tiny)).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=16, max=256),
            3: torch.export.Dim("w", min=16, max=256)}
    with torch.no_grad():
        session = _onnx_session(model, (torch.randn(2, 3, *tiny["image_size"]),), tmp_path / "conv.onnx", (dims,))
    for batch, h, w in ((1, 16, 16), (3, 17, 31), (2, 37, 16)):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-4)
