"""`perceivers predict`: image → top-k classes, masked text → filled text, two frames → flow PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _haiku_writer import write_haiku_pickle
from PIL import Image

from perceivers import save_pretrained
from perceivers.commands import predict
from perceivers.data import ByteTokenizer, ImageNetEvalTransform, flow_to_color, normalize_frames, tile_flow
from perceivers.data.flow import flow_model_fn
from perceivers.tasks import create_model


def _perturbed(name, **overrides):
    torch.manual_seed(11)
    model = create_model(name, tiny=True, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_image_top_k(tmp_path, image, capsys):
    model = _perturbed("vision-perceiver-fourier")
    save_pretrained(model, tmp_path / "ckpt")
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    x = ImageNetEvalTransform(size=model.config.image_size)(image)[None]
    with torch.no_grad():
        probs = model(x).logits[0].softmax(-1)
    assert [r["index"] for r in result["top"]] == probs.topk(5).indices.tolist()
    np.testing.assert_allclose([r["probability"] for r in result["top"]], probs.topk(5).values.numpy(), rtol=1e-5)
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "ckpt"), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. class ")


def test_image_from_a_haiku_pickle(tmp_path, image, capsys):
    model = _perturbed("vision-perceiver-learned", image_size=8)
    pickle_path = write_haiku_pickle(model, tmp_path / "imagenet.pystate")
    config = json.dumps({"tiny": True, "image_size": 8})
    assert predict.main([str(image), "--model", "vision-perceiver-learned", "--checkpoint", str(pickle_path),
                         "--config", config, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["top"][0]["index"]
    with torch.no_grad():
        want = model(ImageNetEvalTransform(size=(8, 8))(image)[None]).logits.argmax().item()
    assert got == want


def test_imagenet_models_print_class_names(tmp_path, image, capsys):
    model = _perturbed("vision-perceiver-fourier", num_labels=1000)
    save_pretrained(model, tmp_path / "ckpt")
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 5 and "(class " in out and not out.startswith("1. class ")


def test_text_fill_with_markers_and_spans(tmp_path, capsys):
    model = _perturbed("language-perceiver")  # max 16 bytes
    save_pretrained(model, tmp_path / "mlm")
    assert predict.main(["--text", "abc[MASK][MASK]def", "--checkpoint", str(tmp_path / "mlm"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = ByteTokenizer(16, parse_special_tokens=True)
    ids = torch.tensor([tok.encode("abc[MASK][MASK]def")])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert result["masked_positions"] == [3, 4]
    assert result["predicted_ids"] == logits[3:5].argmax(-1).tolist()
    filled = ids[0].clone()
    filled[3:5] = logits[3:5].argmax(-1)
    assert result["output"] == tok.decode(filled)

    text_file = tmp_path / "in.txt"
    text_file.write_text("hello world\n")
    assert predict.main([str(text_file), "--mask-span", "6:11", "--checkpoint", str(tmp_path / "mlm"), "--json"]) == 0
    spans = json.loads(capsys.readouterr().out)
    assert spans["masked_positions"] == [6, 7, 8, 9, 10]
    assert spans["output"].startswith("hello ") or "\ufffd" in spans["output"]

    assert predict.main(["--text", "no masks", "--checkpoint", str(tmp_path / "mlm")]) == 2
    assert "nothing to fill" in capsys.readouterr().err
    assert predict.main(["--text", "x" * 20 + "[MASK]", "--checkpoint", str(tmp_path / "mlm")]) == 2
    assert "at most 16" in capsys.readouterr().err


def test_text_with_special_tokens_layout(tmp_path, capsys):
    model = _perturbed("language-perceiver")
    save_pretrained(model, tmp_path / "mlm")
    assert predict.main(["--text", "ab[MASK]", "--add-special-tokens", "--mask-span", "0:1",
                         "--checkpoint", str(tmp_path / "mlm"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["masked_positions"] == [1, 3]  # [CLS] a b [MASK] [SEP]


def test_flow_png(tmp_path, capsys):
    model = _perturbed("optical-flow-perceiver")  # train_size (6, 8)
    save_pretrained(model, tmp_path / "flow")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (10, 14, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"frame{i}.png")
        Image.fromarray(f).save(paths[-1])
    out_png, out_npy = tmp_path / "flow.png", tmp_path / "flow.npy"
    assert predict.main([*map(str, paths), "--checkpoint", str(tmp_path / "flow"), "--output", str(out_png),
                         "--save-flow", str(out_npy), "--min-overlap", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    want = tile_flow(flow_model_fn(model), frames[0], frames[1], tile_size=(6, 8), min_overlap=2)
    np.testing.assert_allclose(np.load(out_npy), want.numpy(), atol=1e-6)
    png = np.asarray(Image.open(out_png))
    assert png.shape == (10, 14, 3) and np.array_equal(png, flow_to_color(want))
    assert normalize_frames(frames[0]).shape == (10, 14, 3)


def test_input_errors(tmp_path, image, capsys):
    assert predict.main([str(image), str(image), str(image)]) == 2
    assert "pass --model" in capsys.readouterr().err
    model = _perturbed("optical-flow-perceiver")
    save_pretrained(model, tmp_path / "flow")
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "flow")]) == 2
    assert "two frames" in capsys.readouterr().err
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "flow"), "--model", "language-perceiver"]) == 2
    assert "holds optical-flow-perceiver" in capsys.readouterr().err


def test_flow_outputs_are_checked_before_and_written_together(tmp_path, capsys):
    """An output that cannot be written is refused before the model runs, and an existing flow PNG is left as it
    was (it used to be overwritten before --save-flow failed); a negative overlap is refused (its gaps came out
    NaN)."""
    save_pretrained(_perturbed("optical-flow-perceiver"), tmp_path / "flow")
    frames = []
    for i in range(2):
        frames.append(str(tmp_path / f"frame{i}.png"))
        Image.fromarray(np.full((10, 14, 3), 40 * i, dtype=np.uint8)).save(frames[-1])
    old = tmp_path / "flow.png"
    old.write_bytes(b"an earlier result")
    base = [*frames, "--checkpoint", str(tmp_path / "flow"), "--output", str(old)]
    for extra, message in ((["--save-flow", str(tmp_path / "missing" / "f.npy")], "--save-flow .* cannot write"),
                           (["--min-overlap", "-1"], r"min_overlap=-1 must be in \[0, 6\)")):
        assert predict.main([*base, *extra]) == 2
        assert capsys.readouterr().err.count("error") == 1
        assert old.read_bytes() == b"an earlier result"
    assert predict.main([*frames, "--checkpoint", str(tmp_path / "flow"), "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_options_of_another_task_and_unreadable_text_are_refused(tmp_path, image, capsys):
    """Options the model's task does not read were silently ignored; a file that is not UTF-8 text (or a folder)
    names itself; --numerics applies to transformers checkpoints only."""
    save_pretrained(_perturbed("vision-perceiver-fourier"), tmp_path / "vision")
    save_pretrained(_perturbed("language-perceiver"), tmp_path / "lm")
    vision, lm = ["--checkpoint", str(tmp_path / "vision")], ["--checkpoint", str(tmp_path / "lm")]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "folder.txt").mkdir()
    cases = [
        ([str(image), *vision, "--text", "hi", "--save-flow", "f.npy"], "--text apply to text models"),
        ([str(image), *vision, "--numerics", "transformers"], "--numerics transformers applies to transformers"),
        ([str(tmp_path / "latin1.txt"), *lm], "latin1.txt is not UTF-8 text"),
        ([str(image), *lm], "cat.png is not UTF-8 text"),
        ([str(tmp_path / "folder.txt"), *lm], "folder.txt"),
        ([str(tmp_path / "latin1.txt"), *lm, "--text", "hi"], "not both"),
        ([str(image), "--model", "vision-perceiver-fourier", "--config", str(tmp_path)], "is a directory"),
        ([str(image), "--model", "vision-perceiver-fourier", "--config", "missing.json"], "neither JSON nor"),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_top_k_must_be_a_positive_whole_number(image, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(image), "--model", "vision-perceiver-conv", "--top-k", value])
    assert exit_info.value.code == 2
    assert "--top-k" in capsys.readouterr().err


def test_no_model_and_no_checkpoint_means_the_official_weights(image, capsys, monkeypatch):
    import perceivers.hub

    asked = []

    def offline(source):
        asked.append(source)
        raise FileNotFoundError(f"{source!r}: offline")

    monkeypatch.setattr(perceivers.hub, "resolve", offline)
    assert predict.main([str(image)]) == 2
    assert asked == ["deepmind/vision-perceiver-fourier"]
    err = capsys.readouterr().err
    assert "official weights" in err and "'deepmind/vision-perceiver-fourier': offline" in err


def test_help_names_both_modes(capsys):
    """`perceivers predict --help` describes the inference command and points to the trained-run mode, whose
    own help answers with Lightning's options."""
    from perceivers import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--top-k" in out
    assert "runs Lightning's Trainer.predict" in out and "--ckpt_path" in out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--config", "digits", "--help"])
    assert exit_.value.code == 0
    assert "--trainer.max_epochs" in capsys.readouterr().out


def test_a_bfloat16_checkpoint_predicts_in_float32(tmp_path, image, capsys):
    """from_pretrained keeps a checkpoint's dtype; predict computes in float32 on its float32 inputs, as before."""
    model = _perturbed("vision-perceiver-fourier").to(torch.bfloat16)
    save_pretrained(model, tmp_path / "ckpt")
    assert predict.main([str(image), "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["top"][0]["index"]
    x = ImageNetEvalTransform(size=model.config.image_size)(image)[None]
    with torch.no_grad():
        assert got == model.float()(x).logits.argmax().item()
