"""`perceivers export`: ONNX and torch.export files of the registry models, dynamic where the model allows,
checked against the eager model; clear errors for what it cannot do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perceivers import cli, from_pretrained, save_pretrained
from perceivers.commands import export
from perceivers.commands.export import example_inputs
from perceivers.models import Perceiver
from perceivers.models.perceiver_ar import CausalLanguageModel, CausalLanguageModelConfig
from perceivers.perceiver_ar_pytorch import PerceiverAR
from perceivers.tasks import create_model


def _export(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["export", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_vision_to_onnx_with_dynamic_batch_and_size(tmp_path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "vision.onnx"
    status, out, _ = _export(capsys, str(path), "--model", "vision-perceiver-fourier", "--config", '{"tiny": true}')
    assert status == 0, out
    assert "dynamic: batch and size" in out and out.count("max |exported - eager|") == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # random weights: shapes only
    (logits,) = session.run(None, {session.get_inputs()[0].name: torch.randn(4, 3, 30, 17).numpy()})
    assert logits.shape == (4, create_model("vision-perceiver-fourier", tiny=True).config.num_labels)


def test_streamed_image_size_with_a_dynamic_batch(tmp_path, capsys) -> None:
    """224² images stream in eager mode (chunks sized by the batch): the program still takes any batch."""
    status, out, _ = _export(capsys, str(tmp_path / "v.pt2"), "--model", "vision-perceiver-fourier", "--config",
                             '{"tiny": true, "image_size": [224, 224]}', "--static-size")
    assert status == 0 and "dynamic: batch)" in out and "batch 3 (3, 3, 224, 224): max" in out, out


def test_checkpoint_to_pt2_matches_the_model(tmp_path, capsys) -> None:
    """A saved model exported with its weights: the program equals the reloaded model at new shapes."""
    torch.manual_seed(1)
    model = create_model("language-perceiver", tiny=True).eval()
    save_pretrained(model, tmp_path / "lm")
    path = tmp_path / "lm.pt2"
    status, out, _ = _export(capsys, str(path), "--checkpoint", str(tmp_path / "lm"))
    assert status == 0, out
    assert "language-perceiver" in out and "dynamic: batch and size" in out
    program = torch.export.load(path).module()
    ids = torch.randint(0, 262, (5, 7))
    with torch.no_grad():
        torch.testing.assert_close(program(ids), from_pretrained(tmp_path / "lm")(ids).logits, atol=1e-5, rtol=1e-5)


def test_native_pt2_keeps_the_kernels(tmp_path, capsys) -> None:
    """``--native``: the grid kernel (and the fused attention kernel where the processor has it) stay in the program
    as perceivers' operators, with the batch and size dynamic; checked against eager at two shapes."""
    from perceivers.layers import grid_attention, native_attention

    path = tmp_path / "v.pt2"
    status, out, _ = _export(capsys, str(path), "--model", "vision-perceiver-fourier", "--config",
                             '{"tiny": true, "image_size": [40, 36]}', "--native")
    assert status == 0 and "dynamic: batch and size" in out and out.count("max |exported - eager|") == 2, out
    program = torch.export.load(path)
    ops = {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
           for node in module.graph.nodes}
    assert ("perceivers.grid_attention.default" in ops) == grid_attention.available()
    assert ("perceivers.native_attention.default" in ops) == native_attention.available()


def test_fixed_sizes_stay_fixed_and_mappings_export(tmp_path, capsys) -> None:
    status, out, _ = _export(capsys, str(tmp_path / "learned.pt2"), "--model", "vision-perceiver-learned",
                             "--config", '{"tiny": true}')
    assert status == 0 and "dynamic: batch)" in out  # learned positions fix the image size
    status, out, _ = _export(capsys, str(tmp_path / "mm.pt2"), "--model", "multimodal-perceiver", "--config",
                             '{"tiny": true}')
    assert status == 0 and "batch 3 (3, " in out, out  # {"audio", "image"} in, a mapping of logits out


def test_perceiver_needs_an_input_shape(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=1, num_latents=4,
                      latent_dim=16, cross_dim_head=8, latent_dim_head=8, num_classes=3)
    save_pretrained(model, tmp_path / "p")
    status, _, err = _export(capsys, str(tmp_path / "p.pt2"), "--checkpoint", str(tmp_path / "p"))
    assert status == 2 and "Perceiver has no size of its own: pass --input-shape" in err
    status, out, _ = _export(capsys, str(tmp_path / "p.pt2"), "--checkpoint", str(tmp_path / "p"),
                             "--input-shape", "1,9,11,3")
    assert status == 0 and "(3, 7, 8, 3)" in out, out  # batch 3 at 0.75 of the size
    inputs = example_inputs(model, (2, 9, 11, 3))
    assert set(inputs.size_axes) == {1, 2}


def _perceiver_ar(kind: str) -> nn.Module:
    torch.manual_seed(2)
    if kind == "krasserm":
        config = CausalLanguageModelConfig(vocab_size=50, max_seq_len=24, num_latents=6, num_channels=32, num_heads=4,
                                           num_self_attention_layers=2)
        return CausalLanguageModel(config)
    return PerceiverAR(num_tokens=50, dim=32, depth=1, heads=2, dim_head=32, max_seq_len=24, cross_attn_seq_len=6)


@pytest.mark.parametrize(("kind", "shortest"), [("krasserm", 6), ("lucidrains", 7)])
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_perceiver_ar_exports_with_a_dynamic_length(tmp_path, capsys, kind, shortest, fmt) -> None:
    """Both Perceiver ARs take token ids of any batch and length: krasserm's down to ``num_latents`` (the latents
    alone, no prefix: a traced length once had to exceed it by 2), lucidrains' down to its prefix + 1 (one logit:
    the program was once fixed to that length, then had to be traced from prefix + 2)."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    model = _perceiver_ar(kind).eval()
    save_pretrained(model, tmp_path / "ar")
    path = tmp_path / f"ar.{fmt}"
    status, out, _ = _export(capsys, str(path), "--checkpoint", str(tmp_path / "ar"))
    assert status == 0 and "dynamic: batch and size" in out and "(3, 18): max" in out, out  # 24 × 0.75
    run = export._runner(path, fmt)  # the written file, as the command's own check runs it
    for batch, length in ((1, shortest), (2, shortest + 1), (4, 13), (3, 24)):
        ids = torch.randint(0, 50, (batch, length))
        with torch.no_grad():
            torch.testing.assert_close(run(ids)[0], model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["mlm", "classifier"])
def test_krasserm_text_models_export_with_a_dynamic_length(tmp_path, capsys, head) -> None:
    """krasserm's text models take token ids (they were traced with float inputs and refused); the masked language
    model decodes only the input's first n output queries, so its program keeps the length dynamic (a slice of all
    max_seq_len queries' logits is a view whose layout depends on n: torch.export fixed it)."""
    from perceivers import krasserm as k

    torch.manual_seed(3)
    text = k.TextEncoderConfig(vocab_size=30, max_seq_len=12, num_input_channels=12, num_cross_attention_heads=2,
                               num_self_attention_heads=2, num_self_attention_layers_per_block=1)
    if head == "mlm":
        decoder = k.TextDecoderConfig(vocab_size=30, max_seq_len=12, num_cross_attention_heads=2)
        model = k.MaskedLanguageModel(k.MaskedLanguageModelConfig(text, decoder, num_latents=4, num_latent_channels=16))
    else:
        decoder = k.ClassificationDecoderConfig(num_classes=5, num_output_query_channels=8, num_cross_attention_heads=2)
        model = k.TextClassifier(k.TextClassifierConfig(text, decoder, num_latents=4, num_latent_channels=16))
    save_pretrained(model.eval(), tmp_path / "m")
    status, out, _ = _export(capsys, str(tmp_path / "m.pt2"), "--checkpoint", str(tmp_path / "m"))
    assert status == 0 and "dynamic: batch and size" in out, out
    program = torch.export.load(tmp_path / "m.pt2").module()
    for batch, length in ((1, 1), (2, 5), (3, 12)):
        ids = torch.randint(0, 30, (batch, length))
        with torch.no_grad():
            torch.testing.assert_close(program(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("argv", "message"), [
    (["out.txt", "--model", "vision-perceiver-fourier"], "must end in .onnx (ONNX) or .pt2"),
    (["out.pt2", "--model", "language-perceiver", "--config", '{"tiny": true}', "--input-shape", "1,2,3"],
     "--input-shape must be [batch, length] (2 sizes), got 1,2,3"),
    (["no/such/dir/out.pt2", "--model", "vision-perceiver-fourier"], "is not a directory"),
    # the model's own check, raised while tracing
    (["out.pt2", "--model", "vision-perceiver-fourier", "--config", '{"tiny": true}', "--input-shape", "1,4,12,10"],
     "the model refuses an input of shape (1, 4, 12, 10): expected 3 input channels"),
    (["out.onnx", "--model", "vision-perceiver-fourier", "--config", '{"tiny": true}', "--native"],
     "--native is for .pt2 programs: ONNX has no perceivers operators"),
    # longer than the model's text: refused, not traced at the clamped length
    (["out.pt2", "--model", "language-perceiver", "--config", '{"tiny": true}', "--input-shape", "1,40"],
     "--input-shape 1,40: the model takes 1 to 16 tokens"),
])
def test_errors(tmp_path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    status, _, err = _export(capsys, *argv)
    assert status == 2 and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written, no temporary file


def test_refuses_to_overwrite(tmp_path, capsys) -> None:
    (tmp_path / "x.pt2").write_bytes(b"keep")
    status, _, err = _export(capsys, str(tmp_path / "x.pt2"), "--model", "vision-perceiver-fourier")
    assert status == 2 and "exists (use --force)" in err
    assert (tmp_path / "x.pt2").read_bytes() == b"keep"


def test_refuses_a_directory(tmp_path, capsys) -> None:
    """``--force`` replaces a file, never a directory: refused before the model is traced."""
    (tmp_path / "d.pt2").mkdir()
    status, out, err = _export(capsys, str(tmp_path / "d.pt2"), "--force", "--model", "vision-perceiver-fourier",
                               "--config", '{"tiny": true}')
    assert status == 2 and f"{tmp_path / 'd.pt2'} is a directory" in err and not out
    assert [p.name for p in tmp_path.iterdir()] == ["d.pt2"] and not any((tmp_path / "d.pt2").iterdir())


class _EagerRefusesBatch3(nn.Module):
    """Takes any batch while traced and refuses a batch of 3 when run: the written program is fine, the
    check has nothing to compare it with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting() and x.shape[0] == 3:
            raise ValueError("no batch of 3 here")
        return x * 2


def test_the_eager_model_failing_the_check_keeps_the_file(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(export, "load_model", lambda *args, **kwargs: _EagerRefusesBatch3())
    path = tmp_path / "m.pt2"
    status, out, err = _export(capsys, str(path), "--model", "vision-perceiver-fourier", "--input-shape", "1,4")
    assert status == 1 and "batch 3 (3, 4): the model itself refused it: no batch of 3 here" in out, out
    assert f"verification failed (above); {path} is kept as written" in err and "Traceback" not in err
    assert torch.export.load(path).module()(torch.ones(3, 4)).eq(2).all()


def test_input_shape_syntax(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["export", "x.pt2", "--model", "vision-perceiver-fourier", "--input-shape", "1,a"])
    assert "expected sizes separated by commas" in capsys.readouterr().err
